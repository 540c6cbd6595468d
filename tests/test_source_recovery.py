"""Source recovery with token positions: the hard constraints, the position-aware module, its input checks, the
fine-tuning entry point (train_source_recovery) and the pipeline handing the generated positions over."""

import json

import pytest
import torch

from mergevq_hf import MergeVQConfig, MergeVQModel, MergeVQPipeline, MergeRandARConfig, MergeRandARForCausalLM
from mergevq_hf.source_recovery import SourceRecovery
from mergevq_hf.training.train_source_recovery import (
    SourceRecoveryTrainingModel,
    collate_source_maps,
    main as train_source_recovery,
)

K = 16  # the K of the `encoded` fixture (conftest.py)


def test_token_positions_are_each_groups_first_position(encoded):
    positions = SourceRecovery.token_positions(encoded.source_map, K)
    for row, source_map in zip(positions, encoded.source_map):
        expected = [int((source_map == k).nonzero()[0]) for k in range(K)]
        assert row.tolist() == expected
    assert (positions[:, 0] == 0).all() and (positions[:, 1:] > positions[:, :-1]).all()  # canonical order


@pytest.mark.parametrize("with_positions", [False, True])
def test_predicted_maps_obey_the_position_facts_whatever_the_weights(encoded, with_positions):
    torch.manual_seed(1)
    recovery = SourceRecovery(10, 64, 32, 1, 4, 64, with_positions=with_positions)
    codes = torch.randn(len(encoded.indices), K, 10).sign()
    positions = SourceRecovery.token_positions(encoded.source_map, K)
    predicted = recovery.predict(codes, positions)
    for row, token_positions in zip(predicted, positions):
        assert row[token_positions].tolist() == list(range(K))  # every token owns its own position
        assert (token_positions[row] <= torch.arange(64)).all()  # and no position before it


def test_positions_that_miss_position_zero_still_give_every_position_a_parent():
    recovery = SourceRecovery(10, 64, 32, 1, 4, 64)
    positions = torch.tensor([[3, 10, 40]])
    logits = recovery(torch.randn(1, 3, 10), positions)
    assert torch.isfinite(logits.max(dim=-1).values).all()
    predicted = logits.argmax(-1)[0]
    assert (predicted[:3] == 0).all() and predicted[10] == 1 and predicted[40] == 2


def test_position_aware_recovery_needs_positions_and_checks_them(vq_model, encoded):
    config = MergeVQConfig.from_preset("tiny", source_recovery_with_positions=True)
    model = MergeVQModel(config).eval()
    indices = encoded.indices
    with pytest.raises(ValueError, match="trained with token positions"):
        model.predict_source_map(indices)
    good = SourceRecovery.token_positions(encoded.source_map, K)
    assert model.predict_source_map(indices, good).shape == (len(indices), 64)
    bad = {
        "float": good.float(),
        "shape": good[:, :-1],
        "not increasing": good.flip(1),
        "outside the grid": good + 64,
        "negative": good - 1,
    }
    for name, positions in bad.items():
        with pytest.raises(ValueError, match="positions must"):
            vq_model.predict_source_map(indices, positions)


def test_tokenizer_forward_trains_the_position_embedding():
    torch.manual_seed(0)
    model = MergeVQModel(MergeVQConfig.from_preset("tiny", source_recovery_with_positions=True))
    out = model(pixel_values=torch.rand(2, 3, 32, 32) * 2 - 1, num_tokens=K)
    out.source_recovery_loss.backward()
    assert torch.isfinite(out.source_recovery_loss)
    assert model.source_recovery.token_position_embed.weight.grad.abs().sum() > 0


@pytest.mark.numerics
def test_recovery_training_model_overfits_a_fixed_batch(vq_model, encoded):
    torch.manual_seed(0)
    model = SourceRecoveryTrainingModel(SourceRecovery(10, 64, 32, 1, 4, 64, with_positions=True), vq_model.quantize, True)
    batch = collate_source_maps([{"indices": i, "source_map": s} for i, s in zip(encoded.indices, encoded.source_map)])
    optimizer = torch.optim.AdamW(model.recovery.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.quantize.parameters())


def test_collate_pads_mixed_k_and_padded_tokens_win_no_position(vq_model):
    with torch.no_grad():
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        small, large = vq_model.encode(images[:1], num_tokens=9), vq_model.encode(images[1:], num_tokens=25)
    batch = collate_source_maps([
        {"indices": small.indices[0], "source_map": small.source_map[0]},
        {"indices": large.indices[0], "source_map": large.source_map[0]},
    ])
    assert batch["indices"].shape == (2, 25) and batch["token_mask"].sum(1).tolist() == [9, 25]
    model = SourceRecoveryTrainingModel(SourceRecovery(10, 64, 32, 1, 4, 64, with_positions=True), vq_model.quantize, True)
    assert (model.logits(**batch).argmax(-1)[0] < 9).all()
    with pytest.raises(ValueError, match="empty batch"):
        collate_source_maps([])


@pytest.mark.numerics
def test_entry_point_rebuilds_the_recovery_and_keeps_the_rest(tmp_path, vq_model):
    tokenizer_dir = tmp_path / "tokenizer"
    vq_model.save_pretrained(tokenizer_dir)
    out = tmp_path / "recovery"
    argv = [
        "--tokenizer", str(tokenizer_dir), "--output_dir", str(out), "--hidden_size", "32", "--num_layers", "1",
        "--num_heads", "4", "--num_token_layers", "1", "--with_positions", "true", "--dataset", "procedural:64", "--eval_split", "train",
        "--eval_samples", "16", "--num_tokens_candidates", "9", "16", "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--token_cache_dir", str(tmp_path / "cache"), "--use_cpu", "--report_to", "none", "--save_steps", "3", "--disable_tqdm", "true",
    ]
    assert train_source_recovery(argv) is not None
    assert train_source_recovery(argv + ["--resume_from_checkpoint", "last"]) is None  # finished: nothing retrained
    tuned = MergeVQModel.from_pretrained(out).eval()
    assert tuned.config.source_recovery_with_positions and tuned.config.source_recovery_hidden_size == 32
    assert tuned.config.source_recovery_num_token_layers == 1 and len(tuned.source_recovery.token_blocks) == 1
    metrics = json.loads((out / "source_recovery_eval.json").read_text())
    assert set(metrics) == {"positions_under_true_parent_k9", "positions_under_true_parent_k16"}
    assert all(0 < value <= 1 for value in metrics.values())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # encoder, quantiser and decoder untouched
        encoded = vq_model.encode(images, num_tokens=K)
        torch.testing.assert_close(tuned.encode(images, num_tokens=K).latents, encoded.latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tuned.decode(encoded.indices, encoded.source_map), vq_model.decode(encoded.indices, encoded.source_map),
                                   rtol=1e-4, atol=1e-4)


def test_random_order_pipeline_hands_the_generated_positions_to_the_recovery(vq_model, monkeypatch):
    torch.manual_seed(0)
    config = MergeRandARConfig.from_preset("tiny", codebook_bits=10, factorized_bits=[4, 6], num_classes=10)
    pipe = MergeVQPipeline(vq_model=vq_model, transformer=MergeRandARForCausalLM(config).eval())
    seen = {}
    original = type(vq_model).predict_source_map

    def spy(self, indices, positions=None):
        seen["positions"] = positions
        return original(self, indices, positions)

    monkeypatch.setattr(type(vq_model), "predict_source_map", spy)
    pipe(class_labels=[1, 2], num_tokens=9, generator=torch.Generator().manual_seed(0), output_type="pt")
    positions = seen["positions"]
    assert positions.shape == (2, 9) and (positions[:, 1:] > positions[:, :-1]).all()


def test_padding_tokens_change_nothing_for_the_real_ones():
    """A batch padded to a common K (as the fine-tune collates it) scores the real tokens as the unpadded batch does,
    through the token encoder and the cross-attention alike, and padding is never a parent."""
    torch.manual_seed(0)
    recovery = SourceRecovery(10, 64, 32, 2, 4, 64, with_positions=True, num_token_layers=2).eval()
    codes, positions = torch.randn(1, 5, 10), torch.tensor([[0, 3, 9, 20, 41]])
    alone = recovery(codes[:, :3], positions[:, :3])
    token_mask = torch.tensor([[True, True, True, False, False]])
    padded = recovery(codes, positions.masked_fill(~token_mask, 0), token_mask)
    torch.testing.assert_close(padded[..., :3], alone)
    assert torch.isneginf(padded[..., 3:]).all()
    assert len(recovery.token_blocks) == 2


def test_token_layers_are_part_of_the_config_and_checkpoint(tmp_path):
    config = MergeVQConfig.from_preset("tiny", source_recovery_with_positions=True, source_recovery_num_token_layers=1)
    model = MergeVQModel(config).eval()
    assert len(model.source_recovery.token_blocks) == 1
    model.save_pretrained(tmp_path)
    reloaded = MergeVQModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.source_recovery.token_blocks[0].mlp[0].weight, model.source_recovery.token_blocks[0].mlp[0].weight)
    with pytest.raises(ValueError, match="source_recovery_num_token_layers"):
        MergeVQConfig.from_preset("tiny", source_recovery_num_token_layers=-1)
    with pytest.raises(TypeError, match="source_recovery_num_token_layers"):
        MergeVQConfig.from_preset("tiny", source_recovery_num_token_layers=1.5)


def test_forward_can_decode_through_the_predicted_map(vq_model):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        true = vq_model(images, num_tokens=K)
        predicted = vq_model(images, num_tokens=K, decode_source_map="predicted")
        predicted_map = true.source_logits.argmax(-1)
        assert not torch.equal(predicted_map, true.source_map)  # an untrained recovery: wrong somewhere
        torch.testing.assert_close(predicted.reconstruction, vq_model.decode_codes(true.codes, predicted_map))
    torch.testing.assert_close(predicted.source_map, true.source_map)  # the output keeps the true map
    assert not torch.allclose(predicted.reconstruction, true.reconstruction)
    with pytest.raises(ValueError, match="decode_source_map must be 'true' or 'predicted'"):
        vq_model(images, num_tokens=K, decode_source_map="soft")
    without_recovery = MergeVQModel(MergeVQConfig.from_preset("tiny", use_source_recovery=False)).eval()
    with pytest.raises(ValueError, match="needs a source recovery"):
        without_recovery(images, num_tokens=K, decode_source_map="predicted")
