"""The architecture minimum of DiNa-LRM, written independently of ``dinalrm_align.reward_model``.

Two independent counts of what one reward call *must* compute (spec dina_lrm.md 1.2-1.5):

* :class:`ReferenceLatentReward` -- a compact re-implementation (from the spec's description,
  not from the package) running the SD3 embedders, blocks ``1..max(taps)`` and the query head,
  with the backbone LoRA either as explicit low-rank matmuls (``lora="unmerged"``, what PEFT does)
  or folded into the frozen weights (``lora="merged"``: zero extra work, possible whenever the
  reward's base weights are not shared with a policy). Counted with ``FlopCounterMode`` like the
  project's model, forward and backward.
* :func:`analytic_forward_flops` -- closed-form matmul FLOPs of the same forward, a cross-check
  of the counted reference (they agree exactly; see ``tests/test_benchmarks.py``).

Anything the project's ``LatentRewardModel`` computes beyond these numbers is overhead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Suffixes of the linears that carry the reward LoRA (PEFT suffix match, spec 1.5).
LORA_SUFFIXES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
_CONTEXT_SUFFIXES = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class _LowRankLinear(nn.Module):
    """``base(x) + scale * up(down(x))``: an unmerged LoRA around a frozen linear."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.down = nn.Linear(base.in_features, r, bias=False, **kw)
        self.up = nn.Linear(r, base.out_features, bias=False, **kw)
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


class _FiLM(nn.Module):
    """Timestep FiLM of one tapped map, then a projection to a quarter width."""

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(cond_dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim))
        self.embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.out = nn.Linear(dim, dim // 4)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.cond(temb)[:, None].chunk(2, dim=-1)
        return self.out(x * (1 + scale) + shift + self.embed)


class _QueryAttention(nn.Module):
    """Queries read one or two contexts (separate softmaxes, summed), optional sigmoid value gates."""

    def __init__(self, dim: int, heads: int, n_contexts: int, gated: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q_norm = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.ctx_norm = nn.ModuleList(nn.RMSNorm(dim) for _ in range(n_contexts))
        self.k = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_contexts))
        self.v = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_contexts))
        self.gate = (
            nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1)) for _ in range(n_contexts))
            if gated
            else None
        )
        self.o = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, contexts: Sequence[torch.Tensor]) -> torch.Tensor:
        b, nq, d = queries.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)

        q = heads(self.q(self.q_norm(queries)))
        acc = 0
        for i, ctx in enumerate(contexts):
            c = self.ctx_norm[i](ctx)
            v = self.v[i](c)
            if self.gate is not None:
                v = v * torch.sigmoid(self.gate[i](c))
            acc = acc + F.scaled_dot_product_attention(q, heads(self.k[i](c)), heads(v))
        return queries + self.o(acc.transpose(1, 2).reshape(b, nq, d))


class _ReferenceHead(nn.Module):
    """FiLM per tap -> aggregation -> gated query attention (visual + text) -> visual attention -> FFN -> mean."""

    def __init__(self, dim: int, n_visual: int, n_text: int, num_queries: int, heads: int) -> None:
        super().__init__()
        self.film_v = nn.ModuleList(_FiLM(dim, dim) for _ in range(n_visual))
        self.film_t = nn.ModuleList(_FiLM(dim, dim) for _ in range(n_text))
        self.agg_v = nn.Linear(n_visual * (dim // 4), dim)
        self.agg_t = nn.Linear(n_text * (dim // 4), dim) if n_text else None
        self.queries = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.read_both = _QueryAttention(dim, heads, 2 if n_text else 1, gated=True)
        self.read_visual = _QueryAttention(dim, heads, 1, gated=False)
        self.ff_norm = nn.RMSNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, 1)

    def forward(self, vis: Sequence[torch.Tensor], txt: Sequence[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        v = self.agg_v(torch.cat([f(x, temb) for f, x in zip(self.film_v, vis)], -1))
        contexts = [v]
        if self.agg_t is not None:
            contexts.append(self.agg_t(torch.cat([f(x, temb) for f, x in zip(self.film_t, txt)], -1)))
        q = self.queries.expand(v.shape[0], -1, -1)
        q = self.read_both(q, contexts)
        q = self.read_visual(q, [v])
        q = q + self.ff(self.ff_norm(q))
        return self.out(q).mean(dim=(1, 2))


class ReferenceLatentReward(nn.Module):
    """Minimal DiNa-LRM forward on a given SD3 transformer (weights shared, never copied).

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` (any device, meta included).
        model_section: the released config's ``model`` section (taps, LoRA r/alpha, head sizes).
        lora: ``"unmerged"`` (explicit low-rank matmuls), ``"merged"`` / ``"none"`` (no extra work).
    """

    def __init__(self, transformer: nn.Module, model_section: Mapping[str, Any], lora: str = "unmerged") -> None:
        super().__init__()
        if lora not in ("unmerged", "merged", "none"):
            raise ValueError(f"lora must be 'unmerged', 'merged' or 'none', got {lora!r}")
        vis = list(model_section["visual_head_idx"])
        txt = list(model_section["text_head_idx"]) if model_section.get("use_text_features", True) else []
        self.visual_taps, self.text_taps = vis, txt
        self.last = max(vis + txt)
        shared = {id(t): t for t in list(transformer.parameters()) + list(transformer.buffers())}
        self.pos_embed = copy.deepcopy(transformer.pos_embed, dict(shared))
        self.time_text_embed = copy.deepcopy(transformer.time_text_embed, dict(shared))
        self.context_embedder = copy.deepcopy(transformer.context_embedder, dict(shared))
        self.blocks = nn.ModuleList(
            copy.deepcopy(b, dict(shared)) for b in transformer.transformer_blocks[: self.last]
        )
        use_lora = lora == "unmerged" and model_section.get("use_lora", False) and not model_section.get(
            "freeze_backbone", False
        )
        if use_lora:
            cfg = model_section["lora_config"]
            n = int(model_section["num_transformer_layers"])
            skip_last_context = not (txt and txt[-1] == n)
            for index, block in enumerate(self.blocks):
                for name, module in list(block.named_modules()):
                    if not isinstance(module, nn.Linear) or not name.endswith(LORA_SUFFIXES):
                        continue
                    if skip_last_context and index == n - 1 and name.startswith("attn.") and name.endswith(_CONTEXT_SUFFIXES):
                        continue
                    parent_name, _, child = name.rpartition(".")
                    parent = block.get_submodule(parent_name)
                    wrapped = _LowRankLinear(module, int(cfg["r"]), float(cfg["lora_alpha"]))
                    if isinstance(parent, nn.ModuleList):
                        parent[int(child)] = wrapped
                    else:
                        setattr(parent, child, wrapped)
        dim = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        head = model_section["reward_head"]
        device = next(transformer.parameters()).device
        with torch.device(device):
            self.head = _ReferenceHead(dim, len(vis), len(txt), int(head["num_queries"]), int(head["num_attn_heads"]))
        self.head.to(dtype=next(transformer.parameters()).dtype)
        self.requires_grad_(False)
        self.eval()

    def forward(
        self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """Noisy latents (B,16,h,w), text (B,L,4096), pooled (B,2048), timestep (B,) -> raw reward (B,)."""
        image = self.pos_embed(noisy)
        temb = self.time_text_embed(timestep, pooled)
        text = self.context_embedder(prompt_embeds)
        vis = [image] if 0 in self.visual_taps else []
        txt = [text] if 0 in self.text_taps else []
        for i, block in enumerate(self.blocks, start=1):
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
            if i in self.visual_taps:
                vis.append(image)
            if i in self.text_taps:
                txt.append(text)
        return self.head(vis, txt, temb)

    def score(
        self, latents: torch.Tensor, noise: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, sigma: float = 0.4
    ) -> torch.Tensor:
        """Re-noise clean latents at ``sigma`` and score them (what ``LatentRewardModel.score`` does)."""
        t = torch.full((latents.shape[0],), 1000.0 * sigma, device=latents.device, dtype=latents.dtype)
        return self(latents * (1 - sigma) + noise * sigma, prompt_embeds, pooled, t)


def analytic_forward_flops(
    transformer_config: Mapping[str, Any],
    model_section: Mapping[str, Any],
    image_tokens: int,
    text_tokens: int,
    batch: int = 1,
    lora: bool = True,
) -> dict[str, int]:
    """Closed-form matmul/conv/attention FLOPs (2 per MAC) of one reward forward.

    Returns ``{"embed", "blocks", "lora", "head", "total"}``. Mirrors diffusers' SD3 block: AdaLN-Zero
    (X variant with 9 chunks in dual-attention blocks), joint attention, optional image-only attn2,
    4x GELU FFN on both streams.
    """
    c = transformer_config
    d = int(c["num_attention_heads"] * c["attention_head_dim"])
    n, m, b = image_tokens, text_tokens, batch
    vis = list(model_section["visual_head_idx"])
    txt = list(model_section["text_head_idx"]) if model_section.get("use_text_features", True) else []
    last = max(vis + txt)
    dual = set(c.get("dual_attention_layers", ()))
    p = int(c["patch_size"])
    embed = 2 * b * n * (c["in_channels"] * p * p) * d  # patchify conv
    embed += 2 * b * (256 * d + d * d)  # timestep MLP
    embed += 2 * b * (c["pooled_projection_dim"] * d + d * d)  # pooled-text MLP
    embed += 2 * b * m * c["joint_attention_dim"] * d  # context embedder
    blocks = 0
    lora_flops = 0
    r = int(model_section.get("lora_config", {}).get("r", 0)) if lora and model_section.get("use_lora") else 0
    n_layers = int(model_section["num_transformer_layers"])
    for i in range(last):
        is_dual = i in dual
        blocks += 2 * b * d * (9 if is_dual else 6) * d + 2 * b * d * 6 * d  # AdaLN modulations
        blocks += 2 * b * 4 * (n + m) * d * d  # q,k,v,out of both streams
        blocks += 2 * 2 * b * (n + m) ** 2 * d  # joint attention QK^T and AV
        blocks += 2 * b * 8 * (n + m) * d * d  # two 4x FFNs
        if is_dual:
            blocks += 2 * b * 4 * n * d * d + 2 * 2 * b * n * n * d
        if r:
            img_linears = 8 if is_dual else 4
            ctx_linears = 4
            if i == n_layers - 1 and not (txt and txt[-1] == n_layers):
                ctx_linears = 0
            lora_flops += 2 * b * (img_linears * n + ctx_linears * m) * r * 2 * d
    head_cfg = model_section["reward_head"]
    q = int(head_cfg["num_queries"])
    f = d // 4
    nv, nt = len(vis), len(txt)
    head = (nv + nt) * 2 * b * (d * 2 * d + 2 * d * 2 * d)  # FiLM condition MLPs
    head += 2 * b * (nv * n + nt * m) * d * f  # per-tap projections
    head += 2 * b * (n * nv * f * d + (m * nt * f * d if nt else 0))  # aggregation
    ctx1 = n + (m if nt else 0)
    head += 2 * b * q * d * d * 2  # attn1 q, out
    head += 2 * b * ctx1 * d * d * 2  # attn1 k, v
    head += 2 * b * ctx1 * (d * d + d)  # value gates
    head += 2 * 2 * b * q * ctx1 * d  # attn1 SDPA (two softmaxes, same total)
    head += 2 * b * q * d * d * 2 + 2 * b * n * d * d * 2 + 2 * 2 * b * q * n * d  # attn2
    head += 2 * b * q * d * 4 * d * 2 + 2 * b * q * d  # FFN + output
    total = embed + blocks + lora_flops + head
    return {"embed": embed, "blocks": blocks, "lora": lora_flops, "head": head, "total": total}
