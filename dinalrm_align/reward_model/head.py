"""The DiNa-LRM reward head: a timestep-conditioned, gated query former.

Data flow for one noise level (D = head width, F = D // 4, Q = number of queries)::

    taps  V_i (B, Nv, C), T_i (B, Nt, C), temb (B, E)
      -> FiLM adapter per tap:  x * (1 + gamma(temb)) + beta(temb) + layer_embed -> Linear(D -> F)
      -> concat taps (B, N, n_taps * F) -> Linear -> V (B, Nv, D), T (B, Nt, D)
    queries (B, Q, D)
      -> attn1: pre-RMSNorm cross-attention to V and to T (separate softmaxes, summed), values
                gated per token by sigmoid(MLP(token)), residual
      -> attn2: pre-RMSNorm cross-attention to V only, residual
      -> FFN:   q + MLP(RMSNorm(q))
      -> Linear(D -> out_dim) per query, mean over queries -> (B, out_dim)

Module attribute names reproduce the released state-dict keys (``rm_head.pt`` loads strictly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FiLMLayerAdapter(nn.Module):
    """Modulates one tapped feature map by the timestep embedding and projects it to ``D // 4``.

    The last condition layer is zero-initialised, so a fresh adapter is an identity modulation.
    """

    def __init__(self, in_dim: int, cond_dim: int, width: int, out_dim: int, use_proj_in: bool) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width) if (use_proj_in or in_dim != width) else nn.Identity()
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cond_mlp = nn.Sequential(
            nn.Linear(cond_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width)
        )
        self.proj = nn.Linear(width, out_dim)
        nn.init.zeros_(self.cond_mlp[2].weight)
        nn.init.zeros_(self.cond_mlp[2].bias)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, N, C), ``temb`` (B, E) -> (B, N, out_dim)."""
        hidden = self.proj_in(tokens)
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)
        hidden = hidden * (1 + gamma) + beta + self.layer_embed
        return self.proj(hidden)


def _token_gate(width: int) -> nn.Sequential:
    """Per-token scalar gate MLP, zero-initialised output (sigmoid(0) = 0.5 at init)."""
    gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
    nn.init.zeros_(gate[2].weight)
    nn.init.zeros_(gate[2].bias)
    return gate


class QueryCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention from queries to a visual and optionally a text context.

    Visual and text contexts get separate key/value projections and separate softmaxes; the two
    attention outputs are summed before the output projection. With ``gated`` the values are
    multiplied by a per-token sigmoid gate computed from the (normalised) context token.
    """

    def __init__(self, width: int, num_heads: int, with_text: bool, gated: bool, dropout: float) -> None:
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(f"head width {width} is not divisible by num_attn_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(width)
        self.norm_v = nn.RMSNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k_vis = nn.Linear(width, width)
        self.to_v_vis = nn.Linear(width, width)
        if with_text:
            self.norm_t = nn.RMSNorm(width)
            self.to_k_text = nn.Linear(width, width)
            self.to_v_text = nn.Linear(width, width)
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))
        self.with_text = with_text
        self.gated = gated
        if gated:
            self.gate_vis = _token_gate(width)
            if with_text:
                self.gate_text = _token_gate(width)

    def _attend(
        self,
        q: torch.Tensor,
        context: torch.Tensor,
        to_k: nn.Linear,
        to_v: nn.Linear,
        gate,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.num_heads
        k = to_k(context)
        v = to_v(context)
        if gate is not None:
            v = v * torch.sigmoid(gate(context))
        split = lambda x: x.unflatten(-1, (h, d // h)).transpose(1, 2)  # noqa: E731  (B, H, N, d/H)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): True = attend
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(b, nq, d)

    def forward(
        self,
        queries: torch.Tensor,
        visual: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``queries`` (B, Q, D), ``visual`` (B, Nv, D), ``text`` (B, Nt, D) or None -> (B, Q, D).

        ``text_mask`` (B, Nt) bool marks real text tokens (None: all real); padding is never attended to.
        """
        q = self.to_q(self.norm_q(queries))
        attended = self._attend(
            q, self.norm_v(visual), self.to_k_vis, self.to_v_vis, self.gate_vis if self.gated else None
        )
        if self.with_text and text is not None:
            attended = attended + self._attend(
                q,
                self.norm_t(text),
                self.to_k_text,
                self.to_v_text,
                self.gate_text if self.gated else None,
                text_mask,
            )
        return queries + self.to_out(attended)


class RewardHead(nn.Module):
    """Query-based reward head over multi-layer backbone features (see module docstring)."""

    def __init__(
        self,
        token_dim: int,
        temb_dim: int,
        n_visual_taps: int,
        n_text_taps: int,
        width: int = -1,
        out_dim: int = 1,
        num_queries: int = 4,
        num_attn_heads: int = 8,
        dropout: float = 0.0,
        use_proj_in: bool = False,
    ) -> None:
        super().__init__()
        width = token_dim if width == -1 else width
        feat = width // 4
        self.width = width

        def adapters(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                FiLMLayerAdapter(token_dim, temb_dim, width, feat, use_proj_in) for _ in range(n)
            )

        self.layer_adapters_visual = adapters(n_visual_taps)
        self.layer_adapters_text = adapters(n_text_taps)
        self.agg_visual = nn.Linear(n_visual_taps * feat, width)
        self.agg_text = nn.Linear(n_text_taps * feat, width) if n_text_taps > 0 else None
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.attn1 = QueryCrossAttention(
            width, num_attn_heads, with_text=n_text_taps > 0, gated=True, dropout=dropout
        )
        self.attn2 = QueryCrossAttention(width, num_attn_heads, with_text=False, gated=False, dropout=dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.head = nn.Linear(width, out_dim)

    @staticmethod
    def _fuse(
        adapters: nn.ModuleList, agg: nn.Linear, taps: list[torch.Tensor], temb: torch.Tensor
    ) -> torch.Tensor:
        if len(taps) != len(adapters):
            raise ValueError(f"expected {len(adapters)} tapped feature maps, got {len(taps)}")
        return agg(torch.cat([adapter(x, temb) for adapter, x in zip(adapters, taps)], dim=-1))

    def context_tokens(
        self, visual_taps: list[torch.Tensor], text_taps: list[torch.Tensor], temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FiLM + aggregation: taps (B, N, C) and ``temb`` (B, E) -> V (B, Nv, D), T (B, Nt, D) or None."""
        visual = self._fuse(self.layer_adapters_visual, self.agg_visual, visual_taps, temb)
        text = None
        if self.agg_text is not None:
            text = self._fuse(self.layer_adapters_text, self.agg_text, text_taps, temb)
        return visual, text

    def readout(
        self, visual: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Queries attend to the fused context tokens: V (B, Nv, D), T (B, Nt, D) -> (B, out_dim).

        ``text_mask`` (B, Nt) bool: real text tokens (None: all real).
        """
        queries = self.query_tokens.expand(visual.shape[0], -1, -1)
        queries = self.attn1(queries, visual, text, text_mask)
        queries = self.attn2(queries, visual)
        queries = queries + self.ff(self.norm_ff(queries))
        return self.head(queries).mean(dim=1)

    def forward(
        self,
        visual_taps: list[torch.Tensor],
        text_taps: list[torch.Tensor],
        temb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Single noise level: -> raw reward (B, out_dim). ``text_mask`` (B, Nt): real text tokens."""
        return self.readout(*self.context_tokens(visual_taps, text_taps, temb), text_mask)

    def forward_ensemble(
        self,
        visual_taps: list[torch.Tensor],
        text_taps: list[torch.Tensor],
        temb: torch.Tensor,
        num_levels: int,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Multi-noise ensemble from ONE batched backbone pass.

        Inputs are level-major stacks: taps (K*B, N, C), ``temb`` (K*B, E), ``text_mask`` (K*B, Nt) or None,
        level k occupying rows ``k*B:(k+1)*B``. Each level's tokens are FiLM-modulated with its own
        ``temb``; the levels are then concatenated along the token axis (level order) and read out once
        -> (B, out_dim).
        """
        visual, text = self.context_tokens(visual_taps, text_taps, temb)

        def by_level(x: torch.Tensor) -> torch.Tensor:
            kb, n = x.shape[:2]
            rest = x.shape[2:]
            return (
                x.reshape(num_levels, kb // num_levels, n, *rest)
                .transpose(0, 1)
                .reshape(kb // num_levels, num_levels * n, *rest)
            )

        mask = by_level(text_mask) if (text_mask is not None and text is not None) else None
        return self.readout(by_level(visual), by_level(text) if text is not None else None, mask)
