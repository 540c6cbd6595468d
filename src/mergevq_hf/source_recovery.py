"""Learned source recovery: predict which merged token every grid position belongs to, from the K codes alone.

Needed whenever the true source map is unknown (random-order generation). The official module is a stub; this is
our reading of the paper (docs/design.md §1.5): L learned position queries run through DETR-style decoder blocks
(self-attention among queries, cross-attention to the K code embeddings, MLP); the logit for (position l, token k)
is the dot product of the refined query and the projected token. Trained with a row-wise cross-entropy over K, which matches
the one-parent-per-position structure of the source map.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention from `query` to `context` (self-attention when both are the same tensor)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, dim = query.shape
        heads = self.num_heads
        q = self.q(query).view(batch, length, heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class SourceRecoveryBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm1(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.norm2(queries), tokens)
        return queries + self.mlp(self.norm3(queries))


class SourceRecovery(nn.Module):
    """Maps K codes [B, K, bits] to source-map logits [B, L, K]."""

    def __init__(self, codebook_bits: int, num_positions: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int):
        super().__init__()
        self.num_positions = num_positions
        self.rec_embed = nn.Linear(codebook_bits, hidden_size)
        self.norm_in = nn.LayerNorm(hidden_size)
        self.rec_tokens = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.blocks = nn.ModuleList(
            SourceRecoveryBlock(hidden_size, num_heads, intermediate_size) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_size)
        self.rec_head = nn.Linear(hidden_size, hidden_size)
        self.key_head = nn.Linear(hidden_size, hidden_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        tokens = self.norm_in(self.rec_embed(codes))
        queries = self.rec_tokens.expand(codes.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens)
        queries = self.rec_head(self.norm_out(queries))
        keys = self.key_head(tokens)
        return queries @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5

    @staticmethod
    def loss(logits: torch.Tensor, source_map: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the K candidates for every position; `source_map` [B, L] holds the true parents."""
        return F.cross_entropy(logits.flatten(0, 1).float(), source_map.flatten())

    @torch.no_grad()
    def predict(self, codes: torch.Tensor) -> torch.Tensor:
        """Most likely parent of every position: a source map [B, L] (each position exactly one parent)."""
        return self.forward(codes).argmax(dim=-1)


__all__ = ["SourceRecovery"]
