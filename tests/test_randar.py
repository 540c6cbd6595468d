"""MergeRandAR: random-order training examples, cached generation vs recomputation, batched CFG, source recovery at
generation time, pipeline modes and their save/load round trips, input errors (tiny random models)."""

import datasets
import pytest
import torch
from torch import nn

from mergevq_hf import (
    MergeARConfig,
    MergeARForCausalLM,
    MergeRandARConfig,
    MergeRandARForCausalLM,
    MergeVQConfig,
    MergeVQModel,
    MergeVQPipeline,
)
from mergevq_hf.training.trainer_randar import MergeRandARTokenDataset, collate_random_order, first_positions

NUM_CLASSES, L, K = 10, 64, 16


def tiny_randar(seed=0, **overrides):
    torch.manual_seed(seed)
    config = MergeRandARConfig.from_preset(
        "tiny", **{"codebook_bits": 10, "factorized_bits": [4, 6], "num_classes": NUM_CLASSES, **overrides}
    )
    return with_random_heads(MergeRandARForCausalLM(config).eval())


def with_random_heads(model):
    """The heads start at zero (uniform predictions); random heads make greedy decoding and guidance real tests."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            nn.init.normal_(module.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_randar()


def codes_at_slots(model, class_labels, codes, order):
    """No-cache recomputation: code logits at every P slot and position logits at every position slot."""
    input_ids, grid = model.build_sequence(class_labels, codes, order)
    out = model(input_ids=input_ids, grid_positions=grid)
    position_logits = torch.cat([out.position_logits[:, 1:2], out.position_logits[:, 2:-1:2]], 1)
    return out.logits[:, 2::2], position_logits


# ---- training examples ---------------------------------------------------------------------------------------------


def test_tokenizer_order_is_canonical_and_first_positions(encoded):
    for source_map in encoded.source_map:
        first = first_positions(source_map, K)
        assert first[0] == 0 and bool((first[1:] > first[:-1]).all())  # canonical: by first grid position
        assert torch.equal(source_map[first], torch.arange(K))  # each first position belongs to its own group
        for k in range(K):
            assert int((source_map == k).nonzero().min()) == int(first[k])


def test_position_instructions_follow_the_permutation(model, encoded):
    tokens = datasets.Dataset.from_dict({
        "label": [3, 5],
        "indices": [[encoded.indices[i].tolist()] for i in range(2)],
        "source_map": [[encoded.source_map[i].tolist()] for i in range(2)],
    })
    dataset = MergeRandARTokenDataset(tokens, [K], seed=1)
    example = dataset[0]
    labels, positions = example["labels"], example["token_positions"]
    first = first_positions(encoded.source_map[0], K)
    assert sorted(positions.tolist()) == first.tolist()
    assert not torch.equal(positions, first)  # permuted (16! orders: the identity is practically impossible)
    for code, position in zip(labels, positions):  # each code keeps its own group's position
        assert code == encoded.indices[0, int((first == position).nonzero())]
    assert torch.equal(dataset[0]["labels"], labels)  # deterministic per (seed, epoch, index)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["token_positions"], positions)

    input_ids, grid = model.build_sequence([example["class_labels"]], labels[None], positions[None])
    base = model.model.position_base
    assert input_ids.shape == (1, 2 * K + 1)
    assert torch.equal(input_ids[0, 2::2] - base, positions)  # P(p_n) before y_n ...
    assert torch.equal(input_ids[0, 3::2], labels[:-1])  # ... and y_n right after it
    assert torch.equal(grid[0, 2::2], positions) and torch.equal(grid[0, 3::2], positions[:-1])
    assert grid[0, :2].tolist() == [0, 0]


def test_collate_pads_mixed_k_and_padding_changes_nothing(model):
    short = {"class_labels": 1, "labels": torch.tensor([5, 6, 7]), "token_positions": torch.tensor([0, 9, 4])}
    long = {"class_labels": 2, "labels": torch.arange(K), "token_positions": torch.randperm(L)[:K]}
    batch = collate_random_order([short, long])
    assert batch["labels"].shape == (2, K) and batch["labels"][0, 3:].eq(-100).all()
    with torch.no_grad():
        padded = model(**batch).position_logits[0, :3]
        alone = model(**collate_random_order([short])).position_logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)  # causal: padding is never seen


def test_training_loss_decreases():
    model = tiny_randar(seed=1).train()
    codes = torch.randint(0, 1024, (4, K))
    positions = torch.stack([torch.randperm(L)[:K] for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(class_labels=[0, 1, 2, 3], labels=codes, token_positions=positions)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert out.code_loss is not None and out.position_loss is not None


def test_stock_trainer_step(tmp_path, encoded):
    from mergevq_hf.training.trainer_mergear import MergeARTrainer, MergeARTrainingArguments

    tokens = datasets.Dataset.from_dict({
        "label": list(range(6)),
        "indices": [[encoded.indices[i, :9].tolist(), encoded.indices[i].tolist()] for i in range(6)],
        "source_map": [[encoded.source_map[i].clamp(max=8).tolist(), encoded.source_map[i].tolist()] for i in range(6)],
    })
    train = MergeRandARTokenDataset(tokens, [9, K], seed=0)
    args = MergeARTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2,
                                    per_device_train_batch_size=3, logging_steps=1, save_strategy="no")
    trainer = MergeARTrainer(model=tiny_randar().train(), args=args, train_dataset=train,
                             data_collator=collate_random_order)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


# ---- generation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given_order", [False, True])
def test_cached_generation_equals_no_cache_recomputation(model, given_order):
    labels = [2, 7]
    order = torch.stack([torch.randperm(L)[:K] for _ in labels]) if given_order else None
    out = model.generate(labels, num_tokens=K, positions=order, do_sample=False, output_scores=True)
    if given_order:
        assert torch.equal(out.generation_order, order)
    with torch.no_grad():
        code_logits, position_logits = codes_at_slots(model, labels, out.generated_tokens, out.generation_order)
    torch.testing.assert_close(out.scores, code_logits.float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(code_logits.argmax(-1), out.generated_tokens)  # token for token
    if not given_order:  # position 0 first (every tokenised image holds it), then the position head's greedy choices
        assert (out.generation_order[:, 0] == 0).all()
        used = torch.zeros(len(labels), L, dtype=torch.bool)
        used[:, 0] = True
        for step in range(1, K):
            choice = position_logits[:, step].masked_fill(used, float("-inf")).argmax(-1)
            assert torch.equal(choice, out.generation_order[:, step])
            used[torch.arange(len(labels)), choice] = True
    # Canonical output: sorted positions, codes moved with them.
    assert torch.equal(out.positions, out.generation_order.sort(1).values)
    for row in range(len(labels)):
        by_position = dict(zip(out.generation_order[row].tolist(), out.generated_tokens[row].tolist()))
        assert out.image_tokens[row].tolist() == [by_position[p] for p in out.positions[row].tolist()]


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_batched_cfg_equals_two_forward_reference(model, schedule):
    labels, scale = [1, 4], 3.0
    out = model.generate(
        labels, num_tokens=K, guidance_scale=scale, guidance_schedule=schedule, do_sample=False, output_scores=True
    )
    with torch.no_grad():
        cond, _ = codes_at_slots(model, labels, out.generated_tokens, out.generation_order)
        uncond, _ = codes_at_slots(model, [NUM_CLASSES] * 2, out.generated_tokens, out.generation_order)
    scales = torch.full((K,), scale) if schedule == "constant" else torch.linspace(1, scale, K)
    expected = uncond + scales[None, :, None] * (cond - uncond)
    torch.testing.assert_close(out.scores, expected.float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(out.generated_tokens, expected.argmax(-1))


def sub_token_logits_at_slots(model, class_labels, codes, order):
    """No-cache recomputation of both sub-tokens' logits at every P slot, the high bits' given the codes' low bits."""
    input_ids, grid = model.build_sequence(class_labels, codes, order)
    hidden = model.model(input_ids, grid).last_hidden_state[:, 2::2]
    low_logits, head_cache = model.lm_head.predict_low(hidden.flatten(0, 1))
    high_logits = model.lm_head.predict_high(codes.flatten() % 2**model.lm_head.low_bits, head_cache)
    return low_logits.view(*codes.shape, -1), high_logits.view(*codes.shape, -1)


@pytest.mark.parametrize("scale, schedule", [(None, "constant"), (3.0, "constant"), (3.0, "linear")])
def test_sub_token_sampling_guides_each_sub_token(model, scale, schedule):
    # Sampling with a factorised head draws the low bits, then the high bits given them (the default), and
    # guidance acts on each sub-token's logits: check both against a recomputation without cache.
    labels = [1, 4]
    out = model.generate(labels, num_tokens=K, guidance_scale=scale, guidance_schedule=schedule, output_scores=True,
                         generator=torch.Generator().manual_seed(0))
    assert out.scores is None and out.low_scores.shape == (2, K, 16) and out.high_scores.shape == (2, K, 64)
    with torch.no_grad():
        cond = sub_token_logits_at_slots(model, labels, out.generated_tokens, out.generation_order)
        uncond = sub_token_logits_at_slots(model, [NUM_CLASSES] * 2, out.generated_tokens, out.generation_order)
    scales = torch.full((K,), scale or 1.0) if schedule == "constant" else torch.linspace(1, scale, K)
    for recorded, c, u in zip((out.low_scores, out.high_scores), cond, uncond):
        expected = u + scales[None, :, None] * (c - u)
        torch.testing.assert_close(recorded, expected.float(), atol=1e-4, rtol=1e-4)
    # Greedy per sub-token takes the arg-max of each.
    greedy = model.generate(labels, num_tokens=K, positions=out.generation_order, do_sample=False,
                            sampling="sub_token", output_scores=True)
    low, high = greedy.generated_tokens % 16, greedy.generated_tokens // 16
    assert torch.equal(low, greedy.low_scores.argmax(-1)) and torch.equal(high, greedy.high_scores.argmax(-1))


def test_sub_token_and_joint_sampling_draw_from_the_same_distribution():
    # Without guidance or filters, drawing the low bits and then the high bits given them is an exact draw from
    # the joint: compare the mean log-probability of the draws and their low-bit histogram with the exact joint.
    model = tiny_randar()
    with torch.no_grad():  # flatten the low bits (the random head puts ~0.98 on one value), so a wrong draw shows
        model.lm_head.low_head.weight.mul_(0.1)
    rows = 6000
    labels = [5] * rows
    joint = model.generate(labels[:1], positions=[0], do_sample=False, output_scores=True).scores[0, 0]
    log_probs = joint.log_softmax(-1)
    low_marginal = log_probs.exp().view(64, 16).sum(0)  # code = (high << 4) | low
    expected_log_prob = (log_probs.exp() * log_probs).sum()
    for sampling in ("sub_token", "joint"):
        codes = model.generate(labels, positions=[0], sampling=sampling,
                               generator=torch.Generator().manual_seed(0)).generated_tokens[:, 0]
        histogram = torch.bincount(codes % 16, minlength=16).float() / rows
        assert float((histogram - low_marginal).abs().sum()) / 2 < 0.045, sampling
        torch.testing.assert_close(log_probs[codes].mean(), expected_log_prob, atol=0.1, rtol=0)


def test_sampling_is_seeded(model):
    def run(seed):
        return model.generate([3, 3], num_tokens=K, top_k=20, top_p=0.9, temperature=1.2, guidance_scale=1.5,
                              generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.generated_tokens, b.generated_tokens) and torch.equal(a.generation_order, b.generation_order)
    assert not torch.equal(a.generation_order, c.generation_order)
    assert all(len(set(row.tolist())) == K for row in a.generation_order)  # K distinct positions


def test_predicted_source_maps_are_valid_assignments(model, vq_model):
    out = model.generate([0, 5, 9], num_tokens=K, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source_map = vq_model.predict_source_map(out.image_tokens)
        images = vq_model.decode(out.image_tokens, source_map)
    assert source_map.shape == (3, L) and source_map.dtype == torch.long  # one parent per position
    assert int(source_map.min()) >= 0 and int(source_map.max()) < K
    assert images.shape == (3, 3, 32, 32)


# ---- pipeline ------------------------------------------------------------------------------------------------------


def pipelines(vq_model):
    torch.manual_seed(0)
    raster = with_random_heads(MergeARForCausalLM(MergeARConfig.from_preset(
        "tiny", codebook_bits=10, factorized_bits=[4, 6], num_classes=NUM_CLASSES)).eval())
    return {"raster": MergeVQPipeline(vq_model=vq_model, transformer=raster),
            "random": MergeVQPipeline(vq_model=vq_model, transformer=tiny_randar())}


@pytest.mark.parametrize("mode", ["raster", "random"])
def test_pipeline_modes_round_trip_through_save_load(vq_model, tmp_path, mode):
    from transformers import AutoModel, AutoModelForCausalLM

    pipe = pipelines(vq_model)[mode]
    pipe.set_progress_bar_config(disable=True)
    assert pipe.generation_mode == mode
    kwargs = dict(class_labels=[1, 2], output_type="pt", num_tokens=K, guidance_scale=2.0)
    if mode == "random":
        kwargs["guidance_schedule"] = "linear"
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.save_pretrained(tmp_path)
    loaded = MergeVQPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_mode == mode and type(loaded.transformer) is type(pipe.transformer)
    after = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(after, before)
    assert after.shape == (2, 3, 32, 32)
    auto_class = AutoModel if mode == "random" else AutoModelForCausalLM  # random order does not use GenerationMixin
    component = auto_class.from_pretrained(tmp_path, subfolder="transformer")
    assert type(component) is type(pipe.transformer)


@pytest.mark.parametrize("mode", ["raster", "random"])
def test_pipeline_passes_sampling_and_guidance_schedule_to_the_generator(vq_model, mode):
    pipe = pipelines(vq_model)[mode]
    pipe.set_progress_bar_config(disable=True)

    def images(**kwargs):
        return pipe([1, 2], output_type="pt", num_tokens=K, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    default = images()
    torch.testing.assert_close(images(sampling="sub_token"), default)  # a factorised head samples per sub-token
    assert not torch.allclose(images(sampling="joint"), default)
    torch.testing.assert_close(images(guidance_schedule="constant"), default)
    assert not torch.allclose(images(guidance_schedule="linear"), default)


def test_random_mode_hub_export_carries_the_code(vq_model, tmp_path):
    import json

    from mergevq_hf import export_for_hub

    export_for_hub(pipelines(vq_model)["random"], tmp_path)
    files = {path.name for path in (tmp_path / "transformer").iterdir()}
    assert {"modeling_randar.py", "configuration_randar.py", "modeling_mergear.py"} <= files
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_randar.MergeRandARForCausalLM"


# ---- errors --------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(model, vq_model):
    codes, order = torch.randint(0, 1024, (1, K)), torch.randperm(L)[:K][None]
    cases = [
        (lambda: model.generate([NUM_CLASSES + 1]), "class_labels"),
        (lambda: model.generate([1.5]), "class_labels must be an int or a list of ints"),
        (lambda: model.generate([1], num_tokens=0), "num_tokens"),
        (lambda: model.generate([1], num_tokens=L + 1), "num_tokens"),
        (lambda: model.generate([1], positions=[0, 3, 3]), "repeat"),
        (lambda: model.generate([1], positions=[0, L]), "grid positions"),
        (lambda: model.generate([1], num_tokens=4, positions=[0, 1, 2]), "disagrees"),
        (lambda: model.generate([1, 2], positions=torch.zeros(3, 2, dtype=torch.long)), "positions must be"),
        (lambda: model.generate([1], temperature=0), "temperature"),
        (lambda: model.generate([1], guidance_scale=2.0, guidance_schedule="cosine"), "guidance_schedule"),
        (lambda: model.generate([1], top_p=1.5), "top_p"),
        (lambda: model.generate([1], sampling="exact"), "sampling must be"),
        (lambda: tiny_randar(factorized_bits=None).generate([1], sampling="sub_token"), "needs a factorised head"),
        (lambda: model(class_labels=[1], labels=codes), "together"),
        (lambda: model(class_labels=[1], labels=codes, token_positions=order[:, :-1]), "both be"),
        (lambda: model(class_labels=[1, 2], labels=codes, token_positions=order), "rows"),
        (lambda: model(class_labels=[1], labels=codes + 1024, token_positions=order), "image codes"),
        (lambda: model(class_labels=[1], labels=codes, token_positions=order.masked_fill(order == order[0, 3], -100)),
         "same places"),
        (lambda: model(class_labels=[1], labels=codes.float(), token_positions=order), "integer"),
        (lambda: model(input_ids=codes), "input_ids and grid_positions"),
        (lambda: model(input_ids=codes + 10**6, grid_positions=order), "valid MergeRandAR ids"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    pipes = pipelines(vq_model)
    with pytest.raises(ValueError, match="guidance_schedule must be"):
        pipes["raster"]([1], guidance_schedule="cosine")
    with pytest.raises(ValueError, match="guidance_schedule must be"):
        pipes["random"]([1], guidance_schedule="cosine")
    with pytest.raises(ValueError, match="sampling must be"):
        pipes["random"]([1], sampling="exact")
    no_recovery = MergeVQModel(MergeVQConfig.from_preset("tiny", use_source_recovery=False))
    with pytest.raises(ValueError, match="use_source_recovery"):
        MergeVQPipeline(vq_model=no_recovery, transformer=model)
    with pytest.raises(ValueError, match="position_loss_weight"):
        MergeRandARConfig.from_preset("tiny", position_loss_weight=-1.0)


# ---- what MergeRandAR shares with MergeAR ---------------------------------------------------------------------------


def test_checkpoint_is_mergears_plus_the_position_tables():
    # Module paths are the checkpoint format: the shared backbone and code head must keep MergeAR's keys and shapes.
    for factorized_bits in ([4, 6], None):
        sizes = dict(codebook_bits=10, factorized_bits=factorized_bits, num_classes=NUM_CLASSES)
        raster = MergeARForCausalLM(MergeARConfig.from_preset("tiny", **sizes)).state_dict()
        random = MergeRandARForCausalLM(MergeRandARConfig.from_preset("tiny", **sizes)).state_dict()
        assert set(random) == set(raster) | {"model.embed_position.weight", "position_head.weight"}
        assert all(random[name].shape == raster[name].shape for name in raster)


def test_label_dropout_swaps_the_class_for_the_null_class():
    model = tiny_randar(class_dropout_prob=0.99)
    prompt = torch.stack([torch.full((64,), 1024 + 1), torch.full((64,), model.model.merge_base + K)], 1)
    null = model.model.embed_class.weight[NUM_CLASSES]
    model.train()
    assert torch.isclose(model.model.embed(prompt)[:, 0], null).all(-1).float().mean() > 0.8
    model.eval()
    assert not torch.isclose(model.model.embed(prompt)[:, 0], null).all(-1).any()


@pytest.mark.parametrize(
    "bad", [dict(temperature=0), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=2.0), dict(top_p=1.5),
            dict(guidance_scale=-1.0), dict(guidance_scale=float("inf"))],
)
def test_both_generators_and_the_pipeline_check_sampling_arguments_alike(model, vq_model, bad):
    def message(call):
        with pytest.raises(ValueError) as raised:
            call()
        return str(raised.value).rstrip(".")

    expected = message(lambda: model.generate([1], **bad))
    raster = pipelines(vq_model)["raster"]
    assert message(lambda: raster.transformer.generate(class_labels=[1], do_sample=True, **bad)) == expected
    assert message(lambda: raster([1], **bad)) == expected


FRESH_PROCESS = """
import importlib.abc, sys

class BlockMergeVQ(importlib.abc.MetaPathFinder):  # the package is installed (editable): hide it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mergevq_hf":
            raise ImportError("mergevq_hf is not available in this process")

sys.meta_path.insert(0, BlockMergeVQ())
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert pipe.generation_mode == "random", pipe.generation_mode
images = pipe([1, 2], num_tokens=16, generator=torch.Generator().manual_seed(0), output_type="pt").images
torch.save(images, sys.argv[2])
"""


def test_random_mode_export_loads_without_the_package(vq_model, tmp_path):
    import os
    import subprocess
    import sys

    from mergevq_hf import export_for_hub

    pipe = pipelines(vq_model)["random"]
    pipe.set_progress_bar_config(disable=True)
    folder = export_for_hub(pipe, tmp_path / "export")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "out.pt")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    expected = pipe([1, 2], num_tokens=16, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)
