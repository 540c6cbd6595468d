"""Token merging for the MergeVQ encoder: bipartite soft matching, size-weighted merge and source tracking.

Clean-room implementation written from the method description (paper §3.1; our readings in docs/design.md §1.2).
The source map stores, for every original patch position, the index of its current parent among the
current patch tokens; it replaces the dense [K, L] source matrix S (see :func:`source_map_to_matrix`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MergeState:
    """Per-token sizes [B, T, 1] (CLS included when ``has_cls``) and the source map [B, L]."""

    sizes: torch.Tensor
    source_map: torch.Tensor
    has_cls: bool


def merge_schedule(
    num_patches: int, num_kept: int, num_blocks: int, mode: str = "linear", inflect: float = -0.5
) -> list[int]:
    """Per-block merge counts r_l that take ``num_patches`` tokens down to exactly ``num_kept``.

    ``"linear"`` reproduces the released code (r_l from (1 - inflect)·r to (1 + inflect)·r, remainder on
    block 0 when inflect < 0); ``"constant"`` is the paper's K = L - rN with the remainder on the first blocks.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_kept < 1:
        raise ValueError(f"num_kept must be >= 1, got {num_kept}")
    if num_kept > num_patches:
        raise ValueError(f"num_kept ({num_kept}) must not exceed num_patches ({num_patches})")
    if mode not in ("linear", "constant"):
        raise ValueError(f"mode must be 'linear' or 'constant', got {mode!r}")
    total = num_patches - num_kept
    if mode == "constant":
        base, extra = divmod(total, num_blocks)
        return [base + (block < extra) for block in range(num_blocks)]
    r = math.ceil(total / num_blocks)
    lo = int(r * (1 - inflect))
    hi = 2 * r - lo
    denom = max(num_blocks - 1, 1)
    raw = [int(lo + (hi - lo) * block / denom) for block in range(num_blocks)]
    raw[0 if inflect < 0 else -1] += total - sum(raw)
    # Make it feasible: never negative, never below num_kept; the deficit moves on to later blocks and the
    # last block takes whatever is left (merge_tokens runs several matching rounds when r_l is large).
    schedule, carry, tokens = [], 0, num_patches
    for want in raw[:-1]:
        want += carry
        r_l = min(max(want, 0), tokens - num_kept)
        carry, tokens = want - r_l, tokens - r_l
        schedule.append(r_l)
    schedule.append(total - sum(schedule))
    return schedule


def init_merge_state(x: torch.Tensor, has_cls: bool = True) -> MergeState:
    """Unit sizes and the identity source map for tokens ``x`` [B, T, C].

    Sizes are kept in at least float32: bfloat16 cannot count above 256 exactly.
    """
    batch, tokens, _ = x.shape
    num_patches = tokens - int(has_cls)
    sizes = torch.ones(batch, tokens, 1, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    source_map = torch.arange(num_patches, device=x.device).expand(batch, num_patches).clone()
    return MergeState(sizes=sizes, source_map=source_map, has_cls=has_cls)


def _match(metric: torch.Tensor, r: int, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite round: (unmerged A indices sorted, merged A indices, their B partners), all [B, ·]."""
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    if has_cls:
        scores[:, 0] = -math.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values
    return unmerged, src, partner.gather(1, src)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of t [B, T, C] at index [B, N] -> [B, N, C]."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def _weighted_merge(t, sizes, unmerged, src, dst):
    """Apply one round's plan to t [B, T, C]: size-weighted mean of each B token and the A tokens merged in."""
    a, b = t[:, ::2], t[:, 1::2]
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    size_src = _take(size_a, src)
    total = (b * size_b).scatter_add(1, dst[..., None].expand(-1, -1, t.shape[-1]), _take(a, src) * size_src)
    new_size_b = size_b.scatter_add(1, dst[..., None], size_src)
    merged = torch.cat([_take(a, unmerged), total / new_size_b], dim=1)
    return merged, torch.cat([_take(size_a, unmerged), new_size_b], dim=1)


def merge_tokens(
    x: torch.Tensor, metric: torch.Tensor, state: MergeState, r: int
) -> tuple[torch.Tensor, MergeState]:
    """Merge exactly ``r`` patch tokens of ``x`` [B, T, C] using ``metric`` [B, T, C'] (e.g. head-mean keys).

    Runs several bipartite rounds when r exceeds what one round allows (half the patch tokens).
    Matching is gradient-free; the merge of ``x`` is differentiable.
    """
    offset = int(state.has_cls)
    num_patches = x.shape[1] - offset
    if r < 0 or r > num_patches - 1:
        raise ValueError(f"r must be in [0, {num_patches - 1}] for {num_patches} patch tokens, got {r}")
    if metric.shape[:2] != x.shape[:2] or state.sizes.shape != (*x.shape[:2], 1):
        raise ValueError(
            f"metric {tuple(metric.shape)} / sizes {tuple(state.sizes.shape)} do not match x {tuple(x.shape)}"
        )
    if r == 0:
        return x, state
    out_dtype = x.dtype
    x = x.to(state.sizes.dtype)  # merge in >= float32 so untouched tokens round-trip exactly
    sizes, source_map = state.sizes, state.source_map
    metric = metric.detach().float()
    while r > 0:
        tokens = x.shape[1]
        num_a, num_b = (tokens + 1) // 2, tokens // 2
        step = min(r, num_a - offset, num_b)
        with torch.no_grad():
            unmerged, src, dst = _match(metric, step, state.has_cls)
            # old full index -> new full index; order is [unmerged A, all B].
            num_unm = unmerged.shape[1]
            new_a = src.new_empty(x.shape[0], num_a)
            new_a.scatter_(1, unmerged, torch.arange(num_unm, device=x.device).expand_as(unmerged))
            new_a.scatter_(1, src, dst + num_unm)
            new_index = src.new_empty(x.shape[0], tokens)
            new_index[:, ::2] = new_a
            new_index[:, 1::2] = torch.arange(num_unm, num_unm + num_b, device=x.device)
            source_map = (new_index[:, offset:] - offset).gather(1, source_map)
            if r > step:  # another round follows: carry the merged metric over
                metric, _ = _weighted_merge(F.normalize(metric, dim=-1), sizes, unmerged, src, dst)
        x, sizes = _weighted_merge(x, sizes, unmerged, src, dst)
        r -= step
    return x.to(out_dtype), MergeState(sizes=sizes, source_map=source_map, has_cls=state.has_cls)


def canonical_order(x: torch.Tensor, state: MergeState) -> tuple[torch.Tensor, MergeState]:
    """Sort patch tokens by each group's smallest source position (a pure permutation of tokens and ids)."""
    offset = int(state.has_cls)
    batch, num_positions = state.source_map.shape
    num_kept = x.shape[1] - offset
    positions = torch.arange(num_positions, device=x.device).expand(batch, -1)
    first = torch.full((batch, num_kept), num_positions, dtype=torch.long, device=x.device)
    first = first.scatter_reduce(1, state.source_map, positions, reduce="amin")
    perm = first.argsort(dim=-1)
    inverse = torch.empty_like(perm).scatter_(1, perm, torch.arange(num_kept, device=x.device).expand_as(perm))
    full_perm = torch.cat([torch.zeros_like(perm[:, :offset]), perm + offset], dim=1)  # CLS stays first
    source_map = inverse.gather(1, state.source_map)
    sizes = _take(state.sizes, full_perm)
    return _take(x, full_perm), MergeState(sizes=sizes, source_map=source_map, has_cls=state.has_cls)


def proportional_attention_bias(sizes: torch.Tensor) -> torch.Tensor:
    """log(sizes) as a [B, 1, 1, T] additive attention bias (cast it to the logits' dtype if they differ)."""
    return sizes.log().squeeze(-1)[:, None, None, :]


def unmerge(tokens: torch.Tensor, source_map: torch.Tensor) -> torch.Tensor:
    """Copy each merged token [B, K, C] back to all the positions it covers: [B, L, C]."""
    return _take(tokens, source_map)


def source_map_to_matrix(source_map: torch.Tensor, num_kept: int) -> torch.Tensor:
    """One-hot source matrix S [B, K, L] (float32) with S[b, k, l] = 1 iff position l belongs to token k."""
    batch, num_positions = source_map.shape
    matrix = torch.zeros(batch, num_kept, num_positions, device=source_map.device)
    return matrix.scatter_(1, source_map[:, None, :], 1.0)


def validate_source_map(source_map: torch.Tensor, num_kept: int, batch_size: int | None = None) -> None:
    """Raise ValueError unless ``source_map`` is a canonical [B, L] assignment onto exactly ``num_kept`` parents."""
    if not isinstance(source_map, torch.Tensor) or source_map.dtype not in (
        torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64
    ):
        raise ValueError(f"source_map must be an integer tensor, got {getattr(source_map, 'dtype', type(source_map))}")
    if source_map.dim() != 2:
        raise ValueError(f"source_map must be 2-D [batch, positions], got shape {tuple(source_map.shape)}")
    if batch_size is not None and source_map.shape[0] != batch_size:
        raise ValueError(f"source_map has batch size {source_map.shape[0]}, expected {batch_size}")
    if num_kept < 1:
        raise ValueError(f"num_kept must be >= 1, got {num_kept}")
    source_map = source_map.long()
    bad = (source_map < 0) | (source_map >= num_kept)
    if bad.any():
        row, pos = bad.nonzero()[0].tolist()
        raise ValueError(
            f"source_map[{row}, {pos}] = {source_map[row, pos].item()} is outside [0, {num_kept})"
        )
    batch, num_positions = source_map.shape
    counts = torch.zeros(batch, num_kept, dtype=torch.long, device=source_map.device)
    counts.scatter_add_(1, source_map, torch.ones_like(source_map))
    if (counts == 0).any():
        row, parent = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"source_map row {row}: parent {parent} of {num_kept} has no position")
    positions = torch.arange(num_positions, device=source_map.device).expand(batch, -1)
    first = torch.full_like(counts, num_positions).scatter_reduce(1, source_map, positions, reduce="amin")
    unordered = first[:, 1:] <= first[:, :-1]
    if unordered.any():
        row, parent = unordered.nonzero()[0].tolist()
        raise ValueError(
            f"source_map row {row} is not in canonical order: parent {parent + 1} first appears at position "
            f"{first[row, parent + 1].item()}, before parent {parent} (position {first[row, parent].item()})"
        )
