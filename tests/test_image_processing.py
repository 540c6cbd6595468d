"""MergeVQImageProcessor: PIL modes read faithfully, sizes bounded before resizing, save/load and Auto registration."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from mergevq_hf import MergeVQImageProcessor, MergeVQPipeline
from mergevq_hf.bundled import bundled_model_path

SIZE = 32


@pytest.fixture(scope="module")
def processor():
    return MergeVQImageProcessor(image_size=SIZE)


def unit(processor, image) -> torch.Tensor:
    """pixel_values back in [0, 1]."""
    return (processor(image).pixel_values + 1) / 2


def test_output_is_channels_first_in_minus_one_one(processor):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = processor([PIL.Image.fromarray(rgb), rgb, torch.rand(3, 64, 48)])
    assert out.pixel_values.shape == (3, 3, SIZE, SIZE) and out.pixel_values.dtype == torch.float32
    assert -1 <= out.pixel_values.min() and out.pixel_values.max() <= 1
    as_numpy = processor(rgb, return_tensors="np").pixel_values
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_allclose(as_numpy, out.pixel_values[1:2].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="return_tensors must be 'pt' or 'np'"):
        processor(rgb, return_tensors="tf")


def test_sixteen_bit_greyscale_keeps_its_brightness(processor):
    # Mid-grey in 16 bits is 32768; PIL's RGB conversion clips it to 255 (white).
    grey16 = np.full((SIZE, SIZE), 32768, dtype=np.uint16)
    image = PIL.Image.fromarray(grey16)
    assert image.mode.startswith("I;16")
    torch.testing.assert_close(unit(processor, image), torch.full((1, 3, SIZE, SIZE), 32768 / 65535))
    torch.testing.assert_close(unit(processor, grey16), torch.full((1, 3, SIZE, SIZE), 32768 / 65535))
    as_int32 = PIL.Image.fromarray(grey16.astype(np.int32))  # mode "I", as some decoders open 16-bit files
    assert as_int32.mode == "I"
    torch.testing.assert_close(unit(processor, as_int32), torch.full((1, 3, SIZE, SIZE), 32768 / 65535))
    as_float = PIL.Image.fromarray(np.full((SIZE, SIZE), 51.0, dtype=np.float32))  # mode "F": 0..255 greyscale
    torch.testing.assert_close(unit(processor, as_float), torch.full((1, 3, SIZE, SIZE), 0.2))


def test_transparency_is_composited_on_the_background():
    white = MergeVQImageProcessor(image_size=SIZE)
    black = MergeVQImageProcessor(image_size=SIZE, background_color=(0, 0, 0))
    # Fully transparent red: what shows is the background, not the red stored under alpha 0.
    rgba = PIL.Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 0))
    torch.testing.assert_close(unit(white, rgba), torch.ones(1, 3, SIZE, SIZE))
    torch.testing.assert_close(unit(black, rgba), torch.zeros(1, 3, SIZE, SIZE))
    half = PIL.Image.new("LA", (SIZE, SIZE), (0, 128))  # black at alpha 128/255 over white
    torch.testing.assert_close(unit(white, half), torch.full((1, 3, SIZE, SIZE), 1 - 128 / 255), atol=1e-6, rtol=0)
    palette = PIL.Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.info["transparency"] = 0
    torch.testing.assert_close(unit(white, palette), torch.ones(1, 3, SIZE, SIZE))
    four_channels = np.zeros((SIZE, SIZE, 4), np.uint8)  # arrays with alpha too
    torch.testing.assert_close(unit(white, four_channels), torch.ones(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "RGB"])
def test_other_modes_convert_like_pillow(processor, mode):
    image = PIL.Image.new("RGB", (SIZE, SIZE), (200, 120, 40)).convert(mode)
    expected = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    torch.testing.assert_close(unit(processor, image), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(1, 300_000), (1, 4_000_000), (300_000, 1), (5, 41)])
def test_extreme_aspect_ratios_are_refused_before_resizing(processor, size):
    width, height = size
    with pytest.raises(ValueError, match="times longer than wide; at most 8:1"):
        processor(PIL.Image.new("L", (width, height)))
    with pytest.raises(ValueError, match="times longer than wide"):
        processor(np.zeros((height, width), np.uint8))


def test_too_many_pixels_and_empty_images_are_refused():
    processor = MergeVQImageProcessor(image_size=SIZE, max_input_pixels=64 * 64)
    with pytest.raises(ValueError, match="65x64 image has 4,160 pixels; at most 4,096"):
        processor(np.zeros((64, 65), np.uint8))
    with pytest.raises(ValueError, match="must not be empty"):
        processor(torch.zeros(3, 0, 5))
    assert processor(np.zeros((64, 64), np.uint8)).pixel_values.shape == (1, 3, SIZE, SIZE)


def test_within_the_bounds_any_aspect_ratio_gives_the_centre_square(processor):
    strip = np.zeros((10, 80, 3), np.uint8)  # 8:1, the limit
    strip[:, 35:45] = 255
    pixels = unit(processor, strip)
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels[0, :, :, 12:20].mean() > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size must be a positive integer"),
        (dict(resample="lanczos"), "resample must be one of"),
        (dict(background_color=(0, 0)), "background_color must be three integers"),
        (dict(max_aspect_ratio=0.5), "max_aspect_ratio must be a number >= 1"),
        (dict(max_input_pixels=2.5), "max_input_pixels must be a positive integer"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeVQImageProcessor(**kwargs)


def test_postprocess_output_types(processor):
    decoded = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    pil = processor.postprocess(decoded)
    array = processor.postprocess(decoded, "np")
    tensor = processor.postprocess(decoded, "pt")
    assert len(pil) == 2 and pil[0].size == (SIZE, SIZE) and array.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array)
    np.testing.assert_array_equal(np.asarray(pil[1]), (array[1] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="output_type must be one of"):
        processor.postprocess(decoded, "latent")


def test_save_load_and_auto_image_processor(tmp_path):
    processor = MergeVQImageProcessor(image_size=SIZE, background_color=(0, 0, 0), max_aspect_ratio=4)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MergeVQImageProcessor" and saved["max_aspect_ratio"] == 4
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MergeVQImageProcessor
    assert (loaded.image_size, loaded.background_color, loaded.max_aspect_ratio) == (SIZE, [0, 0, 0], 4.0)


def test_bundled_model_ships_its_processor():
    folder = bundled_model_path()
    if folder is None:
        pytest.skip("no bundled model in this installation")
    processor = AutoImageProcessor.from_pretrained(folder / "vq_model")
    assert type(processor) is MergeVQImageProcessor and processor.image_size == 32


def test_pipeline_saves_and_reloads_its_processor(tmp_path):
    from mergevq_hf.defaults import build_tiny_random_pipeline

    pipe = build_tiny_random_pipeline()
    pipe.image_processor = MergeVQImageProcessor(image_size=SIZE, background_color=(0, 0, 0))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "vq_model" / "preprocessor_config.json").is_file()
    loaded = MergeVQPipeline.from_pretrained(tmp_path)
    assert loaded.image_processor.background_color == [0, 0, 0]

    config = json.loads((tmp_path / "vq_model" / "preprocessor_config.json").read_text())
    config["image_size"] = 64
    (tmp_path / "vq_model" / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_size=64 but the tokenizer expects 32x32 images"):
        MergeVQPipeline.from_pretrained(tmp_path)


def test_hub_export_carries_the_processor_code(tmp_path):
    from mergevq_hf import export_for_hub
    from mergevq_hf.defaults import build_tiny_random_pipeline

    folder = export_for_hub(build_tiny_random_pipeline(), tmp_path / "export")
    config = json.loads((folder / "vq_model" / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_mergevq.MergeVQImageProcessor"}
    # diffusers copies the pipeline's direct sibling imports; transformers resolves auto_map from the root too.
    assert (folder / "vq_model" / "image_processing_mergevq.py").is_file()
    assert (folder / "image_processing_mergevq.py").is_file()


def test_training_transform_reads_sixteen_bit_grey_like_the_processor(processor):
    from mergevq_hf.training.data import ImageTransform

    dark = PIL.Image.fromarray(np.full((SIZE, SIZE), 8000, dtype=np.uint16))  # 12% of full scale
    trained_on = ImageTransform(size=SIZE).image_to_tensor(dark)
    torch.testing.assert_close(trained_on, processor(dark).pixel_values[0], atol=2 / 255, rtol=0)


def test_a_mode_pillow_cannot_convert_is_a_clear_error(processor):
    with pytest.raises(ValueError, match="PIL images in mode La cannot be converted to RGB"):
        processor(PIL.Image.new("La", (SIZE, SIZE)))


def test_training_transform_refuses_a_thin_strip_before_resizing():
    from mergevq_hf.training.data import ImageTransform

    with pytest.raises(ValueError, match="times longer than wide; at most 8:1"):
        ImageTransform(size=SIZE).image_to_tensor(PIL.Image.new("L", (300_000, 1)))
