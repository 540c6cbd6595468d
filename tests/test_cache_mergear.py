"""MergeAR's sparsity mask and MergeARCache: exact against direct definitions and recomputation."""

import pytest
import torch
from transformers import DynamicCache

from mergevq_hf.cache_mergear import MergeARCache, build_sparsity_mask


def repeating_sequences(model, batch, seed):
    """Prompt + L-1 codes per row, each row drawing from its own small set of codes (many repeats)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(batch):
        palette = torch.randperm(config.codebook_size, generator=generator)[: 3 + 4 * row]
        rows.append(palette[torch.randint(0, len(palette), (config.num_patches - 1,), generator=generator)])
    prompt = model.build_prompt(torch.arange(batch) % config.num_classes, [4, 16, 36][:batch])
    return torch.cat([prompt, torch.stack(rows)], dim=1)


def feed_guided(model, sequence, cache, scale=3.0):
    return torch.cat([model(input_ids=token[:, None], cache=cache, guidance_scale=scale).logits for token in sequence.T], 1)


def feed(model, sequence, cache, chunks):
    logits, start = [], 0
    for size in chunks:
        logits.append(model(input_ids=sequence[:, start : start + size], cache=cache).logits)
        start += size
    assert start == sequence.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_sparsity_mask_matches_its_definition(window):
    tokens = torch.randint(0, 5, (3, 12), generator=torch.Generator().manual_seed(window))
    mask = build_sparsity_mask(tokens, window)
    assert mask.shape == (3, 1, 14, 14) and mask.dtype == torch.bool
    for b in range(3):
        codes = tokens[b].tolist()
        for query in range(14):
            for key in range(14):
                kept = key < 2 or codes[key - 2] not in codes[: key - 2]
                expected = key <= query and (kept or query - key < window)
                assert bool(mask[b, 0, query, key]) == expected
                if not kept and query - key >= window:  # an evicted repeat is never visible outside the window
                    assert not mask[b, 0, query, key]


@pytest.mark.parametrize("window", [1, 3])
def test_cache_equals_sparse_recomputation_and_bounds_storage(tiny_model, window):
    model = tiny_model(repeat_window=window)
    sequence = repeating_sequences(model, batch=3, seed=window)
    reference = model(input_ids=sequence, use_cache=False).logits
    cache = MergeARCache(model.config, block_size=8)
    logits, start = [], 0
    for cut in [2, *range(3, sequence.shape[1] + 1)]:  # the prompt as one chunk, then one token per step
        logits.append(model(input_ids=sequence[:, start:cut], cache=cache).logits)
        start = cut
        distinct = torch.tensor([len(set(row.tolist())) for row in sequence[:, 2:cut]])
        assert cache.get_seq_length() == cut  # every token seen counts
        assert torch.equal(cache.lengths, 2 + distinct)  # per row: prompt + first occurrences
        assert cache.stored_length() == window + 2 + int(distinct.max())  # the longest row sets the storage
        for layer in cache.layers:
            assert cache.stored_length() <= layer.keys.shape[2] <= cache.stored_length() + 8
    torch.testing.assert_close(torch.cat(logits, dim=1), reference, rtol=1e-4, atol=1e-5)
    assert cache.stored_bytes() == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@pytest.mark.parametrize("chunks", [[5, 1, 1, 20, 10], [37]])
def test_cache_handles_multi_token_chunks(tiny_model, chunks):
    model = tiny_model(repeat_window=3)
    sequence = repeating_sequences(model, batch=3, seed=7)
    reference = model(input_ids=sequence, use_cache=False).logits
    logits = feed(model, sequence, MergeARCache(model.config), chunks)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_without_repeats_the_compressed_cache_equals_dynamic_cache(tiny_model):
    model = tiny_model()
    config = model.config
    codes = torch.stack([torch.randperm(config.codebook_size)[: config.num_patches - 1] for _ in range(2)])
    sequence = torch.cat([model.build_prompt([1, 2], 16), codes], dim=1)  # all distinct
    chunks = [2] + [1] * (sequence.shape[1] - 2)
    compressed = MergeARCache(config)
    merged = feed(model, sequence, compressed, chunks)
    full = feed(model, sequence, DynamicCache(), chunks)
    torch.testing.assert_close(merged, full, rtol=1e-4, atol=1e-5)
    assert compressed.stored_length() == 1 + sequence.shape[1]


def test_window_covering_the_sequence_and_no_compression_equal_dynamic_cache(tiny_model):
    model = tiny_model()
    sequence = repeating_sequences(model, batch=3, seed=3)
    chunks = [2] + [1] * (sequence.shape[1] - 2)
    full = feed(model, sequence, DynamicCache(), chunks)
    uncompressed = feed(model, sequence, MergeARCache(model.config, compress=False), chunks)
    torch.testing.assert_close(uncompressed, full, rtol=1e-4, atol=1e-5)
    wide = tiny_model(repeat_window=model.config.num_patches + 2)
    torch.testing.assert_close(feed(wide, sequence, MergeARCache(wide.config), chunks), full, rtol=1e-4, atol=1e-5)


def test_row_operations_follow_the_rows(tiny_model):
    model = tiny_model(repeat_window=2)
    sequence = repeating_sequences(model, batch=3, seed=5)
    head, tail = sequence[:, :30], sequence[:, 30:34]

    cache = MergeARCache(model.config)
    model(input_ids=head, cache=cache)
    cache.batch_repeat_interleave(2)
    fresh = MergeARCache(model.config)
    model(input_ids=head.repeat_interleave(2, dim=0), cache=fresh)
    expected = feed(model, tail.repeat_interleave(2, dim=0), fresh, [1] * 4)
    torch.testing.assert_close(feed(model, tail.repeat_interleave(2, dim=0), cache, [1] * 4), expected)

    cache = MergeARCache(model.config)
    model(input_ids=head, cache=cache)
    cache.batch_select_indices(torch.tensor([2, 0]))
    fresh = MergeARCache(model.config)
    model(input_ids=head[[2, 0]], cache=fresh)
    torch.testing.assert_close(feed(model, tail[[2, 0]], cache, [1] * 4), feed(model, tail[[2, 0]], fresh, [1] * 4))


def test_guided_cache_reorders_both_halves(tiny_model):
    model = tiny_model()
    sequence = repeating_sequences(model, batch=2, seed=11)
    head, tail = sequence[:, :20], sequence[:, 20:24]
    cache = MergeARCache(model.config)
    model(input_ids=head, cache=cache, guidance_scale=3.0)
    assert cache.guided and cache.lengths.shape[0] == 4
    cache.reorder_cache(torch.tensor([1, 0]))
    fresh = MergeARCache(model.config)
    model(input_ids=head[[1, 0]], cache=fresh, guidance_scale=3.0)
    reordered, rebuilt = (feed_guided(model, tail[[1, 0]], c) for c in (cache, fresh))
    torch.testing.assert_close(reordered, rebuilt)


def test_cache_contract_and_misuse(tiny_model):
    model = tiny_model()
    cache = MergeARCache(model.config)
    assert not cache.is_croppable and cache.get_seq_length() == 0 and cache.stored_bytes() == 0
    model(input_ids=model.build_prompt([1, 2], 4), past_key_values=cache)  # the pre-5.24 keyword works too
    assert cache.get_seq_length() == 2
    assert cache.get_mask_sizes(1, 0) == (cache.stored_length() + 1, 2 - cache.stored_length())
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="rows"):
        model(input_ids=torch.tensor([[5]]), cache=cache)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.stored_length(layer_idx=99)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stored_bytes() == 0 and cache.lengths is None
