"""The reproduction scripts' own code: the grid-VQ baseline adapter, its training entry, FLOP counting, the writer."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from diffusers import VQModel  # noqa: E402
from reproduce_paper import MARKERS, encoder_mflops, reconstruction_parameters, write_section  # noqa: E402
from train_grid_vq import GridVQTokenizer, build_vq_model, main as train_grid_vq  # noqa: E402

from mergevq_hf import MergeVQConfig, MergeVQModel  # noqa: E402


@pytest.fixture(scope="module")
def grid_vq():
    torch.manual_seed(0)
    return GridVQTokenizer(build_vq_model(4)).eval()


def test_grid_vq_codes_round_trip_through_the_forward(grid_vq):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = grid_vq(images)
    encoded = grid_vq.encode(images)
    assert encoded.indices.shape == (3, 16) and encoded.indices.max() < 2**10
    assert torch.equal(encoded.indices, out.indices)
    assert torch.equal(encoded.source_map[0], torch.arange(16))
    # decoding the codes alone gives the forward's reconstruction, and its loss is L1 + commitment
    torch.testing.assert_close(grid_vq.decode(encoded.indices), out.reconstruction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, (out.reconstruction - images).abs().mean() + out.commitment_loss)
    assert grid_vq.get_image_features(images).pooler_output.shape == (3, 8)


def test_grid_vq_rejects_a_token_count_it_cannot_give(grid_vq):
    with pytest.raises(ValueError, match="always gives 16 tokens"):
        grid_vq.encode(torch.zeros(1, 3, 32, 32), num_tokens=9)
    with pytest.raises(ValueError, match=r"indices must be \[B, 16\]"):
        grid_vq.decode(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="grid_size must be one of"):
        build_vq_model(2)


def test_grid_vq_trains_with_the_mergevq_trainer_and_exports_a_diffusers_folder(tmp_path):
    out = tmp_path / "grid"
    train_grid_vq([
        "--output_dir", str(out), "--grid_size", "8", "--dataset", "procedural:64", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--perceptual_loss", "none", "--discriminator_start", "1",
        "--save_steps", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ])
    loaded = GridVQTokenizer(VQModel.from_pretrained(out)).eval()
    assert loaded.config.num_tokens == 64
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded.decode(loaded.encode(images).indices).shape == (2, 3, 32, 32)


def test_merging_lowers_encoder_flops_and_recon_parameters_skip_the_alignment_head():
    torch.manual_seed(0)
    model = MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()
    flops = [encoder_mflops(model, k) for k in (64, 16, 4)]
    assert flops[0] > flops[1] > flops[2] > 0
    total = sum(p.numel() for p in model.parameters())
    aux = sum(p.numel() for p in model.encoder.dist_head.parameters()) + sum(p.numel() for p in model.source_recovery.parameters())
    assert reconstruction_parameters(model) == total - aux


def test_write_section_replaces_only_its_own_marked_block(tmp_path):
    begin, end = (marker.format(part="tokenizers") for marker in MARKERS)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    write_section(results, "tokenizers", "first table")
    write_section(results, "generation", "generation table")
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n") and f"{begin}\nfirst table\n{end}" in text
    results.write_text(text + "\nnotes after\n")
    write_section(results, "tokenizers", "second table")
    text = results.read_text()
    assert "first table" not in text and f"{begin}\nsecond table\n{end}" in text and "generation table" in text
    assert text.count(begin) == 1 and "kept text" in text and text.endswith("notes after\n")
