"""The ablation alternatives to ACDT: anatomy conditioning by cross-attention, FiLM or LoRA.

Each is a residual block on the token sequence with the same call signature as
``acdt.DeformableTokenBlock`` (offsets returned as None), inserted at the same places, so the
ablation changes only the conditioning mechanism.

* ``cross_attention``: the anatomy vector is expanded into ``num_tokens`` key/value tokens that
  every image token attends to (one token would make the softmax trivial), then an MLP.
* ``film``: ``x + MLP(LN(x) · (1 + γ(a)) + β(a))``.
* ``lora``: an anatomy-gated low-rank residual ``x + U(g(a) ⊙ V·LN(x))`` — a rank-r update
  whose directions are shared and whose per-category scales come from the anatomy; U starts
  at zero (LoRA's init) so the block starts as the identity.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from anaus_core.avit.acdt import DeformableTokenBlock, build_acdt_block


class CrossAttentionConditioning(nn.Module):
    """Tokens (B, T, D) attend to ``num_tokens`` anatomy tokens made from a (B, D) vector."""

    def __init__(self, *, dim: int, num_heads: int, num_tokens: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.expand = nn.Linear(dim, dim * num_tokens)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, tokens: torch.Tensor, anatomy: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, None]:
        keys = self.norm_kv(self.expand(anatomy).reshape(anatomy.shape[0], self.num_tokens, -1)).to(tokens.dtype)
        attended, _ = self.attn(self.norm_query(tokens), keys, keys, need_weights=False)
        tokens = tokens + attended
        return tokens + self.mlp(self.norm_mlp(tokens)), None


class FiLMConditioning(nn.Module):
    """``x + MLP(LN(x)·(1+γ(a)) + β(a))`` on tokens (B, T, D) with anatomy (B, D)."""

    def __init__(self, *, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.film = nn.Linear(dim, 2 * dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, tokens: torch.Tensor, anatomy: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, None]:
        gamma, beta = self.film(anatomy).to(tokens.dtype).chunk(2, dim=-1)
        return tokens + self.mlp(self.norm(tokens) * (1 + gamma[:, None]) + beta[:, None]), None


class LoRAConditioning(nn.Module):
    """``x + U(g(a) ⊙ V·LN(x))`` with V: D -> r, U: r -> D (zero-init), g: anatomy -> r."""

    def __init__(self, *, dim: int, rank: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.gate = nn.Linear(dim, rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, tokens: torch.Tensor, anatomy: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, None]:
        scales = self.gate(anatomy).to(tokens.dtype)[:, None]   # (B, 1, r)
        return tokens + self.up(self.down(self.norm(tokens)) * scales), None


def build_conditioning_block(*, variant: str, dim: int, num_heads: int, kernel_size: int = 3,
                             offset_groups: int = 4, lora_rank: int = 8) -> nn.Module:
    """The block of an ``AViTConfig.acdt`` variant (``none`` has no block: the caller skips it)."""
    if variant == "acdt":
        return build_acdt_block(dim=dim, num_heads=num_heads, kernel_size=kernel_size, offset_groups=offset_groups)
    if variant == "cross_attention":
        return CrossAttentionConditioning(dim=dim, num_heads=num_heads)
    if variant == "film":
        return FiLMConditioning(dim=dim)
    if variant == "lora":
        return LoRAConditioning(dim=dim, rank=lora_rank)
    raise ValueError(f"unknown conditioning variant {variant!r}")


__all__ = ["CrossAttentionConditioning", "DeformableTokenBlock", "FiLMConditioning", "LoRAConditioning",
           "build_conditioning_block"]
