"""Peak memory and time of the LFQ entropy loss at d=18: factorised exact form vs the naive N x 2^18 softmax.

Each case runs forward + backward in a fresh spawned process, so one case's allocator caches cannot hide another's.
Memory is the process's peak RSS during the case minus its RSS just before (Linux: the peak is reset through
/proc/self/clear_refs after a small warm-up call has loaded torch's kernels), i.e. what the loss itself needs.
Naive cases that would need more than 2 GiB for a single [N, 2^18] float32 tensor are skipped, not run.
Prints a markdown table. Usage: python benchmarks/bench_lfq_entropy.py  (1-2 minutes on 2 cores, Linux only).
"""

import multiprocessing
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

BITS = 18
TEMPERATURE = 0.01
TOKENS = (64, 256, 1024, 2304)
NAIVE_LIMIT_BYTES = 2 * 1024**3
REPEATS = {"factorised": 5, "naive": 1}  # timed runs; the naive one takes seconds, so one is representative


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024  # kB


def _reset_peak_rss() -> float:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    return _rss_mib("VmRSS")


def _naive_entropy_terms(z, temperature):
    """The textbook formula: a softmax over every code, [N, 2^d] logits."""
    import torch

    from mergevq_hf.quantization_lfq import LookupFreeQuantizer

    bits = z.shape[-1]
    codebook = LookupFreeQuantizer(bits).indices_to_codes(torch.arange(1 << bits))
    log_probs = (2.0 * z @ codebook.T / temperature).log_softmax(-1)
    probs = log_probs.exp()
    mean_probs = probs.mean(0)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    batch_entropy = -(mean_probs * mean_probs.clamp_min(torch.finfo(z.dtype).tiny).log()).sum()
    return sample_entropy, batch_entropy


def _run_case(method: str, tokens: int) -> dict:
    import torch

    from mergevq_hf.quantization_lfq import entropy_terms

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    fn = entropy_terms if method == "factorised" else _naive_entropy_terms
    warm_up = torch.randn(8, BITS, requires_grad=True)
    fn(warm_up, TEMPERATURE)[0].backward()  # loads the kernels before the peak is reset
    z = torch.randn(tokens, BITS, generator=torch.Generator().manual_seed(tokens)).requires_grad_()

    rss_before = _reset_peak_rss()
    times = []
    for _ in range(REPEATS[method]):
        z.grad = None
        start = time.perf_counter()
        sample, batch = fn(z, TEMPERATURE)
        (sample - batch).backward()
        times.append(time.perf_counter() - start)
    return {
        "peak_mib": _rss_mib("VmHWM") - rss_before,
        "ms": 1000 * statistics.median(times),
        "loss": (sample - batch).item(),
        "grad": z.grad.clone(),
    }


def _in_fresh_process(method: str, tokens: int) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_case, (method, tokens))


def main() -> None:
    print(f"LFQ entropy loss, d={BITS} (2^{BITS} = {1 << BITS:,} codes), tau={TEMPERATURE}, forward+backward, "
          f"float32, CPU, {os.environ['OMP_NUM_THREADS']} thread(s). Peak = peak RSS growth during the case; "
          f"time = median of {REPEATS['factorised']} runs (factorised) or one run (naive).\n")
    print("| tokens N | factorised peak (MiB) | factorised time (ms) | naive peak (MiB) | naive time (ms) "
          "| abs. loss diff | max abs. grad diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in TOKENS:
        fact = _in_fresh_process("factorised", tokens)
        row = [f"{tokens}", f"{fact['peak_mib']:.0f}", f"{fact['ms']:.1f}"]
        one_tensor = tokens * (1 << BITS) * 4
        if one_tensor > NAIVE_LIMIT_BYTES:
            row += [f"skipped (would need > {one_tensor / 1024**3:.2f} GiB per N x 2^18 tensor)", "-", "-", "-"]
        else:
            naive = _in_fresh_process("naive", tokens)
            row += [
                f"{naive['peak_mib']:.0f}",
                f"{naive['ms']:.1f}",
                f"{abs(naive['loss'] - fact['loss']):.1e}",
                f"{(naive['grad'] - fact['grad']).abs().max().item():.1e}",
            ]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
