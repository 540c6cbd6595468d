"""MergeVQPipeline: generation, reconstruction, input checks, dtype moves and save/load round trips (tiny models)."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from mergevq_hf import MergeARConfig, MergeARForCausalLM, MergeVQConfig, MergeVQModel, MergeVQPipeline

NUM_CLASSES, L, K = 10, 64, 16


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    vq_model = MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()  # 32x32 images, L = 64, 10-bit codes
    # The generator must share the tokenizer's code length and 8x8 grid.
    ar_config = MergeARConfig.from_preset(
        "tiny", codebook_bits=10, factorized_bits=[4, 6], grid_size=8, num_classes=NUM_CLASSES
    )
    pipe = MergeVQPipeline(vq_model=vq_model, transformer=MergeARForCausalLM(ar_config).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- generation ---------------------------------------------------------------------------------------------------


def test_output_types(pipe):
    pil = pipe([1, 2], generator=seeded()).images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) for im in pil)
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in pil)
    array = pipe([1, 2], generator=seeded(), output_type="np").images
    assert array.shape == (2, 32, 32, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    tensor = pipe([1, 2], generator=seeded(), output_type="pt").images
    assert tensor.shape == (2, 3, 32, 32) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array)
    np.testing.assert_array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))
    (as_tuple,) = pipe([1, 2], generator=seeded(), output_type="pt", return_dict=False)
    torch.testing.assert_close(as_tuple, tensor)


def test_generator_seeds_sampling_without_touching_global_rng(pipe):
    state = torch.get_rng_state()
    a = pipe([3, 4], generator=seeded(7), output_type="pt").images
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global RNG has no say when a generator is given
    b = pipe([3, 4], generator=seeded(7), output_type="pt").images
    c = pipe([3, 4], generator=seeded(8), output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_of_several_classes_and_sampling_arguments(pipe, monkeypatch):
    calls = []
    generate = pipe.transformer.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(pipe.transformer, "generate", spy)
    images = pipe([3, 1, 4], num_images_per_class=2, num_tokens=9, generator=seeded(), output_type="np").images
    assert images.shape == (6, 32, 32, 3)
    assert calls[0]["class_labels"].tolist() == [3, 3, 1, 1, 4, 4]  # grouped by class, in order
    assert (calls[0]["num_tokens"], calls[0]["cfg_scale"], calls[0]["top_k"], calls[0]["top_p"]) == (9, 2.0, 0, 1.0)
    pipe(torch.tensor([5]), guidance_scale=1.0, temperature=0.5, top_k=5, top_p=0.9, output_type="np")
    assert (calls[1]["cfg_scale"], calls[1]["temperature"], calls[1]["top_k"], calls[1]["top_p"]) == (None, 0.5, 5, 0.9)
    pipe(6, guidance_scale=None, output_type="np")
    assert calls[2]["cfg_scale"] is None and calls[2]["num_tokens"] == pipe.transformer.config.default_num_tokens


def test_progress_bar_counts_decoding_steps_and_honours_config():
    pipe = tiny_pipeline()
    shown, hidden = io.StringIO(), io.StringIO()
    pipe.set_progress_bar_config(file=shown, disable=False)
    pipe([1], output_type="np")
    assert f"{L}/{L}" in shown.getvalue()
    pipe.set_progress_bar_config(file=hidden, disable=True)
    pipe([1], output_type="np")
    assert hidden.getvalue() == ""


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[NUM_CLASSES]), "unknown class ids \\[10\\]"),
        (dict(class_labels=[-1, 2]), "unknown class ids \\[-1\\]"),
        (dict(class_labels=[]), "class_labels is empty"),
        (dict(class_labels="cat"), "int or a list of ints"),
        (dict(class_labels=[1.5]), "int or a list of ints"),
        (dict(class_labels=True), "int or a list of ints"),
        (dict(class_labels=torch.tensor([1.0])), "1-D integer tensor"),
        (dict(class_labels=[1], num_tokens=0), "1 <= K <= L = 64"),
        (dict(class_labels=[1], num_tokens=L + 1), "1 <= K <= L = 64"),
        (dict(class_labels=[1], num_tokens=2.5), "1 <= K <= L = 64"),
        (dict(class_labels=[1], num_images_per_class=0), "num_images_per_class"),
        (dict(class_labels=[1], output_type="latent"), "output_type must be one of"),
        (dict(class_labels=[1], temperature=0), "temperature"),
        (dict(class_labels=[1], top_k=-1), "top_k"),
        (dict(class_labels=[1], top_p=0.0), "top_p"),
        (dict(class_labels=[1], guidance_scale=-1.0), "guidance_scale"),
        (dict(class_labels=[1], generator=[torch.Generator()]), "single torch.Generator"),
    ],
)
def test_bad_generation_inputs(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_components_must_match():
    vq_model = MergeVQModel(MergeVQConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="do not match"):
        MergeVQPipeline(vq_model=vq_model, transformer=MergeARForCausalLM(MergeARConfig.from_preset("tiny")))


# ---- reconstruction -----------------------------------------------------------------------------------------------


def test_reconstruct_accepts_pil_numpy_and_torch(pipe):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    inputs = [
        PIL.Image.fromarray(rgb),
        PIL.Image.fromarray(rgb[..., 0], mode="L"),
        PIL.Image.fromarray(np.dstack([rgb, np.full((40, 50), 128, np.uint8)]), mode="RGBA"),
        rgb,
        rgb[..., 0],
        rng.random((2, 20, 32, 3)).astype(np.float32),
        torch.rand(3, 64, 64),
        [PIL.Image.fromarray(rgb), rgb[:32, :32], torch.rand(1, 33, 47)],
    ]
    for images, count in zip(inputs, [1, 1, 1, 1, 1, 2, 1, 3]):
        out = pipe.reconstruct(images, num_tokens=K, output_type="pt")
        assert out.images.shape == (count, 3, 32, 32) and 0 <= out.images.min() <= out.images.max() <= 1
        assert out.indices.shape == (count, K) and out.source_maps.shape == (count, L)

    pil = pipe.reconstruct(PIL.Image.fromarray(rgb)).images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    images, indices, source_maps = pipe.reconstruct(rgb, output_type="np", return_dict=False)
    assert images.shape == (1, 32, 32, 3) and indices.shape == (1, pipe.vq_model.config.num_tokens)


def test_reconstruct_inputs_agree_and_round_trip_pipeline_outputs(pipe):
    generated = pipe([2], generator=seeded(), output_type="pt").images
    from_torch = pipe.reconstruct(generated, output_type="pt")
    from_numpy = pipe.reconstruct(generated.permute(0, 2, 3, 1).numpy(), output_type="pt")
    torch.testing.assert_close(from_torch.images, from_numpy.images)
    assert torch.equal(from_torch.indices, from_numpy.indices)
    grayscale = pipe.reconstruct(PIL.Image.new("L", (32, 32), 200), output_type="pt")
    same_rgb = pipe.reconstruct(PIL.Image.new("RGB", (32, 32), (200, 200, 200)), output_type="pt")
    torch.testing.assert_close(grayscale.images, same_rgb.images)


def test_reconstruct_resizes_the_shorter_side_and_crops_the_centre(pipe):
    # 64 x 128: left quarter red, middle half green, right quarter blue. Shorter side -> 32, centre 32x32 = the green.
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :32, 0], image[:, 32:96, 1], image[:, 96:, 2] = 255, 255, 255
    pixels = pipe._preprocess(PIL.Image.fromarray(image))
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels[0, :, :, 1:-1].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "images, match",
    [
        ("image.png", "must be a PIL image, a numpy array, a torch tensor"),
        ([], "empty list"),
        ([PIL.Image.new("RGB", (8, 8)), "x"], "a list of images must hold"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, r"\[0, 1\]; for \[-1, 1\] tensors pass \(x \+ 1\) / 2"),
        (torch.randint(0, 255, (3, 32, 32)), "floating point"),
        (torch.rand(1, 5, 32, 32), "C in 1, 3, 4"),
        (np.full((32, 32, 3), 2.0, np.float32), r"in \[0, 1\]"),
        (np.zeros((32, 32, 3), np.int16), "uint8 or float"),
        (np.zeros((1, 1, 32, 32, 3), np.uint8), r"\[B, H, W, C\]"),
        (np.zeros((0, 32, 3), np.uint8), "must not be empty"),
    ],
)
def test_bad_reconstruct_inputs(pipe, images, match):
    with pytest.raises(ValueError, match=match):
        pipe.reconstruct(images)


def test_reconstruct_checks_num_tokens_and_output_type(pipe):
    image = np.zeros((32, 32, 3), np.uint8)
    for bad in (0, L + 1, "16"):
        with pytest.raises(ValueError, match="1 <= K <= L = 64"):
            pipe.reconstruct(image, num_tokens=bad)
    with pytest.raises(ValueError, match="output_type"):
        pipe.reconstruct(image, output_type="latent")


# ---- dtype moves and round trips ----------------------------------------------------------------------------------


def test_save_load_round_trip_and_dtype(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vq_model"] == ["mergevq_hf.modeling_mergevq", "MergeVQModel"]
    assert index["transformer"] == ["mergevq_hf.modeling_mergear", "MergeARForCausalLM"]
    assert (tmp_path / "pipe" / "README.md").is_file()

    loaded = MergeVQPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vq_model, MergeVQModel) and isinstance(loaded.transformer, MergeARForCausalLM)
    expected = pipe([1, 9], generator=seeded(3), output_type="pt").images
    torch.testing.assert_close(loaded([1, 9], generator=seeded(3), output_type="pt").images, expected, rtol=0, atol=0)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reconstructed = loaded.reconstruct(image, output_type="pt").images
    torch.testing.assert_close(reconstructed, pipe.reconstruct(image, output_type="pt").images)

    half = MergeVQPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert half.vq_model.dtype == half.transformer.dtype == torch.bfloat16
    out = half.reconstruct(image, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def test_to_bfloat16_generates_and_reconstructs():
    pipe = tiny_pipeline().to(torch.bfloat16)
    assert pipe.vq_model.dtype == pipe.transformer.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    images = pipe([1], generator=seeded(), output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.isfinite(pipe.reconstruct(images, output_type="pt").images).all()
