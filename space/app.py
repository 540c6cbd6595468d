"""Gradio Space for MergeVQ: Generate (class-conditional MergeAR samples) and Tokenize (merge map + reconstruction).

Run: `python space/app.py`. The model is `$MERGEVQ_MODEL` (a pipeline folder or a Hub id already in the local cache),
else the model bundled with `mergevq_hf`, else a tiny random model (announced on the page). Remote code is never
loaded: the package must be installed (see README.md). Named API endpoints: `/generate` and `/tokenize`.
"""

import math
import os

# Set before gradio is imported: with analytics on, building a Blocks starts a version check against a remote host.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from mergevq_hf.defaults import load_default_pipeline  # noqa: E402
from mergevq_hf.sampling_utils import DEFAULT_GUIDANCE_SCALE, GUIDANCE_SCHEDULES  # noqa: E402
from mergevq_hf.visualization import draw_merge_map, enlarge, load_image  # noqa: E402

# ---- limits: every request's work is bounded by these (the K range comes from the model) ----
MAX_IMAGES_PER_REQUEST = 8  # generated images per click; each costs L decoding steps
MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # enforced by the server on upload and again here
MAX_UPLOAD_PIXELS = 2048 * 2048  # refused before decoding, so a decompression bomb costs nothing
MAX_SEED = 2**31 - 1
QUEUE_SIZE = 16  # waiting requests beyond this are refused instead of piling up
CONCURRENCY_LIMIT = 1  # one model call at a time per event: CPU Spaces have 2 cores
DISPLAY_SIZE = 256  # 32x32 images are enlarged (nearest neighbour) so a person can see them

EXAMPLES_DIR = Path(__file__).parent / "examples"


def _int_in(value, low: int, high: int, name: str) -> int:
    """An integer in [low, high] from a UI or API value, or a gr.Error that says what is allowed."""
    # A JSON NaN or Infinity passes gradio's own range check of a number input (every comparison with NaN is false).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise gr.Error(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    if not low <= int(value) <= high:
        raise gr.Error(f"{name} must be between {low} and {high}, got {int(value)}.")
    return int(value)


def _finite(value, name: str) -> float:
    """A finite number from a UI or API value (its range is checked by the pipeline), or a gr.Error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise gr.Error(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _upload_path(payload) -> tuple[str, str]:
    """(path, name to show) of an upload. The event runs with preprocess=False, so it gets gradio's file-data dict."""
    if payload is None:
        raise gr.Error("Upload an image or pick an example first.")
    path, name = payload.get("path"), payload.get("orig_name")
    if not isinstance(path, str) or not os.path.isfile(path):
        raise gr.Error("The upload did not arrive; please upload the image again.")
    return path, name or os.path.basename(path)


def _class_choices(config) -> list[tuple[str, int]]:
    names = config.id2label if len(config.id2label) == config.num_classes else {}
    return [(f"{i}: {names[i]}" if i in names else str(i), i) for i in range(config.num_classes)]


def build_demo(pipe, notice: str | None = None) -> gr.Blocks:
    """The two-tab app around `pipe` (a `MergeVQPipeline`); `notice` is shown at the top (e.g. "random model")."""
    vq_config, ar_config = pipe.vq_model.config, pipe.transformer.config
    num_patches, size = vq_config.num_patches, vq_config.image_size

    def generate(
        class_id, num_images, num_tokens, guidance_scale, temperature, top_k, top_p, seed, token_budget,
        guidance_schedule="constant",
    ):
        num_images = _int_in(num_images, 1, MAX_IMAGES_PER_REQUEST, "Number of images")
        num_tokens = _int_in(num_tokens, 1, num_patches, "Token budget K")
        seed = _int_in(seed, 0, MAX_SEED, "Seed")
        try:
            images = pipe(
                class_labels=[_int_in(class_id, 0, ar_config.num_classes - 1, "Class")],
                num_images_per_class=num_images, num_tokens=num_tokens, guidance_scale=_finite(guidance_scale, "Guidance scale"),
                temperature=_finite(temperature, "Temperature"), top_k=_int_in(top_k, 0, 2**vq_config.codebook_bits, "Top-k"),
                top_p=_finite(top_p, "Top-p"), generator=torch.Generator().manual_seed(seed),
                token_budget=bool(token_budget), guidance_schedule=guidance_schedule,
            ).images
        except ValueError as error:  # the pipeline's own checks read well; show them instead of a generic error
            raise gr.Error(str(error)) from None
        return [enlarge(image, DISPLAY_SIZE) for image in images]

    def tokenize(upload, num_tokens):
        path, name = _upload_path(upload)
        if os.path.getsize(path) > MAX_UPLOAD_BYTES:
            raise gr.Error(f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
        num_tokens = _int_in(num_tokens, 1, num_patches, "Token budget K")
        try:
            image, mode = load_image(path, MAX_UPLOAD_PIXELS)
        except (ValueError, OSError) as error:
            raise gr.Error(str(error).replace(path, name)) from None
        try:
            pipe.image_processor.check_size(image.height, image.width)  # e.g. a 1 x 300,000 strip: refused, not resized
        except ValueError as error:
            raise gr.Error(f"{name}: {error}") from None
        try:
            output = pipe.reconstruct([image], num_tokens=num_tokens)
            # The merge map is drawn over the square the tokenizer saw (the image processor's output).
            seen = pipe.image_processor.postprocess(pipe.image_processor(image).pixel_values)[0]
        except ValueError as error:  # e.g. a PIL mode that has no RGB conversion
            raise gr.Error(f"{name}: {error}") from None
        merge_map = draw_merge_map(seen, output.source_map[0], vq_config.grid_size, display_size=DISPLAY_SIZE)
        bits = num_tokens * vq_config.codebook_bits
        notes = [
            f"**K = {num_tokens} tokens** for the {vq_config.grid_size}x{vq_config.grid_size} grid of L = {num_patches} "
            f"patches: **{num_patches / num_tokens:.1f}x** fewer tokens than without merging.",
            f"The codes take {num_tokens} x {vq_config.codebook_bits} bits = {bits:,} bits, against {size * size * 24:,} bits "
            f"of 8-bit RGB pixels: **{size * size * 24 / bits:.0f}x** compression (the merge map not counted).",
        ]
        if mode != "RGB":
            notes.append(f"The upload was in mode {mode}; it was converted to RGB.")
        if image.size != (size, size):
            notes.append(f"It was resized and centre-cropped from {image.width}x{image.height} to {size}x{size}.")
        return enlarge(output.images[0], DISPLAY_SIZE), merge_map, "\n\n".join(notes)

    with gr.Blocks(title="MergeVQ", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# MergeVQ\nAn image tokenizer that merges similar patches into shared tokens before look-up-free "
            "quantisation, and MergeAR, a class-conditional generator over those tokens "
            "([arXiv 2504.00999](https://arxiv.org/abs/2504.00999))."
        )
        if notice:
            gr.Markdown(f"**Note:** {notice}", elem_id="model-notice")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    class_id = gr.Dropdown(_class_choices(ar_config), value=0, label="Class")
                    num_images = gr.Slider(1, MAX_IMAGES_PER_REQUEST, value=4, step=1, label="Number of images")
                    gen_tokens = gr.Slider(1, num_patches, value=ar_config.num_tokens, step=1, label="Token budget K", info=f"distinct merged tokens per image, out of L = {num_patches}")
                    guidance_scale = gr.Slider(1.0, 10.0, value=DEFAULT_GUIDANCE_SCALE, step=0.1, label="Guidance scale", info="1 = off")
                    guidance_schedule = gr.Radio(list(GUIDANCE_SCHEDULES), value="constant", label="Guidance schedule", info="linear: the scale rises from 1 at the first token to the value above at the last")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                    top_k = gr.Slider(0, 2**vq_config.codebook_bits, value=0, step=1, label="Top-k", info="per sub-token (low bits, then high bits) with a factorised head; 0 = off")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", info="per sub-token with a factorised head; 1 = off")
                    token_budget = gr.Checkbox(False, label="Hold the token budget", info="after K distinct codes, an image only repeats them")
                    seed = gr.Number(0, step=1, minimum=0, maximum=MAX_SEED, label="Seed")  # no precision: its rounding fails on NaN
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                gallery = gr.Gallery(label="Samples", columns=4, format="png", elem_id="generate-gallery")
        with gr.Tab("Tokenize"):
            with gr.Row():
                with gr.Column():
                    upload = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=256, label=f"Image (at most {MAX_UPLOAD_BYTES // 2**20} MB)")
                    tok_tokens = gr.Slider(1, num_patches, value=vq_config.num_tokens, step=1, label="Token budget K", info=f"merged tokens kept, out of L = {num_patches}")
                    tokenize_button = gr.Button("Tokenize", variant="primary", elem_id="tokenize-button")
                    if EXAMPLES_DIR.is_dir():
                        gr.Examples([[str(path)] for path in sorted(EXAMPLES_DIR.glob("*.png"))], inputs=[upload])
                with gr.Column():
                    merge_map = gr.Image(label="Merge map: cells of one colour share one token", format="png")
                    reconstruction = gr.Image(label="Reconstruction", format="png")
                    info = gr.Markdown()

        # preprocess=False: gradio's own number checks fail with a blank error on null (what a browser sends for NaN);
        # `generate` checks every value itself.
        generate_button.click(
            generate, [class_id, num_images, gen_tokens, guidance_scale, temperature, top_k, top_p, seed, token_budget,
                       guidance_schedule], gallery,
            api_name="generate", concurrency_limit=CONCURRENCY_LIMIT, preprocess=False,
        )
        # preprocess=False: the upload reaches `tokenize` undecoded, so a bad file gets our message, not gradio's.
        tokenize_button.click(
            tokenize, [upload, tok_tokens], [reconstruction, merge_map, info], api_name="tokenize",
            concurrency_limit=CONCURRENCY_LIMIT, preprocess=False,
        )
    return demo.queue(max_size=QUEUE_SIZE)


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the upload limit enforced by the server."""
    return demo.launch(max_file_size=MAX_UPLOAD_BYTES, **kwargs)


if __name__ == "__main__":
    loaded = load_default_pipeline()
    print(f"MergeVQ Space: model {loaded.source}" + (f" ({loaded.notice})" if loaded.notice else ""))
    launch(build_demo(loaded.pipeline, notice=loaded.notice))
