"""Property tests for token merging: schedule, bipartite merge, source map and canonical order."""

import pytest
import torch

from mergevq_hf.token_merging import (
    canonical_order,
    init_merge_state,
    merge_schedule,
    merge_tokens,
    proportional_attention_bias,
    source_map_to_matrix,
    unmerge,
    validate_source_map,
)


def _tokens(batch=3, num_patches=16, dim=8, has_cls=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_patches + int(has_cls), dim, generator=gen).to(dtype)


def _run(x, rs, has_cls=True, seed=1):
    """Merge through a schedule with fresh random metrics per block (as keys of a real block would be)."""
    gen = torch.Generator().manual_seed(seed)
    state = init_merge_state(x, has_cls=has_cls)
    for r in rs:
        metric = torch.randn(*x.shape[:2], 5, generator=gen)
        x, state = merge_tokens(x, metric, state, r)
    return x, state


def _counts(source_map, num_kept):
    return torch.zeros(source_map.shape[0], num_kept).scatter_add_(1, source_map, torch.ones(source_map.shape))


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "num_patches, num_kept, expected",
    [
        (1024, 256, [101, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32]),
        (256, 144, [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5]),
        (256, 36, [25, 26, 24, 23, 21, 19, 18, 16, 14, 13, 11, 10]),
    ],
)
def test_schedule_matches_released_code(num_patches, num_kept, expected):
    assert merge_schedule(num_patches, num_kept, 12) == expected


@pytest.mark.parametrize("mode", ["linear", "constant"])
def test_schedule_is_feasible_and_exact(mode):
    for num_patches in (1, 2, 5, 16, 64, 256):
        for num_kept in sorted({1, min(2, num_patches), num_patches // 3 or 1, num_patches - 1 or 1, num_patches}):
            for num_blocks in (1, 2, 3, 12):
                for inflect in (-0.5, 0.0, 0.5):
                    sched = merge_schedule(num_patches, num_kept, num_blocks, mode, inflect)
                    assert len(sched) == num_blocks
                    assert sum(sched) == num_patches - num_kept
                    assert min(sched) >= 0


def test_schedule_constant_and_zero():
    assert merge_schedule(256, 144, 12, mode="constant") == [10] * 4 + [9] * 8
    assert merge_schedule(100, 100, 4) == [0, 0, 0, 0]
    assert merge_schedule(100, 100, 4, mode="constant") == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_patches=16, num_kept=0, num_blocks=4), "num_kept"),
        (dict(num_patches=16, num_kept=17, num_blocks=4), "num_kept"),
        (dict(num_patches=16, num_kept=4, num_blocks=0), "num_blocks"),
        (dict(num_patches=16, num_kept=4, num_blocks=4, mode="square"), "mode"),
    ],
)
def test_schedule_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        merge_schedule(**kwargs)


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("has_cls", [True, False])
def test_merge_sequence_gives_valid_assignment(has_cls):
    x0 = _tokens(has_cls=has_cls)
    for num_kept in (1, 2, 5, 9, 16):
        x, state = _run(x0, merge_schedule(16, num_kept, 4), has_cls=has_cls)
        offset = int(has_cls)
        assert x.shape == (3, num_kept + offset, 8)
        assert state.sizes.shape == (3, num_kept + offset, 1)
        assert state.source_map.shape == (3, 16) and state.source_map.dtype == torch.long
        assert _counts(state.source_map, num_kept).min() >= 1  # exactly K parents, each position one parent
        assert torch.equal(state.sizes[:, offset:, 0], _counts(state.source_map, num_kept).to(state.sizes.dtype))
        assert state.sizes.sum(dim=(1, 2)).eq(16 + offset).all()
        if has_cls:
            assert torch.equal(x[:, 0], x0[:, 0])
            assert state.sizes[:, 0].eq(1).all()
        x, state = canonical_order(x, state)
        validate_source_map(state.source_map, num_kept, batch_size=3)


@pytest.mark.parametrize("r", [3, 8, 12, 15])
def test_single_block_merge_is_group_mean_and_conserves_mass(r):
    # r = 3, 8: one round; r = 12, 15: several rounds inside one call.
    x0 = _tokens(num_patches=16, dim=6, seed=r, dtype=torch.float64)
    x, state = merge_tokens(x0, x0, init_merge_state(x0), r)
    num_kept = 16 - r
    matrix = source_map_to_matrix(state.source_map, num_kept).double()
    means = matrix @ x0[:, 1:] / matrix.sum(-1, keepdim=True)
    torch.testing.assert_close(x[:, 1:], means)
    weighted = (state.sizes * x).sum(1)
    torch.testing.assert_close(weighted, x0.sum(1))


def test_multi_round_equals_consecutive_calls():
    # With unit-norm tokens as their own metric, the merged metric of round 1 is (after normalising) the merged
    # tokens, so one call with r = 12 (rounds of 8 and 4) equals two calls with r = 8 and r = 4.
    x0 = torch.nn.functional.normalize(_tokens(num_patches=16, seed=21, dtype=torch.float64), dim=-1)
    x, state = merge_tokens(x0, x0, init_merge_state(x0), 12)
    x1, state1 = merge_tokens(x0, x0, init_merge_state(x0), 8)
    x2, state2 = merge_tokens(x1, x1, state1, 4)
    assert torch.equal(state.source_map, state2.source_map)
    torch.testing.assert_close(x, x2)
    torch.testing.assert_close(state.sizes, state2.sizes)


def test_one_round_order_and_source_map():
    # Full indices 0..4 = [CLS, p0, p1, p2, p3]; A = {0, 2, 4}, B = {1, 3}.
    e = torch.eye(3, dtype=torch.float64)
    metric = torch.stack([e[0], e[0], e[1] + 0.5 * e[2], e[2], e[0]])[None]
    x = torch.arange(5, dtype=torch.float64)[None, :, None].expand(1, 5, 2)
    out, state = merge_tokens(x, metric, init_merge_state(x), 1)
    # CLS is as similar as p3 to p0 but is never merged: p3 joins p0; order is [CLS, p1 | p0+p3, p2].
    assert state.source_map.tolist() == [[1, 0, 2, 1]]
    assert out[0, :, 0].tolist() == [0.0, 2.0, 2.5, 3.0]
    assert state.sizes[0, :, 0].tolist() == [1.0, 1.0, 2.0, 1.0]


def test_r_zero_is_identity():
    x0 = _tokens()
    state0 = init_merge_state(x0)
    x, state = _run(x0, merge_schedule(16, 16, 4))
    assert torch.equal(x, x0)
    assert torch.equal(state.source_map, state0.source_map)
    assert torch.equal(state.source_map[0], torch.arange(16))
    assert torch.equal(state.sizes, torch.ones(3, 17, 1))


@pytest.mark.parametrize("has_cls", [True, False])
def test_any_k_reachable_in_one_call(has_cls):
    x0 = _tokens(has_cls=has_cls, seed=3)
    metric = _tokens(has_cls=has_cls, seed=4)
    for num_kept in range(1, 17):
        x, state = merge_tokens(x0, metric, init_merge_state(x0, has_cls), 16 - num_kept)
        assert x.shape[1] == num_kept + int(has_cls)
        assert _counts(state.source_map, num_kept).min() >= 1
        assert state.sizes.sum(dim=(1, 2)).eq(16 + int(has_cls)).all()


def test_merge_rejects_bad_r():
    x = _tokens()
    for r in (-1, 16):
        with pytest.raises(ValueError, match="r must be"):
            merge_tokens(x, x, init_merge_state(x), r)


def test_batch_rows_are_independent():
    x0 = _tokens(batch=4, seed=5)
    x, state = _run(x0, [6, 4, 3])
    for row in range(4):
        # Replay the batch's metrics, sliced to this row.
        gen = torch.Generator().manual_seed(1)
        xr, sr = x0[row : row + 1], init_merge_state(x0[row : row + 1])
        for r in (6, 4, 3):
            metric = torch.randn(4, xr.shape[1], 5, generator=gen)[row : row + 1]
            xr, sr = merge_tokens(xr, metric, sr, r)
        torch.testing.assert_close(xr, x[row : row + 1])
        assert torch.equal(sr.source_map, state.source_map[row : row + 1])
        assert torch.equal(sr.sizes, state.sizes[row : row + 1])


def test_gradient_flows_through_merge():
    x0 = _tokens(batch=2, num_patches=8, dim=3, dtype=torch.float64).requires_grad_()
    metric = _tokens(batch=2, num_patches=8, dim=4, seed=9)

    def fn(x):
        state = init_merge_state(x)
        x, state = merge_tokens(x, metric, state, 3)
        return merge_tokens(x, metric[:, : x.shape[1]], state, 3)[0]

    torch.autograd.gradcheck(fn, (x0,))
    fn(x0).sum().backward()
    assert (x0.grad > 0).all()  # every input token feeds some output


def test_bfloat16_keeps_dtype_and_exact_untouched_tokens():
    x0 = _tokens(dtype=torch.bfloat16)
    x, state = _run(x0, merge_schedule(16, 4, 3))
    assert x.dtype == torch.bfloat16 and state.sizes.dtype == torch.float32
    assert torch.equal(x[:, 0], x0[:, 0])
    x, state = canonical_order(x, state)
    validate_source_map(state.source_map, 4)


# ---------------------------------------------------------------- canonical order, unmerge, bias


def test_canonical_order_is_first_occurrence_permutation():
    x0 = _tokens(batch=4, num_patches=16, seed=7)
    x, state = _run(x0, [5, 3, 2])
    x_c, state_c = canonical_order(x, state)
    for row in state_c.source_map.tolist():
        seen = list(dict.fromkeys(row))
        assert seen == list(range(6))
    torch.testing.assert_close(unmerge(x_c[:, 1:], state_c.source_map), unmerge(x[:, 1:], state.source_map))
    torch.testing.assert_close(
        unmerge(state_c.sizes[:, 1:], state_c.source_map), unmerge(state.sizes[:, 1:], state.source_map)
    )
    assert torch.equal(x_c[:, 0], x[:, 0])
    assert sorted(x_c[0, :, 0].tolist()) == sorted(x[0, :, 0].tolist())
    x_cc, state_cc = canonical_order(x_c, state_c)  # idempotent
    assert torch.equal(x_cc, x_c) and torch.equal(state_cc.source_map, state_c.source_map)


def test_unmerge_matches_source_matrix():
    x0 = _tokens(seed=11)
    x, state = canonical_order(*_run(x0, merge_schedule(16, 7, 3)))
    matrix = source_map_to_matrix(state.source_map, 7)
    assert matrix.shape == (3, 7, 16) and matrix.sum(1).eq(1).all()
    torch.testing.assert_close(matrix.transpose(1, 2) @ x[:, 1:], unmerge(x[:, 1:], state.source_map))


def test_proportional_attention_bias():
    sizes = torch.tensor([[1.0, 2.0, 5.0]]).unsqueeze(-1)
    bias = proportional_attention_bias(sizes)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == sizes.dtype
    torch.testing.assert_close(bias.flatten(), torch.log(torch.tensor([1.0, 2.0, 5.0])))


@pytest.mark.parametrize(
    "source_map, batch_size, match",
    [
        (torch.tensor([[0.0, 1.0, 1.0]]), None, "integer"),
        (torch.tensor([0, 1, 1]), None, "2-D"),
        (torch.tensor([[0, 1, 1]]), 2, "batch size"),
        (torch.tensor([[0, 1, 2]]), None, "outside"),
        (torch.tensor([[0, -1, 1]]), None, "outside"),
        (torch.tensor([[0, 0, 0]]), None, "no position"),
        (torch.tensor([[1, 0, 1]]), None, "canonical"),
    ],
)
def test_validate_source_map_errors(source_map, batch_size, match):
    with pytest.raises(ValueError, match=match):
        validate_source_map(source_map, 2, batch_size=batch_size)
    validate_source_map(torch.tensor([[0, 1, 0, 1]]), 2, batch_size=1)  # a valid one passes

