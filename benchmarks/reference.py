"""The architecture minimum of DiNa-LRM on SD3.5, written independently of ``dinalrm_align.reward_model``.

Two independent counts of what one reward call *must* compute (the SD3 embedders, blocks
``1..max(taps)``, the reward LoRA and the query head; nothing after the deepest tap):

* :class:`ReferenceLatentReward` -- a compact re-implementation (from the published description,
  not from the package) running the SD3 embedders, blocks ``1..max(taps)`` and the query head,
  with the backbone LoRA either as explicit low-rank matmuls (``lora="unmerged"``, what PEFT does)
  or folded into the frozen weights (``lora="merged"``: zero extra work, possible whenever the
  reward's base weights are not shared with a policy). Counted with ``FlopCounterMode`` like the
  project's model, forward and backward.
* :func:`analytic_forward_flops` -- closed-form matmul FLOPs of the same forward, a cross-check
  of the counted reference (they agree exactly; see ``tests/test_benchmarks.py``).

The head (:func:`reference_head`, :func:`analytic_head_flops`) and the LoRA wrapper (:func:`wrap_lora`) are
shared with the FLUX.1 / Z-Image minimum (``benchmarks.reference_families``). Anything the project's
``LatentRewardModel`` computes beyond these numbers is overhead; :func:`analytic_output_layer_flops` is
the closed form of SD3's output layers, which a forward of the whole transformer would also run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Suffixes of the linears that carry the reward LoRA (PEFT suffix match).
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
    """Optional input projection to the head width, timestep FiLM, then a projection to a quarter width."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, proj_in: bool) -> None:
        super().__init__()
        self.proj_in = nn.Linear(token_dim, width) if (proj_in or token_dim != width) else nn.Identity()
        self.cond = nn.Sequential(nn.Linear(cond_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.embed = nn.Parameter(torch.zeros(1, 1, width))
        self.out = nn.Linear(width, width // 4)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.cond(temb)[:, None].chunk(2, dim=-1)
        return self.out(self.proj_in(x) * (1 + scale) + shift + self.embed)


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
    """FiLM per tap -> aggregation -> gated query attention (visual + text) -> visual attention -> FFN -> mean.

    ``token_dim``: width of the tapped tokens; ``cond_dim``: width of the timestep embedding; ``width``: the
    head's own width (``proj_in`` maps the taps to it; always on when the two widths differ).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, n_visual: int, n_text: int, num_queries: int,
                 heads: int, proj_in: bool = False) -> None:
        super().__init__()
        dim = width
        self.film_v = nn.ModuleList(_FiLM(token_dim, cond_dim, dim, proj_in) for _ in range(n_visual))
        self.film_t = nn.ModuleList(_FiLM(token_dim, cond_dim, dim, proj_in) for _ in range(n_text))
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


def wrap_lora(module: nn.Module, suffixes: Sequence[str], lora_config: Mapping[str, Any],
              skip: Sequence[str] = ()) -> int:
    """Wrap every ``nn.Linear`` of ``module`` whose name ends with one of ``suffixes`` (and with none of
    ``skip``) in an unmerged LoRA of ``lora_config`` (``r``, ``lora_alpha``); returns how many were wrapped."""
    wrapped = 0
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or not name.endswith(tuple(suffixes)):
            continue
        if skip and name.endswith(tuple(skip)):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        low_rank = _LowRankLinear(child, int(lora_config["r"]), float(lora_config["lora_alpha"]))
        if isinstance(parent, nn.ModuleList):
            parent[int(attr)] = low_rank
        else:
            setattr(parent, attr, low_rank)
        wrapped += 1
    return wrapped


def reference_head(transformer: nn.Module, model_section: Mapping[str, Any], token_dim: int,
                   temb_dim: int) -> _ReferenceHead:
    """The reference head for the config's taps and ``reward_head`` section, on ``transformer``'s device and
    dtype (``width`` -1 = ``token_dim``)."""
    vis = list(model_section["visual_head_idx"])
    txt = list(model_section["text_head_idx"]) if model_section.get("use_text_features", True) else []
    head = model_section["reward_head"]
    width = int(head.get("width", -1))
    width = token_dim if width == -1 else width
    param = next(transformer.parameters())
    with torch.device(param.device):
        out = _ReferenceHead(token_dim, temb_dim, width, len(vis), len(txt), int(head["num_queries"]),
                             int(head["num_attn_heads"]), proj_in=bool(head.get("use_proj_in", False)))
    return out.to(dtype=param.dtype)


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
            n = int(model_section["num_transformer_layers"])
            skip_last_context = not (txt and txt[-1] == n)
            for index, block in enumerate(self.blocks):
                skip = _CONTEXT_SUFFIXES if (skip_last_context and index == n - 1) else ()
                wrap_lora(block, LORA_SUFFIXES, model_section["lora_config"], skip=skip)
        dim = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        self.head = reference_head(transformer, model_section, token_dim=dim, temb_dim=dim)
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
    head = analytic_head_flops(model_section, token_dim=d, temb_dim=d, image_tokens=n, text_tokens=m, batch=b)
    total = embed + blocks + lora_flops + head
    return {"embed": embed, "blocks": blocks, "lora": lora_flops, "head": head, "total": total}


def analytic_output_layer_flops(transformer_config: Mapping[str, Any], image_tokens: int, batch: int = 1) -> int:
    """Closed-form FLOPs of SD3's output layers (``norm_out``'s AdaLN linear on ``temb`` and ``proj_out`` on
    the image tokens): not part of the reward's minimum (the head never reads them), but run by a forward
    of the whole diffusers transformer."""
    c = transformer_config
    d = int(c["num_attention_heads"] * c["attention_head_dim"])
    p = int(c["patch_size"])
    out_channels = int(c.get("out_channels") or c["in_channels"])
    return 2 * batch * d * 2 * d + 2 * batch * image_tokens * d * p * p * out_channels


def analytic_head_flops(
    model_section: Mapping[str, Any], token_dim: int, temb_dim: int, image_tokens: int, text_tokens: int,
    batch: int = 1,
) -> int:
    """Closed-form FLOPs (2 per MAC) of the query head on ``image_tokens`` / ``text_tokens`` tapped tokens of
    width ``token_dim``, FiLM-conditioned on a ``temb_dim`` embedding (the ``reward_head`` section's width,
    -1 = ``token_dim``; an input projection when ``use_proj_in`` or the widths differ)."""
    head_cfg = model_section["reward_head"]
    vis = list(model_section["visual_head_idx"])
    txt = list(model_section["text_head_idx"]) if model_section.get("use_text_features", True) else []
    d = int(head_cfg.get("width", -1))
    d = token_dim if d == -1 else d
    q = int(head_cfg["num_queries"])
    n, m, b = image_tokens, text_tokens, batch
    f = d // 4
    nv, nt = len(vis), len(txt)
    head = (nv + nt) * 2 * b * (temb_dim * 2 * d + 2 * d * 2 * d)  # FiLM condition MLPs
    if head_cfg.get("use_proj_in", False) or token_dim != d:
        head += 2 * b * (nv * n + nt * m) * token_dim * d  # input projections to the head width
    head += 2 * b * (nv * n + nt * m) * d * f  # per-tap projections
    head += 2 * b * (n * nv * f * d + (m * nt * f * d if nt else 0))  # aggregation
    ctx1 = n + (m if nt else 0)
    head += 2 * b * q * d * d * 2  # attn1 q, out
    head += 2 * b * ctx1 * d * d * 2  # attn1 k, v
    head += 2 * b * ctx1 * (d * d + d)  # value gates
    head += 2 * 2 * b * q * ctx1 * d  # attn1 SDPA (two softmaxes, same total)
    head += 2 * b * q * d * d * 2 + 2 * b * n * d * d * 2 + 2 * 2 * b * q * n * d  # attn2
    head += 2 * b * q * d * 4 * d * 2 + 2 * b * q * d  # FFN + output
    return head
