"""Learned source recovery: predict which merged token every grid position belongs to, from the K codes alone.

Needed whenever the true source map is unknown (random-order generation). The official module is a stub; this is
our reading of the paper (docs/design.md §1.5): L learned position queries run through DETR-style decoder blocks
(self-attention among queries, cross-attention to the K code embeddings, MLP); the logit for (position l, token k)
is the dot product of the refined query and the projected token. Trained with a row-wise cross-entropy over K, which matches
the one-parent-per-position structure of the source map. ``num_token_layers`` adds DETR's encoder: self-attention
blocks over the K tokens, so that a token's key knows its neighbours (which groups compete for the same positions).

Token positions, when known, are free information (docs/design.md §1.5): a merged token's position is its group's first
grid position (canonical order), which random-order generation chooses explicitly. Given them, position ``positions[k]``
belongs to token ``k`` for certain and no position before ``positions[k]`` can belong to ``k``; both facts are applied
as hard masks, and a module built with ``with_positions`` also adds a learned embedding of each token's position.
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

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``context_mask`` [B, K] marks the context entries that may be attended to (padding excluded)."""
        batch, length, dim = query.shape
        heads = self.num_heads
        q = self.q(query).view(batch, length, heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


def feed_forward(dim: int, intermediate_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, dim))


class SourceRecoveryBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, intermediate_size)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.norm2(queries), tokens, token_mask)
        return queries + self.mlp(self.norm3(queries))


class TokenEncoderBlock(nn.Module):
    """Pre-norm self-attention and MLP over the K tokens (DETR's encoder, on codes instead of image features)."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, intermediate_size)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(tokens)
        tokens = tokens + self.self_attn(h, h, token_mask)
        return tokens + self.mlp(self.norm2(tokens))


class SourceRecovery(nn.Module):
    """Maps K codes [B, K, bits] to source-map logits [B, L, K]."""

    def __init__(self, codebook_bits: int, num_positions: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, with_positions: bool = False, num_token_layers: int = 0):
        super().__init__()
        self.num_positions = num_positions
        self.code_embed = nn.Linear(codebook_bits, hidden_size)
        self.token_position_embed = nn.Embedding(num_positions, hidden_size) if with_positions else None
        self.token_blocks = nn.ModuleList(
            TokenEncoderBlock(hidden_size, num_heads, intermediate_size) for _ in range(num_token_layers)
        )
        self.norm_in = nn.LayerNorm(hidden_size)
        self.position_queries = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.blocks = nn.ModuleList(
            SourceRecoveryBlock(hidden_size, num_heads, intermediate_size) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_size)
        self.query_head = nn.Linear(hidden_size, hidden_size)
        self.key_head = nn.Linear(hidden_size, hidden_size)

    def forward(self, codes: torch.Tensor, positions: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, K] from codes [B, K, bits] and, optionally, the tokens' grid positions [B, K] (canonical).

        ``token_mask`` [B, K] marks real tokens in a batch padded to a common K: padding is neither attended to nor
        a candidate parent (its logits are -inf).
        """
        if self.token_position_embed is not None and positions is None:
            raise ValueError("this source recovery was trained with token positions: pass positions [B, K]")
        tokens = self.code_embed(codes)
        if self.token_position_embed is not None:
            tokens = tokens + self.token_position_embed(positions)
        for block in self.token_blocks:
            tokens = block(tokens, token_mask)
        tokens = self.norm_in(tokens)
        queries = self.position_queries.expand(codes.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens, token_mask)
        queries = self.query_head(self.norm_out(queries))
        keys = self.key_head(tokens)
        logits = queries @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5
        if positions is not None:
            logits = self.apply_position_constraints(logits, positions)
        return logits if token_mask is None else logits.masked_fill(~token_mask[:, None, :], float("-inf"))

    @staticmethod
    def apply_position_constraints(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A token owns its own position and no position before it: -inf for every parent those facts rule out."""
        grid = torch.arange(logits.shape[1], device=logits.device)[None, :, None]
        token_position = positions[:, None, :]
        is_own = token_position == grid  # [B, L, K]: position l is token k's first position
        allowed = torch.where(is_own.any(dim=-1, keepdim=True), is_own, token_position < grid)
        # A generator may not have chosen position 0 (every real image has it): positions before the first token's
        # then go to the first token rather than to no token.
        allowed[..., 0] |= ~allowed.any(dim=-1)
        return logits.masked_fill(~allowed, float("-inf"))

    @staticmethod
    def token_positions(source_map: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Each token's first grid position [B, K] from a source map [B, L] (its position in canonical order)."""
        batch, length = source_map.shape
        first = torch.full((batch, num_tokens), length, dtype=torch.long, device=source_map.device)
        grid = torch.arange(length, device=source_map.device).expand(batch, -1)
        return first.scatter_reduce(1, source_map.long(), grid, reduce="amin")

    @staticmethod
    def loss(logits: torch.Tensor, source_map: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the K candidates for every position; `source_map` [B, L] holds the true parents."""
        return F.cross_entropy(logits.flatten(0, 1).float(), source_map.flatten())

    @torch.no_grad()
    def predict(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Most likely parent of every position: a source map [B, L] (each position exactly one parent)."""
        return self.forward(codes, positions).argmax(dim=-1)


__all__ = ["SourceRecovery"]
