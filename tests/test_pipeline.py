"""MergeVQPipeline: generation, reconstruction, input checks, dtype moves and save/load round trips (tiny models)."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from mergevq_hf import MergeARConfig, MergeARForCausalLM, MergeVQConfig, MergeVQModel, MergeVQPipeline
from mergevq_hf.sampling_utils import DEFAULT_GUIDANCE_SCALE, sample_rows

NUM_CLASSES, L, K = 10, 64, 16


@pytest.fixture(scope="module")
def pipe(make_tiny_pipeline):  # conftest.py: a random tiny pipeline, NUM_CLASSES classes, L = 64
    return make_tiny_pipeline()


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
    assert (calls[0]["num_tokens"], calls[0]["guidance_scale"], calls[0]["top_k"], calls[0]["top_p"]) == (9, DEFAULT_GUIDANCE_SCALE, 0, 1.0)
    assert len(calls[0]["generators"]) == 6  # one per image
    pipe(torch.tensor([5]), guidance_scale=1.0, temperature=0.5, top_k=5, top_p=0.9, output_type="np")
    assert (calls[1]["guidance_scale"], calls[1]["temperature"], calls[1]["top_k"], calls[1]["top_p"]) == (None, 0.5, 5, 0.9)
    pipe(6, guidance_scale=None, output_type="np")
    assert calls[2]["guidance_scale"] is None and calls[2]["num_tokens"] == pipe.transformer.config.num_tokens


def test_progress_bar_counts_decoding_steps_and_honours_config(make_tiny_pipeline):
    pipe = make_tiny_pipeline()
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
        (dict(class_labels=[1, 2], generator=[torch.Generator()]), "one torch.Generator per image: 2 images, got 1"),
        (dict(class_labels=[1], generator=[7]), "one torch.Generator per image"),
        (dict(class_labels=[1], generator=7), "generator must be a torch.Generator, a list of them"),
        (dict(class_labels=np.array([1.5])), "1-D integer array"),
        (dict(class_labels=np.array([[1, 2]])), "1-D integer array"),
        (dict(class_labels=[1], num_images_per_class=10_000), "10000 images, more than max_batch_size = 256"),
        (dict(class_labels=list(range(10)) * 26), "260 images, more than max_batch_size"),
        (dict(class_labels=[1], callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents"]),
         r"names from \['next_tokens'\]"),
        (dict(class_labels=[1], callback_on_step_end="print"), "callback_on_step_end must be callable"),
    ],
)
def test_bad_generation_inputs(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_components_must_match():
    vq_model = MergeVQModel(MergeVQConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="do not match"):
        MergeVQPipeline(vq_model=vq_model, transformer=MergeARForCausalLM(MergeARConfig.from_preset("tiny", grid_size=4)))


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
        assert out.indices.shape == (count, K) and out.source_map.shape == (count, L)

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
    pixels = (pipe.image_processor(PIL.Image.fromarray(image)).pixel_values + 1) / 2
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
        (torch.rand(1, 5, 32, 32), "C in 1, 2, 3, 4"),
        (np.full((32, 32, 3), 2.0, np.float32), r"in \[0, 1\]"),
        (np.zeros((32, 32, 3), np.int16), "uint8, uint16 or float"),
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
    # Up to float rounding: memory-mapped weights are not 64-byte aligned, so CPU kernels may round differently.
    torch.testing.assert_close(loaded([1, 9], generator=seeded(3), output_type="pt").images, expected, rtol=1e-5, atol=1e-5)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reconstructed = loaded.reconstruct(image, output_type="pt").images
    torch.testing.assert_close(reconstructed, pipe.reconstruct(image, output_type="pt").images)

    half = MergeVQPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert half.vq_model.dtype == half.transformer.dtype == torch.bfloat16
    out = half.reconstruct(image, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def test_to_bfloat16_generates_and_reconstructs(make_tiny_pipeline):
    pipe = make_tiny_pipeline().to(torch.bfloat16)
    assert pipe.vq_model.dtype == pipe.transformer.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    images = pipe([1], generator=seeded(), output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.isfinite(pipe.reconstruct(images, output_type="pt").images).all()


# ---- the diffusers contract: per-image generators, step callbacks, offload, bounded batches --------------------------


def tiny_random_order_pipeline(vq_model):
    from mergevq_hf import MergeRandARConfig, MergeRandARForCausalLM

    torch.manual_seed(0)
    config = MergeRandARConfig.from_preset("tiny", codebook_bits=10, factorized_bits=[4, 6], num_classes=NUM_CLASSES)
    pipe = MergeVQPipeline(vq_model=vq_model, transformer=MergeRandARForCausalLM(config).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", ["raster", "random"])
def test_each_image_depends_only_on_its_own_generator(pipe, mode):
    if mode == "random":
        pipe = tiny_random_order_pipeline(pipe.vq_model)
    alone = pipe([1], generator=[seeded(5)], output_type="pt").images
    in_a_grid = pipe([3, 1, 1], generator=[seeded(1), seeded(5), seeded(2)], output_type="pt").images
    torch.testing.assert_close(in_a_grid[1], alone[0])
    assert not torch.allclose(in_a_grid[0], in_a_grid[1]) or not torch.allclose(in_a_grid[1], in_a_grid[2])

    # One generator: image i is seeded by the i-th draw, whatever follows it.
    first = pipe([1], generator=seeded(0), output_type="pt").images
    batch = pipe([1], num_images_per_class=3, generator=seeded(0), output_type="pt").images
    torch.testing.assert_close(batch[0], first[0])


def test_sample_rows_draws_each_row_from_its_own_generator():
    probs = torch.rand(4, 50).softmax(-1)
    together = sample_rows(probs, [seeded(i) for i in range(4)])
    for i in range(4):
        alone = sample_rows(probs[i : i + 1], [seeded(i)])
        assert alone.tolist() == [together[i].item()]
    one_hot = torch.zeros(3, 5)
    one_hot[:, 2] = 1
    assert sample_rows(one_hot, [seeded(), seeded(), seeded()]).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="a list of 3 torch.Generator"):
        sample_rows(one_hot, [seeded()])
    with pytest.raises(ValueError, match="a list of 3 torch.Generator"):
        sample_rows(one_hot, seeded())


def test_numpy_integers_and_arrays_are_accepted(pipe):
    expected = pipe([1, 2], num_images_per_class=2, num_tokens=9, top_k=5, generator=seeded(), output_type="pt").images
    got = pipe(
        np.array([1, 2], dtype=np.int32), num_images_per_class=np.int64(2), num_tokens=np.int16(9), top_k=np.int64(5),
        generator=seeded(), output_type="pt",
    ).images
    torch.testing.assert_close(got, expected)
    single = pipe(np.int64(1), generator=seeded(), output_type="pt").images
    torch.testing.assert_close(single, pipe(1, generator=seeded(), output_type="pt").images)


@pytest.mark.parametrize("mode", ["raster", "random"])
def test_callback_on_step_end_sees_and_replaces_the_sampled_codes(pipe, mode):
    if mode == "random":
        pipe = tiny_random_order_pipeline(pipe.vq_model)
    steps, shapes = [], []

    def to_code_zero(current, step, timestep, callback_kwargs):
        assert current is pipe and timestep == step
        steps.append(step)
        shapes.append(tuple(callback_kwargs["next_tokens"].shape))
        return {"next_tokens": torch.zeros_like(callback_kwargs["next_tokens"])}

    images = pipe([1, 2], num_tokens=K, generator=seeded(), output_type="pt", callback_on_step_end=to_code_zero).images
    num_steps = K if mode == "random" else L
    assert steps == list(range(num_steps)) and set(shapes) == {(2,)}
    # Every sampled code was replaced by code 0, so the images are what code 0 everywhere decodes to.
    zeros = torch.zeros(2, L, dtype=torch.long)
    torch.testing.assert_close(images, pipe.image_processor.postprocess(pipe.vq_model.decode(zeros), "pt"))

    def out_of_range(current, step, timestep, callback_kwargs):
        return {"next_tokens": torch.full_like(callback_kwargs["next_tokens"], 2**10)}

    with pytest.raises(ValueError, match=r"integer codes in \[0, 1024\) at step 0"):
        pipe([1], generator=seeded(), callback_on_step_end=out_of_range)

    # A callback that returns nothing leaves sampling alone.
    expected = pipe([1], generator=seeded(), output_type="pt").images
    observed = pipe([1], generator=seeded(), output_type="pt", callback_on_step_end=lambda *args: None).images
    torch.testing.assert_close(observed, expected)


def test_diffusers_pipeline_callbacks_with_a_cutoff(pipe):
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    class ZeroCodesFromCutoff(PipelineCallback):
        tensor_inputs = ["next_tokens"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            cutoff = self.config.cutoff_step_index or int(pipeline.num_timesteps * self.config.cutoff_step_ratio)
            if step_index >= cutoff:
                callback_kwargs["next_tokens"] = torch.zeros_like(callback_kwargs["next_tokens"])
            return callback_kwargs

    seen = []

    class Record(PipelineCallback):
        tensor_inputs = ["next_tokens"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(callback_kwargs["next_tokens"].clone())
            return callback_kwargs

    callbacks = MultiPipelineCallbacks([ZeroCodesFromCutoff(cutoff_step_ratio=0.5), Record()])
    pipe([1], generator=seeded(), output_type="pt", callback_on_step_end=callbacks)
    assert pipe.num_timesteps == L and len(seen) == L
    assert all(int(codes) == 0 for codes in seen[L // 2 :])  # the replacements from step L/2 on were kept
    assert any(int(codes) != 0 for codes in seen[: L // 2])


def test_model_cpu_offload_runs_the_hooks_of_encode_decode_and_source_recovery():
    reference = tiny_random_order_pipeline(MergeVQModel(MergeVQConfig.from_preset("tiny")).eval())
    offloaded = tiny_random_order_pipeline(reference.vq_model)
    offloaded.vq_model = MergeVQModel(reference.vq_model.config).eval()
    offloaded.vq_model.load_state_dict(reference.vq_model.state_dict())
    expected = reference([1, 2], generator=seeded(), output_type="pt").images
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected_reconstruction = reference.reconstruct(image, output_type="pt").images

    offloaded.enable_model_cpu_offload(device="cpu")  # CPU as the "accelerator": the hooks run, nothing moves
    assert offloaded._execution_device.type == "cpu"
    calls = []

    def count_hook_calls():  # each call ends with maybe_free_model_hooks, which installs fresh hooks
        hook = offloaded.vq_model._hf_hook
        original = hook.pre_forward
        hook.pre_forward = lambda module, *args, **kwargs: calls.append(module) or original(module, *args, **kwargs)

    count_hook_calls()
    torch.testing.assert_close(offloaded([1, 2], generator=seeded(), output_type="pt").images, expected)
    assert len(calls) == 2  # predict_source_map, decode
    count_hook_calls()
    torch.testing.assert_close(offloaded.reconstruct(image, output_type="pt").images, expected_reconstruction)
    assert len(calls) == 4  # encode, decode


def test_max_batch_size_is_checked_before_any_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe.transformer, "generate", lambda **kwargs: pytest.fail("generate ran"))
    with pytest.raises(ValueError, match="1 class ids x 257 images per class = 257 images"):
        pipe([1], num_images_per_class=pipe.max_batch_size + 1)
    monkeypatch.setattr(pipe, "max_batch_size", 2)
    with pytest.raises(ValueError, match="more than max_batch_size = 2"):
        pipe([1, 2, 3])
