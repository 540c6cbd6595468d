"""benchmarks/bench_randar.py's own pieces: MergeAR's samples read as merged tokens and decoded through the recovery."""

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/bench_randar.py")


def test_merged_tokens_keep_each_distinct_code_at_its_first_position(bench):
    raster = torch.tensor([[5, 5, 7, 5, 9, 7], [3, 3, 3, 3, 3, 3]])
    (codes, positions), (single, at) = bench.merged_tokens(raster)
    assert codes.tolist() == [5, 7, 9] and positions.tolist() == [0, 2, 4]
    assert single.tolist() == [3] and at.tolist() == [0]


def test_through_recovery_with_a_perfect_recovery_gives_the_pipelines_own_images(bench, make_tiny_pipeline, monkeypatch):
    """Were the recovery exact, MergeAR's samples read back as merged tokens would decode to the pipeline's own images:
    the collected codes, their grid positions and the [-1, 1] range all have to be right for this to hold."""
    pipe = make_tiny_pipeline(seed=3)
    labels = torch.tensor([1, 4, 7])
    raster = []

    def keep(pipeline, step, timestep, tensors):
        raster.append(tensors["next_tokens"].clone())
        return tensors

    own = pipe(class_labels=labels, generator=torch.Generator().manual_seed(11), output_type="pt", num_tokens=16,
               callback_on_step_end=keep).images * 2 - 1
    raster = torch.stack(raster, 1)
    exact_maps = []
    for row, (codes, positions) in zip(raster, bench.merged_tokens(raster)):
        exact_maps.append((codes, positions, (row[:, None] == codes[None]).long().argmax(1)))
    assert any(len(codes) < raster.shape[1] for codes, _, _ in exact_maps)  # some codes repeat: a real merge

    def exact_recovery(codes, positions):
        expected_codes, expected_positions, source_map = exact_maps.pop(0)
        torch.testing.assert_close(codes[0], expected_codes)
        torch.testing.assert_close(positions[0], expected_positions)
        return source_map[None]

    monkeypatch.setattr(pipe.vq_model, "predict_source_map", exact_recovery)
    sample = bench.raster_through_recovery_sample_fn(pipe, num_tokens=16)
    images = sample(labels, torch.Generator().manual_seed(11))
    assert not exact_maps
    assert sample.distinct_codes == [len(set(row.tolist())) for row in raster]
    torch.testing.assert_close(images, own.clamp(-1, 1), atol=2e-3, rtol=0)


def test_recording_replays_the_same_images_and_refuses_other_labels(bench):
    """Scoring one set of samples against two reference sets must score the same images twice, not draw new ones."""
    calls = []

    def draw(class_labels, generator):
        calls.append(class_labels)
        return torch.rand(len(class_labels), 3, 4, 4, generator=generator)

    sample = bench.recording(draw)
    first = [sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0)),
             sample(torch.tensor([2]), torch.Generator().manual_seed(1))]
    seconds = sample.seconds
    assert seconds > 0
    again = sample.replay()
    assert torch.equal(again(torch.tensor([0, 1]), torch.Generator().manual_seed(5)), first[0])
    assert torch.equal(again(torch.tensor([2]), torch.Generator().manual_seed(6)), first[1])
    assert len(calls) == 2 and sample.seconds == seconds  # replaying draws nothing and costs no sampling time
    with pytest.raises(RuntimeError, match="other labels"):
        sample.replay()(torch.tensor([1, 0]), None)


def test_decode_mixture_of_a_one_hot_map_is_decoding_through_that_map(bench, make_tiny_pipeline):
    """A soft map that puts all weight on one parent per position must decode as that hard map does."""
    vq_model = make_tiny_pipeline(seed=2).vq_model
    num_tokens, length = 5, vq_model.config.num_patches
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 2 ** vq_model.config.codebook_bits, (2, num_tokens), generator=generator)
    source_map = torch.randint(0, num_tokens, (2, length), generator=generator)
    source_map[:, :num_tokens] = torch.arange(num_tokens)  # every token holds a position
    codes = vq_model.quantize.indices_to_codes(indices, dtype=vq_model.dtype)
    weights = torch.nn.functional.one_hot(source_map, num_tokens).float()
    with torch.no_grad():
        torch.testing.assert_close(bench.decode_mixture(vq_model, codes, weights), vq_model.decode(indices, source_map))
        halfway = bench.decode_mixture(vq_model, codes, weights.roll(1, dims=-1) * 0.5 + weights * 0.5)
    assert not torch.allclose(halfway, vq_model.decode(indices, source_map), atol=1e-3)
