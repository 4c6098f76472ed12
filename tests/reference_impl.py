"""An independent, functional re-statement of the DiNa-LRM forward pass (backbone taps, head, output).

Used by the parity tests: it computes the reward from a raw head state dict (the released key
names) and a PEFT-wrapped backbone container, without any code from ``dinalrm_align``'s model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: LoRA targets of the upstream reward model (PEFT suffix match): the joint-attention image and context
#: projections; in SD3.5's dual-attention blocks the suffixes also hit the image-only ``attn2`` projections.
UPSTREAM_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


class PlainBackbone(nn.Module):
    """The container the released adapter was trained on: same attribute names as the transformer."""

    def __init__(self, transformer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(list(transformer.transformer_blocks[:num_layers]))


def backbone_features(bb: nn.Module, latents, context, pooled, timestep, vis_idx, txt_idx):
    img = bb.pos_embed(latents)
    temb = bb.time_text_embed(timestep, pooled)
    txt = bb.context_embedder(context)
    vis_out = [img] if vis_idx[0] == 0 else []
    txt_out = [txt] if txt_idx and txt_idx[0] == 0 else []
    for i, block in enumerate(bb.transformer_blocks):
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        if i + 1 in vis_idx:
            vis_out.append(img)
        if i + 1 in txt_idx:
            txt_out.append(txt)
    return temb, vis_out, txt_out


def _lin(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _rms(sd, key, x):
    return F.rms_norm(x, (x.shape[-1],), sd[key], eps=None)


def _film(sd, prefix, x, temb):
    cond = _lin(sd, prefix + ".cond_mlp.2", F.silu(_lin(sd, prefix + ".cond_mlp.0", temb)))
    gamma, beta = cond[:, None, :].chunk(2, dim=-1)
    x = x * (1 + gamma) + beta
    x = x + sd[prefix + ".layer_embed"]
    return _lin(sd, prefix + ".proj", x)


def _mha(q, k, v, heads):
    b, nq, d = q.shape
    hd = d // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, hd).permute(0, 2, 1, 3)

    att = (split(q) @ split(k).transpose(-1, -2)) / hd**0.5
    out = att.softmax(-1) @ split(v)
    return out.permute(0, 2, 1, 3).reshape(b, nq, d)


def _block(sd, p, queries, vis, txt, heads, gated):
    qn = _rms(sd, p + ".norm_q.weight", queries)
    vn = _rms(sd, p + ".norm_v.weight", vis)
    q = _lin(sd, p + ".to_q", qn)
    kv, vv = _lin(sd, p + ".to_k_vis", vn), _lin(sd, p + ".to_v_vis", vn)
    if gated:
        g = torch.sigmoid(_lin(sd, p + ".gate_vis.2", F.silu(_lin(sd, p + ".gate_vis.0", vn))))
        vv = vv * g
    h = _mha(q, kv, vv, heads)
    if txt is not None:
        tn = _rms(sd, p + ".norm_t.weight", txt)
        kt, vt = _lin(sd, p + ".to_k_text", tn), _lin(sd, p + ".to_v_text", tn)
        g = torch.sigmoid(_lin(sd, p + ".gate_text.2", F.silu(_lin(sd, p + ".gate_text.0", tn))))
        h = h + _mha(q, kt, vt * g, heads)
    return queries + _lin(sd, p + ".to_out.0", h)


def head_tokens(sd, vis_feats, txt_feats, temb):
    v = torch.cat([_film(sd, f"layer_adapters_visual.{i}", x, temb) for i, x in enumerate(vis_feats)], -1)
    v = _lin(sd, "agg_visual", v)
    t = None
    if txt_feats:
        t = torch.cat([_film(sd, f"layer_adapters_text.{i}", x, temb) for i, x in enumerate(txt_feats)], -1)
        t = _lin(sd, "agg_text", t)
    return v, t


def head_readout(sd, v, t, heads):
    q = sd["query_tokens"].expand(v.shape[0], -1, -1)
    q = _block(sd, "attn1", q, v, t, heads, gated=True)
    q = _block(sd, "attn2", q, v, None, heads, gated=False)
    q = q + _lin(sd, "ff.2", F.gelu(_lin(sd, "ff.0", _rms(sd, "norm_ff.weight", q))))
    return _lin(sd, "head", q).mean(dim=1)


def sd35_sigma_table(n: int = 1000, shift: float = 3.0) -> torch.Tensor:
    s = torch.arange(n, 0, -1, dtype=torch.float64) / n
    return (shift * s / (1 + (shift - 1) * s)).float()
