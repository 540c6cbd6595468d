"""The Gradio Space (space/app.py) with a tiny random pipeline: events in-process, then over HTTP with gradio_client."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = sorted((ROOT / "space" / "examples").glob("*.png"))[0]


def load_app():
    """space/ is not a package: load app.py by path (it sets GRADIO_ANALYTICS_ENABLED=False before gradio loads)."""
    spec = importlib.util.spec_from_file_location("mergevq_space_app", ROOT / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # gradio writes outputs and uploads here, not to the system temp dir
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield load_app()


@pytest.fixture(scope="module")
def demo(app):
    from mergevq_hf.defaults import RANDOM_MODEL_NOTICE, build_tiny_random_pipeline

    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return app.build_demo(pipe, notice=RANDOM_MODEL_NOTICE)


GENERATE = dict(class_id=3, num_images=2, num_tokens=9, guidance_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, seed=5,
                token_budget=False, guidance_schedule="constant")


def _generate(demo, **changes):
    return demo(*{**GENERATE, **changes}.values(), api_name="generate")


def test_analytics_off_and_named_endpoints(app, demo):
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and demo.analytics_enabled is False
    assert {"generate", "tokenize"} <= {fn.api_name for fn in demo.fns.values()}


def test_random_model_is_announced_on_the_page(demo):
    texts = [block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-notice"]
    assert texts and "randomly initialised" in texts[0]


def test_generate_in_process_fills_the_gallery(app, demo):
    items = _generate(demo)
    assert len(items) == 2
    image = Image.open(items[0]["image"])
    assert image.size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE) and np.asarray(image).std() > 0


def test_tokenize_in_process_shows_merge_map_and_ratio(app, demo):
    reconstruction, merge_map, info = demo(str(EXAMPLE), 16, api_name="tokenize")
    assert Image.open(reconstruction).size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE)
    assert Image.open(merge_map).size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE)
    assert "K = 16 tokens" in info and "4.0x" in info  # L = 64 positions / 16 tokens


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_tokenize_converts_grayscale_and_rgba(demo, tmp_path, mode):
    path = tmp_path / f"upload_{mode}.png"
    Image.open(EXAMPLE).convert(mode).resize((48, 40)).save(path)
    *_, info = demo(str(path), 9, api_name="tokenize")
    assert f"mode {mode}; it was converted to RGB" in info and "from 48x40 to 32x32" in info


def test_merge_map_colours_each_token_and_outlines_it():
    from mergevq_hf.visualization import draw_merge_map

    # 2x2 grid: the left column is token 0, the right column token 1.
    drawn = np.asarray(draw_merge_map(Image.new("RGB", (32, 32)), np.array([0, 1, 0, 1]), 2, display_size=64)).astype(int)
    assert drawn.shape == (64, 64, 3)
    left, right = drawn[:, :31], drawn[:, 33:]
    assert (left == left[0, 0]).all() and (right == right[0, 0]).all()  # one colour per token
    assert (left[0, 0] != right[0, 0]).any()
    assert (drawn[:, 31] == 255).all()  # the boundary between the two tokens is outlined


def _error_message(call) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as error:
        call()
    message = error.value.message
    assert "Traceback" not in message and "\n" not in message
    return message


def test_bad_uploads_get_readable_messages(app, demo, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    assert "notes.png is not an image file" in _error_message(lambda: demo(str(text), 9, api_name="tokenize"))

    huge = tmp_path / "huge.png"
    Image.new("L", (app.MAX_UPLOAD_PIXELS // 1000 + 1, 1000)).save(huge)  # tiny file, too many pixels
    assert "images of at most" in _error_message(lambda: demo(str(huge), 9, api_name="tokenize"))

    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(b"\0" * (app.MAX_UPLOAD_BYTES + 1))
    assert "larger than 5 MB" in _error_message(lambda: demo(str(heavy), 9, api_name="tokenize"))

    assert "Upload an image" in _error_message(lambda: demo(None, 9, api_name="tokenize"))
    assert "between 1 and 64" in _error_message(lambda: demo(str(EXAMPLE), 65, api_name="tokenize"))


def test_generate_with_the_token_budget_held(demo):
    assert len(_generate(demo, token_budget=True)) == 2


def test_generate_with_a_linear_guidance_schedule(demo):
    assert len(_generate(demo, guidance_schedule="linear")) == 2
    # The pipeline's own check answers, so the choice reaches it.
    assert "guidance_schedule must be one of" in _error_message(lambda: _generate(demo, guidance_schedule="cosine"))


def test_generate_limits(app, demo):
    assert "Number of images must be between 1 and 8, got 9" in _error_message(
        lambda: _generate(demo, num_images=app.MAX_IMAGES_PER_REQUEST + 1)
    )
    assert "Class must be between 0 and 9, got 10" in _error_message(lambda: _generate(demo, class_id=10))
    assert "Class must be a whole number" in _error_message(lambda: _generate(demo, class_id="3: Sandal"))
    assert "Token budget K" in _error_message(lambda: _generate(demo, num_tokens=2.5))


def test_launched_app_through_gradio_client(app, demo, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/generate", "/tokenize"} <= set(endpoints)

        items = client.predict(*GENERATE.values(), api_name="/generate")
        assert len(items) == 2 and Image.open(items[0]["image"]).size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE)

        reconstruction, merge_map, info = client.predict(handle_file(str(EXAMPLE)), 9, api_name="/tokenize")
        assert Image.open(merge_map).size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE) and "K = 9 tokens" in info

        text = tmp_path / "notes.png"
        text.write_text("hello")
        with pytest.raises(AppError, match="not an image file"):
            client.predict(handle_file(str(text)), 9, api_name="/tokenize")
    finally:
        demo.close()


@pytest.mark.parametrize(
    "field, message",
    [("seed", "Seed must be a whole number"), ("num_images", "Number of images must be a whole number"),
     ("num_tokens", "Token budget K must be a whole number"), ("top_k", "Top-k must be a whole number"),
     ("guidance_scale", "Guidance scale must be a finite number"), ("temperature", "Temperature must be a finite number"),
     ("top_p", "Top-p must be a finite number")],
)
def test_nan_gets_a_readable_message(demo, field, message):
    # A JSON NaN passes gradio's range check of a number input (every comparison with NaN is false).
    assert message in _error_message(lambda: _generate(demo, **{field: float("nan")}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])  # a browser sends NaN as null
def test_non_finite_values_never_reach_the_browser_as_a_blank_error(demo, bad):
    for field in ["seed", "num_images", "guidance_scale", "temperature", "top_p"]:
        assert str(bad) in _error_message(lambda: _generate(demo, **{field: bad}))
    assert "Token budget K" in _error_message(lambda: demo(str(EXAMPLE), float("nan"), api_name="tokenize"))


def test_tokenize_refuses_a_thin_strip_before_resizing(demo, tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (300_000, 1)).save(strip)  # a few hundred bytes; resized naively it would need gigabytes
    message = _error_message(lambda: demo(str(strip), 9, api_name="tokenize"))
    assert message.startswith("strip.png: a 300000x1 image") and "at most 8:1" in message


def test_tokenize_reads_sixteen_bit_greyscale_faithfully(demo, tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((32, 32), 16384, dtype=np.uint16)).save(path)  # a quarter of full scale: dark grey
    _, merge_map, info = demo(str(path), 64, api_name="tokenize")
    assert "mode I;16" in info
    # With K = L every cell is its own token; the merge map blends the image under the token colours, so a dark
    # input stays far from the washed-out picture PIL's clipping RGB conversion (to white) would give.
    assert np.asarray(Image.open(merge_map)).mean() < 200
