"""MergeAR's sparsity rule and the KV cache that implements it at inference (docs/design.md §3.1-3.2).

The rule: a query at sequence index ``p`` may attend key ``t`` iff ``t <= p`` and either

* ``t`` is *kept*: a prompt token (class, merge instruction) or the first occurrence of its code in the row, or
* ``t`` is *recent*: ``p - t < W`` (``W = config.repeat_window``; ``W = 1`` means a repeat only sees itself).

In training this is a boolean attention mask (:func:`build_sparsity_mask`). At inference :class:`MergeARCache`
keeps the K/V of kept tokens forever and holds a repeated token's K/V only while it is recent, so the attention
context shrinks from ``2 + t`` keys to about ``2 + #distinct codes + W``.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


def first_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` codes -> ``[B, N]`` bool, True where a code appears for the first time in its row."""
    # A value's first occurrence is the first of its run in a stable sort: O(N log N) rather than an N x N comparison.
    ordered, order = tokens.sort(dim=1, stable=True)
    first_in_order = torch.ones_like(ordered, dtype=torch.bool)
    first_in_order[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return torch.empty_like(first_in_order).scatter_(1, order, first_in_order)


def sparse_causal_mask(keep: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, S]`` kept flags -> ``[B, 1, S, S]`` bool mask (True = may attend) of the MergeAR rule above."""
    index = torch.arange(keep.shape[1], device=keep.device)
    age = index[:, None] - index[None, :]
    allowed = (age >= 0) & (keep[:, None, :] | (age < window))
    return allowed[:, None]


def build_sparsity_mask(image_tokens: torch.Tensor, window: int, num_prefix: int = 2) -> torch.Tensor:
    """Training mask of a sequence ``[num_prefix prompt tokens] + image_tokens``.

    Args:
        image_tokens: ``[B, N]`` raster codes that follow the prompt in the input sequence.
        window: ``W``; a repeated code stays visible to the ``W`` queries starting at its own position.
        num_prefix: number of prompt tokens before the image tokens (class + merge instruction = 2).

    Returns:
        ``[B, 1, num_prefix + N, num_prefix + N]`` bool, True where the query (row) may attend the key (column).
    """
    prefix = torch.ones(image_tokens.shape[0], num_prefix, dtype=torch.bool, device=image_tokens.device)
    return sparse_causal_mask(torch.cat([prefix, first_occurrence(image_tokens)], dim=1), window)


class MergeARCacheLayer(DynamicLayer):
    """K/V storage of one layer; the bookkeeping (which slot holds what) is shared in the parent cache.

    ``keys``/``values`` are ``[R, H, ring + capacity, D]``. Slots ``[0, ring)`` are a ring of the last ``W`` steps
    (slot = sequence index mod ``W``); slots from ``ring`` on hold each row's kept tokens in arrival order, so row
    ``b`` uses ``[ring, ring + lengths[b])`` and the rest of its slots are free. Rows evict different numbers of
    tokens, and the attention mask built by :meth:`MergeARCache.observe` says which slots of which row are live.
    """

    is_croppable = False

    def __init__(self, cache: "MergeARCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[3])
        self.values = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[3])
        self.is_initialized = True

    def _reserve(self, slots: int) -> None:
        # Grow by whole blocks (the cache rounds `capacity` up), so a copy happens once per block, not per step.
        if self.keys.shape[2] < slots:
            grow = slots - self.keys.shape[2]
            self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], grow, self.keys.shape[3])], 2)
            self.values = torch.cat(
                [self.values, self.values.new_zeros(*self.values.shape[:2], grow, self.values.shape[3])], 2
            )

    def _write(self, step: dict, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        ring = self.cache.ring
        if step["decode"]:
            # Scatter each row's token into its own slot, and (same slot for all rows) into the ring.
            index = (ring + step["kept_slots"]).view(-1, 1, 1, 1).expand_as(key_states)
            self.keys.scatter_(2, index, key_states)
            self.values.scatter_(2, index, value_states)
            if ring:
                slot = (self.cache.seen - 1) % ring  # the token just observed has sequence index seen - 1
                self.keys[:, :, slot] = key_states[:, :, 0]
                self.values[:, :, slot] = value_states[:, :, 0]
            return
        self.keys.index_copy_(2, step["ring_slots"], key_states[:, :, step["ring_columns"]])
        self.values.index_copy_(2, step["ring_slots"], value_states[:, :, step["ring_columns"]])
        rows, columns, slots = step["kept_rows"], step["kept_columns"], ring + step["kept_slots"]
        self.keys[rows, :, slots] = key_states[rows, :, columns]
        self.values[rows, :, slots] = value_states[rows, :, columns]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens' K/V and return the keys/values that the step's attention mask describes."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.cache.step
        ring = self.cache.ring
        self._reserve(ring + self.cache.capacity)
        if step["decode"]:
            # One new token per row: its slot is free and nothing it overwrites is still visible (an old ring
            # occupant is exactly W steps old), so write first and attend over views, with no per-step copy.
            self._write(step, key_states, value_states)
            used = ring + step["stored_after"]
            return self.keys[:, :, :used], self.values[:, :, :used]
        # Several new tokens: the chunk's own ring writes could clobber entries its earlier queries still see,
        # so attend over [old storage, new tokens] first and store afterwards.
        used = ring + step["stored_before"]
        keys = torch.cat([self.keys[:, :, :used], key_states], dim=2)
        values = torch.cat([self.values[:, :, :used], value_states], dim=2)
        self._write(step, key_states, value_states)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cache.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Stored entries are treated as the positions just before the queries. This (length, offset) form cannot
        # express the holes of evicted tokens: the MergeAR model builds its mask with `MergeARCache.observe`.
        stored = self.cache.stored_length()
        return stored + query_length, self.cache.seen - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("MergeARCache cannot be cropped: evicted tokens cannot be restored.")


class MergeARCache(Cache):
    """KV cache of MergeAR: keeps prompt tokens and first occurrences forever, evicts repeats after ``W`` steps.

    The model must call :meth:`observe` with each forward's ``input_ids`` before its layers run; ``observe``
    decides which new tokens are repeats (per row, by code equality with the codes kept so far), plans where
    every layer stores them and returns the boolean attention mask of the step. ``MergeARForCausalLM`` does this.

    Args:
        config: a ``MergeARConfig`` (``num_hidden_layers``, ``repeat_window``, ``codebook_bits``).
        compress: ``False`` keeps every token: plain raster AR on the same storage (a baseline).
        block_size: kept-slot capacity grows in blocks of this many slots (fewer reallocations, at most
            ``block_size`` spare slots).

    ``get_seq_length()`` counts tokens seen; :meth:`stored_length` and :meth:`stored_bytes` report what is held.
    With batched classifier-free guidance the cache holds ``[cond; uncond]`` (2B rows, ``guided=True``) and the
    row operations used by ``generate`` apply a B-row index to both halves.
    """

    def __init__(self, config, compress: bool = True, block_size: int = 32):
        self.compress = compress
        self.window = config.repeat_window
        self.ring = config.repeat_window if compress else 0
        self.codebook_size = 2**config.codebook_bits
        self.block_size = block_size
        super().__init__(layers=[MergeARCacheLayer(self) for _ in range(config.num_hidden_layers)])
        self._clear()

    def _clear(self) -> None:
        self.guided = False
        self.seen = 0
        self.capacity = 0
        self.lengths = None  # [R] kept tokens per row
        self.codes = None  # [R, capacity] id held by each kept slot, -1 where free
        self.ring_repeat = None  # [R, ring] the ring slot holds a repeat that is still visible
        self.ring_position = None  # [ring] sequence index of each ring slot's token
        self.step = None  # write plan of the current forward, read by every layer

    def observe(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Register the forward's new tokens and return its ``[R, 1, q, kv]`` boolean attention mask.

        ``kv`` matches what every layer's ``update`` returns for this forward.
        """
        rows, q = input_ids.shape
        device = input_ids.device
        if self.lengths is None:
            self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
            self.codes = torch.full((rows, 0), -1, dtype=torch.long, device=device)
            self.ring_repeat = torch.zeros(rows, self.ring, dtype=torch.bool, device=device)
            self.ring_position = torch.zeros(self.ring, dtype=torch.long, device=device)
        positions = self.seen + torch.arange(q, device=device)
        keep = self._keep(input_ids)
        new_lengths = self.lengths + keep.sum(1)
        decode = q == 1
        if decode:
            # Every row writes its token into its next free slot; only a kept token then advances the row's length.
            kept_rows = torch.arange(rows, device=device)
            kept_columns = torch.zeros(rows, dtype=torch.long, device=device)
            kept_slots = self.lengths
            self._grow(int(self.lengths.max()) + 1)
        else:
            kept_rows, kept_columns = keep.nonzero(as_tuple=True)
            kept_slots = (self.lengths[:, None] + keep.cumsum(1) - 1)[kept_rows, kept_columns]
            self._grow(int(new_lengths.max()))
            mask = self._chunk_mask(keep, positions)  # over [old storage, new tokens], from the old state
        stored_before = int(self.lengths.max())

        # Move the bookkeeping on; the layers then store K/V at the planned slots. (At decode, a row whose
        # token is a repeat writes -1 into its free slot, which stays free.)
        self.codes[kept_rows, kept_slots] = torch.where(
            keep[kept_rows, kept_columns], input_ids[kept_rows, kept_columns], -1
        )
        ring_columns = torch.arange(q - min(q, self.ring), q, device=device)  # the last W tokens enter the ring
        ring_slots = positions[ring_columns] % max(self.ring, 1)  # (no columns when there is no ring)
        self.ring_repeat[:, ring_slots] = ~keep[:, ring_columns]
        self.ring_position[ring_slots] = positions[ring_columns]
        self.lengths = new_lengths
        self.seen += q
        self.step = {
            "decode": decode,
            "stored_before": stored_before,
            "stored_after": int(new_lengths.max()),
            "kept_rows": kept_rows,
            "kept_columns": kept_columns,
            "kept_slots": kept_slots,
            "ring_slots": ring_slots,
            "ring_columns": ring_columns,
        }
        if decode:  # the layers write first, so the mask describes the new state
            kept = torch.arange(self.step["stored_after"], device=device) < self.lengths[:, None]
            mask = torch.cat([self.ring_repeat, kept], dim=1)[:, None, None, :]
        return mask

    def _keep(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.compress:
            return torch.ones_like(input_ids, dtype=torch.bool)
        prompt = input_ids >= self.codebook_size
        seen_before = (input_ids[:, :, None] == self.codes[:, None, :]).any(-1)
        return prompt | (first_occurrence(input_ids) & ~seen_before)

    def _grow(self, slots: int) -> None:
        if slots > self.capacity:
            capacity = -(-slots // self.block_size) * self.block_size
            free = self.codes.new_full((self.codes.shape[0], capacity - self.capacity), -1)
            self.codes = torch.cat([self.codes, free], dim=1)
            self.capacity = capacity

    def _chunk_mask(self, keep: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Old ring entries are visible to the queries they are recent for, old kept slots to all queries, and
        # the new tokens follow the sparsity rule among themselves.
        q = keep.shape[1]
        recent = positions[:, None] - self.ring_position[None, :] < self.window
        ring = self.ring_repeat[:, None, :] & recent[None]
        stored = int(self.lengths.max())
        kept = (torch.arange(stored, device=keep.device) < self.lengths[:, None])[:, None, :].expand(-1, q, -1)
        return torch.cat([ring, kept, sparse_causal_mask(keep, self.window)[:, 0]], dim=2)[:, None]

    def stored_length(self, layer_idx: int = 0) -> int:
        """Slots in use per layer (ring + the longest row's kept tokens); every layer stores the same tokens."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx must be in [0, {len(self.layers)}), got {layer_idx}.")
        return 0 if self.lengths is None else self.ring + int(self.lengths.max())

    def stored_bytes(self) -> int:
        """Bytes of K/V tensors held by all layers, including spare slots of the last block."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("MergeARCache cannot be cropped: evicted tokens cannot be restored.")

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.lengths is None:
            return
        index = index.to(self.lengths.device)
        if self.guided:
            index = torch.cat([index, index + self.lengths.shape[0] // 2])
        self.lengths, self.codes, self.ring_repeat = self.lengths[index], self.codes[index], self.ring_repeat[index]
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index], layer.values[index]

    def _batch_rows(self) -> int:
        rows = self.lengths.shape[0]
        return rows // 2 if self.guided else rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.lengths is not None:
            rows = torch.arange(self._batch_rows(), device=self.lengths.device)
            self._select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero(as_tuple=True)[0]
        self._select_rows(indices)


__all__ = ["MergeARCache", "MergeARCacheLayer", "build_sparsity_mask", "first_occurrence", "sparse_causal_mask"]
