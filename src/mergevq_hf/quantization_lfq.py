"""Look-up-free quantisation (LFQ, MAGVIT-v2) as used by MergeVQ.

The codebook is the fixed set {-1, +1}^d (no parameters, no projection). A latent z in R^d is quantised to
q = +1 where z > 0 else -1, and its index is sum_j 2^j [z_j > 0] (bit j <-> channel j, little-endian).

The MAGVIT-v2 entropy loss puts a softmax over all 2^d codes with logits 2<z, c>/tau. Materialising that is
N x 2^d floats (4 GiB for 4096 tokens at d=18), but the softmax factorises over bits,
P(c_j = +1) = sigmoid(4 z_j / tau), which :func:`entropy_terms` uses to compute both terms exactly with
O(2^d + N 2^(d/2)) memory.

Under data-parallel training the batch term is the entropy of the code distribution averaged over the tokens of
*every* process (the distribution is summed with an autograd-aware all-reduce), so that N processes optimise the
same batch entropy as one process on the concatenated batch; without it each process would maximise the entropy of
its own shard only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LFQOutput:
    """Result of :class:`LookupFreeQuantizer`. The loss fields are None when losses were not requested."""

    codes: torch.Tensor  # [..., d] in {-1, +1}, z's dtype; gradient passes straight through to z
    indices: torch.Tensor  # [...] long, in [0, 2^d)
    entropy_loss: torch.Tensor | None  # sample_weight * sample_entropy - batch_weight * batch_entropy
    sample_entropy: torch.Tensor | None  # mean over tokens of H(p_n), nats
    batch_entropy: torch.Tensor | None  # H(mean over tokens of p_n), nats
    commitment_loss: torch.Tensor | None  # MSE(z, sign(z).detach())


def split_indices(indices: torch.Tensor, low_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split codebook indices into (low, high) parts: low = indices mod 2**low_bits, high = the rest."""
    return indices & ((1 << low_bits) - 1), indices >> low_bits


def merge_indices(low: torch.Tensor, high: torch.Tensor, low_bits: int) -> torch.Tensor:
    """Inverse of :func:`split_indices`."""
    return (high << low_bits) | low


def _bit_shifts(bits: int, device: torch.device) -> torch.Tensor:
    # Built per call rather than stored as a buffer: transformers' meta-device init would leave a buffer as garbage.
    return torch.arange(bits, device=device, dtype=torch.long)


def _check_indices(indices: torch.Tensor, bits: int) -> None:
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.numel():
        # Compare in int64: against a narrow dtype (e.g. uint8) the bound 2^bits itself would wrap around.
        low, high = indices.long().aminmax()
        if low < 0 or high >= (1 << bits):
            raise ValueError(f"indices must lie in [0, 2^{bits}), got range [{int(low)}, {int(high)}]")


def _loss_dtype(z: torch.Tensor) -> torch.dtype:
    # At least float32 (bf16/fp16 sums over 2^d codes are too coarse); float64 stays float64 for exact references.
    return torch.promote_types(z.dtype, torch.float32)


def _entropy_of(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p of a distribution (entries summing to 1), with finite value and gradient where p = 0."""
    # Clamping inside the log gives p log p = 0 at p = 0 with a finite gradient (xlogy(p, p) back-propagates NaN).
    log_p = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    # The plain gradient -(log p + 1) is a large constant (~d ln 2) that only cancels across the codes because
    # sum(p) = 1; in float32 that loses ~1e-3 relative near-uniform. Subtracting the detached constant
    # k = sum(p log p) + 1 leaves the value unchanged (k (sum(p) - 1) = 0) and makes the gradient zero-mean.
    k = ((probs * log_p).sum() + 1).detach()
    return -(probs * (log_p - k)).sum() - k


def _code_probabilities(p_pos: torch.Tensor, p_neg: torch.Tensor) -> torch.Tensor:
    """[N, b] per-bit probabilities -> [N, 2^b] probabilities of every b-bit code (little-endian).

    Built by doubling: after bit j the columns cover codes [0, 2^(j+1)), the new bit being the most significant.
    Multiplying probabilities (rather than exponentiating summed log-probabilities) avoids cancellation when
    |z| / tau is large.
    """
    probs = p_pos.new_ones(p_pos.shape[0], 1)
    for j in range(p_pos.shape[1]):
        probs = torch.cat([probs * p_neg[:, j : j + 1], probs * p_pos[:, j : j + 1]], dim=1)
    return probs


def _data_parallel_world_size() -> int:
    """Number of processes of the default process group; 1 when torch.distributed is not in use."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) that autograd sees through: d(sum over processes)/dx_p is the sum of every process's upstream
    gradient, itself an all-reduce. (The in-place ``dist.all_reduce`` would cut the graph; torch's own autograd-aware
    version is deprecated.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def entropy_terms(
    z: torch.Tensor, temperature: float, across_processes: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (mean per-token entropy, entropy of the mean distribution) of softmax(2<z, c>/tau) over {-1,+1}^d.

    z is [..., d] and flattened to N tokens. Computed in at least float32, with autocast off, and differentiable.
    Per token the distribution is a product of independent bits, so H(p_n) = sum_j h(sigmoid(4 z_nj / tau)).
    For the batch term the bits are split into a low and a high half: p_n(c) = p_n^lo(c_lo) p_n^hi(c_hi), hence
    mean_n p_n = P_lo^T P_hi / N, a [2^lo, 2^hi] matrix whose row-major flattening is indexed by c = c_lo + 2^lo c_hi.

    With ``across_processes`` and an initialised ``torch.distributed`` default group of several processes (every
    process must then call this in step), the mean runs over the tokens of all processes: the sums P_lo^T P_hi and
    the token counts are all-reduced. The all-reduce is differentiable and its backward sums the gradients of all
    processes, so each process's ``z`` gets world_size x the gradient of the one-process loss on the concatenated
    batch, which data-parallel averaging divides back out. Without a process group it is the plain computation.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bits = z.shape[-1]
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = z.reshape(-1, bits).to(_loss_dtype(z)) * (4.0 / temperature)
        log_pos, log_neg = F.logsigmoid(x), F.logsigmoid(-x)
        p_pos, p_neg = log_pos.exp(), log_neg.exp()
        sample_entropy = -(p_pos * log_pos + p_neg * log_neg).sum(-1).mean()

        low = bits // 2
        probs_low = _code_probabilities(p_pos[:, :low], p_neg[:, :low])  # [N, 2^low]
        probs_high = _code_probabilities(p_pos[:, low:], p_neg[:, low:])  # [N, 2^(d - low)]
        code_sums = probs_low.T @ probs_high  # sum over the tokens of p_n
        num_tokens = x.shape[0]
        if across_processes and _data_parallel_world_size() > 1:
            import torch.distributed as dist

            code_sums = _SumOverProcesses.apply(code_sums)
            counts = torch.tensor([num_tokens], dtype=torch.float64, device=code_sums.device)
            dist.all_reduce(counts)
            num_tokens = counts.item()
        batch_entropy = _entropy_of(code_sums / num_tokens)
    return sample_entropy, batch_entropy


def entropy_terms_brute_force(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`entropy_terms`: an explicit softmax over all 2^d codes ([N, 2^d] memory, d <= 16)."""
    bits = z.shape[-1]
    if bits > 16:
        raise ValueError(f"entropy_terms_brute_force materialises N x 2^d; refusing d={bits} > 16")
    flat = z.reshape(-1, bits).to(_loss_dtype(z))
    codebook = ((torch.arange(1 << bits, device=z.device)[:, None] >> _bit_shifts(bits, z.device)) & 1) * 2 - 1
    logits = 2.0 * flat @ codebook.to(flat.dtype).T / temperature
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy, _entropy_of(probs.mean(0))


def codebook_usage(indices: torch.Tensor, codebook_bits: int) -> tuple[float, float]:
    """(fraction of the 2^d codes that occur in ``indices``, perplexity exp(H) of their empirical distribution)."""
    _check_indices(indices, codebook_bits)
    counts = torch.bincount(indices.flatten(), minlength=1 << codebook_bits).double()
    probs = counts / counts.sum().clamp_min(1)
    return (counts > 0).double().mean().item(), _entropy_of(probs).exp().item()


class LookupFreeQuantizer(nn.Module):
    """Sign quantiser onto {-1, +1}^codebook_bits with the MAGVIT-v2 entropy and commitment losses.

    The loss weights inside the entropy loss are the two "inner" weights (1.0 and 1.0 in MergeVQ); the outer
    loss weights (0.1 entropy, 0.25 commitment) belong to the training objective, not here.
    """

    def __init__(
        self,
        codebook_bits: int = 18,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        batch_entropy_weight: float = 1.0,
    ):
        super().__init__()
        if not 1 <= codebook_bits <= 30:
            raise ValueError(f"codebook_bits must be in [1, 30], got {codebook_bits}")
        if not entropy_temperature > 0:
            raise ValueError(f"entropy_temperature must be > 0, got {entropy_temperature}")
        self.codebook_bits = codebook_bits
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.batch_entropy_weight = batch_entropy_weight

    @property
    def codebook_size(self) -> int:
        return 1 << self.codebook_bits

    def extra_repr(self) -> str:
        return f"codebook_bits={self.codebook_bits}, entropy_temperature={self.entropy_temperature}"

    def _check_last_dim(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.shape[-1:] != (self.codebook_bits,):
            raise ValueError(f"{name} must have last dimension {self.codebook_bits}, got shape {tuple(tensor.shape)}")

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., d] codes (or any latents: only the sign matters, z > 0 <-> bit 1) -> [...] long indices."""
        self._check_last_dim(codes, "codes")
        return ((codes > 0).long() << _bit_shifts(self.codebook_bits, codes.device)).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[...] integer indices in [0, 2^d) -> [..., d] codes in {-1, +1}."""
        _check_indices(indices, self.codebook_bits)
        bits = (indices.long()[..., None] >> _bit_shifts(self.codebook_bits, indices.device)) & 1
        return (bits * 2 - 1).to(dtype)

    def forward(self, z: torch.Tensor, compute_losses: bool = True) -> LFQOutput:
        self._check_last_dim(z, "z")
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or inf")
        quantised = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        # Straight-through as q + (z - z.detach()): the forward value is exactly q in any dtype, whereas the usual
        # z + (q - z).detach() rounds in bf16 once |z| is large (e.g. 300 + (-299 -> -300) = 0).
        codes = quantised + (z - z.detach())
        indices = self.codes_to_indices(z)
        if not compute_losses:
            return LFQOutput(codes, indices, None, None, None, None)

        # In training, under data parallelism, the batch entropy covers the tokens of all processes (as in
        # lucidrains' LFQ); evaluation stays local, so one process may evaluate alone.
        sample_entropy, batch_entropy = entropy_terms(z, self.entropy_temperature, across_processes=self.training)
        entropy_loss = self.sample_entropy_weight * sample_entropy - self.batch_entropy_weight * batch_entropy
        commitment_loss = F.mse_loss(z.to(_loss_dtype(z)), quantised.to(_loss_dtype(z)))
        return LFQOutput(codes, indices, entropy_loss, sample_entropy, batch_entropy, commitment_loss)
