"""The architecture minimum of DiNa-LRM on FLUX.1 and Z-Image, independent of ``dinalrm_align.reward_model``.

What one reward call must compute: the family's embedders, its kept blocks up to the deepest tap, the
reward LoRA and the query head; nothing after the deepest tap (no single-stream block of FLUX, no main
layer of Z-Image beyond the last tap, no output layer). Two counts, as for SD3 (``benchmarks.reference``):

* :class:`ReferenceFluxReward` / :class:`ReferenceZImageReward` -- compact forwards written from the
  published architecture (a hand-written loop over the family's own diffusers blocks: packing, position ids,
  padding and time scaling done here, not by the transformer's ``forward`` or the project's adapter), with
  the reward LoRA unmerged (explicit low-rank matmuls) or merged (no extra work), and the reference head.
  Counted with ``FlopCounterMode``, forward and backward.
* :func:`analytic_flux_forward_flops` / :func:`analytic_zimage_forward_flops` -- closed-form FLOPs of the
  same forwards (2 per multiply-accumulate).

Z-Image: image and caption tokens are each padded to a multiple of 32 (the architecture's own padding);
the taps read the real image tokens and the real caption tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from benchmarks.reference import analytic_head_flops, reference_head, wrap_lora

#: Reward-LoRA targets (suffix match): FLUX's 8 joint-attention projections, Z-Image's 4 attention ones.
FLUX_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_CONTEXT_SUFFIXES = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ZIMAGE_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
SEQ_MULTIPLE = 32  # Z-Image pads image and caption tokens to a multiple of this


def _taps(section: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    vis = list(section["visual_head_idx"])
    txt = list(section["text_head_idx"]) if section.get("use_text_features", True) else []
    return vis, txt


def _check_lora_mode(lora: str) -> None:
    if lora not in ("unmerged", "merged", "none"):
        raise ValueError(f"lora must be 'unmerged', 'merged' or 'none', got {lora!r}")


def _lora_on(section: Mapping[str, Any], lora: str) -> bool:
    return lora == "unmerged" and bool(section.get("use_lora")) and not section.get("freeze_backbone", False)


def _padded(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


class ReferenceFluxReward(nn.Module):
    """Minimal DiNa-LRM forward on a FLUX.1 transformer (weights shared with it, never copied)."""

    def __init__(self, transformer: nn.Module, model_section: Mapping[str, Any], lora: str = "unmerged") -> None:
        super().__init__()
        _check_lora_mode(lora)
        self.visual_taps, self.text_taps = _taps(model_section)
        self.last = max(self.visual_taps + self.text_taps)
        memo = {id(t): t for t in list(transformer.parameters()) + list(transformer.buffers())}
        for name in ("x_embedder", "time_text_embed", "context_embedder", "pos_embed"):
            setattr(self, name, copy.deepcopy(getattr(transformer, name), dict(memo)))
        self.blocks = nn.ModuleList(copy.deepcopy(b, dict(memo)) for b in transformer.transformer_blocks[: self.last])
        if _lora_on(model_section, lora):
            n = int(model_section["num_transformer_layers"])
            skip_last = not (self.text_taps and self.text_taps[-1] == n)
            for index, block in enumerate(self.blocks):
                skip = FLUX_CONTEXT_SUFFIXES if (skip_last and index == n - 1) else ()
                wrap_lora(block, FLUX_LORA_SUFFIXES, model_section["lora_config"], skip=skip)
        dim = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        self.head = reference_head(transformer, model_section, token_dim=dim, temb_dim=dim)
        self.requires_grad_(False)
        self.eval()

    def forward(self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, sigma: float,
                guidance: float | None) -> torch.Tensor:
        """Noisy latents (B,16,h,w), T5 tokens (B,L,4096), pooled CLIP (B,768) -> raw reward (B,)."""
        b, c, h, w = noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
        rows = torch.arange(h // 2, device=noisy.device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=noisy.device).repeat(h // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).to(noisy.dtype)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        t = torch.full((b,), 1000.0 * sigma, device=noisy.device, dtype=noisy.dtype)  # the embedder takes 1000 sigma
        if guidance is None:
            temb = self.time_text_embed(t, pooled)
        else:
            temb = self.time_text_embed(t, torch.full_like(t, 1000.0 * guidance), pooled)
        image = self.x_embedder(packed)
        text = self.context_embedder(prompt_embeds)
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids]))
        vis, txt = [], []
        for i, block in enumerate(self.blocks, start=1):
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
            if i in self.visual_taps:
                vis.append(image)
            if i in self.text_taps:
                txt.append(text)
        return self.head(vis, txt, temb)

    def score(self, latents: torch.Tensor, noise: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
              sigma: float = 0.4, guidance: float | None = 3.5) -> torch.Tensor:
        """Re-noise clean latents at ``sigma`` and score them."""
        return self(latents * (1 - sigma) + noise * sigma, prompt_embeds, pooled, sigma, guidance)


class ReferenceZImageReward(nn.Module):
    """Minimal DiNa-LRM forward on a Z-Image transformer (weights shared with it, never copied).

    Every sample of a batch has the same caption length (no attention masks: batch 1 in the benchmarks).
    """

    def __init__(self, transformer: nn.Module, model_section: Mapping[str, Any], lora: str = "unmerged") -> None:
        super().__init__()
        _check_lora_mode(lora)
        self.visual_taps, self.text_taps = _taps(model_section)
        self.last = max(self.visual_taps + self.text_taps)
        memo = {id(t): t for t in list(transformer.parameters()) + list(transformer.buffers())}
        key = f"{transformer.config.all_patch_size[0]}-{transformer.config.all_f_patch_size[0]}"
        self.patch = int(transformer.config.all_patch_size[0])
        self.t_scale = float(transformer.config.t_scale)
        self.x_embedder = copy.deepcopy(transformer.all_x_embedder[key], dict(memo))
        for name in ("t_embedder", "cap_embedder", "noise_refiner", "context_refiner"):
            setattr(self, name, copy.deepcopy(getattr(transformer, name), dict(memo)))
        self.x_pad_token, self.cap_pad_token = transformer.x_pad_token, transformer.cap_pad_token
        self.blocks = nn.ModuleList(copy.deepcopy(b, dict(memo)) for b in transformer.layers[: self.last])
        self.rope = copy.copy(transformer.rope_embedder)  # a table lookup, no parameters
        if _lora_on(model_section, lora):
            for stack in (self.noise_refiner, self.context_refiner, self.blocks):
                wrap_lora(stack, ZIMAGE_LORA_SUFFIXES, model_section["lora_config"])
        dim = int(transformer.config.dim)
        temb_dim = int(transformer.t_embedder.mlp[-1].out_features)
        self.head = reference_head(transformer, model_section, token_dim=dim, temb_dim=temb_dim)
        self.requires_grad_(False)
        self.eval()

    def _grid(self, f: int, h: int, w: int, start: int, device: torch.device) -> torch.Tensor:
        axes = [torch.arange(start, start + f), torch.arange(h), torch.arange(w)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).to(device)

    def forward(self, noisy: torch.Tensor, captions: torch.Tensor, sigma: float) -> torch.Tensor:
        """Noisy latents (B,16,h,w), Qwen3 caption tokens (B,L,2560) -> raw reward (B,)."""
        b, c, h, w = noisy.shape
        p, dev = self.patch, noisy.device
        n, length = (h // p) * (w // p), captions.shape[1]
        n_pad, l_pad = _padded(n), _padded(length)
        # patchify (channel order dy, dx, c) and pad by repeating the last token, later replaced by the pad token
        tokens = noisy.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        tokens = torch.cat([tokens, tokens[:, -1:].expand(b, n_pad - n, -1)], 1)
        caps = torch.cat([captions, captions[:, -1:].expand(b, l_pad - length, -1)], 1)
        # position ids: caption k -> (1 + k, 0, 0); image -> (l_pad + 1, row, col); padding -> (0, 0, 0)
        cap_ids = self._grid(l_pad, 1, 1, 1, dev)
        img_ids = torch.cat([self._grid(1, h // p, w // p, l_pad + 1, dev),
                             torch.zeros(n_pad - n, 3, dtype=torch.long, device=dev)])
        cap_ids[length:] = 0
        x_freqs, cap_freqs = self.rope(img_ids)[None], self.rope(cap_ids)[None]
        t = torch.full((b,), 1.0 - sigma, device=dev, dtype=noisy.dtype)  # Z-Image's time runs from noise to data
        adaln = self.t_embedder(t * self.t_scale).type_as(noisy)
        x = self.x_embedder(tokens)
        x = torch.cat([x[:, :n], self.x_pad_token.expand(b, n_pad - n, -1).to(x.dtype)], 1)
        for block in self.noise_refiner:
            x = block(x, None, x_freqs, adaln)
        cap = self.cap_embedder(caps)
        cap = torch.cat([cap[:, :length], self.cap_pad_token.expand(b, l_pad - length, -1).to(cap.dtype)], 1)
        for block in self.context_refiner:
            cap = block(cap, None, cap_freqs)
        unified, freqs = torch.cat([x, cap], 1), torch.cat([x_freqs, cap_freqs], 1)
        vis, txt = [], []
        for i, block in enumerate(self.blocks, start=1):
            unified = block(unified, None, freqs, adaln)
            if i in self.visual_taps:
                vis.append(unified[:, :n])
            if i in self.text_taps:
                txt.append(unified[:, n_pad : n_pad + length])
        return self.head(vis, txt, adaln)

    def score(self, latents: torch.Tensor, noise: torch.Tensor, captions: torch.Tensor,
              sigma: float = 0.4) -> torch.Tensor:
        """Re-noise clean latents at ``sigma`` and score them."""
        return self(latents * (1 - sigma) + noise * sigma, captions, sigma)


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------


def _lora_rank(section: Mapping[str, Any], lora: bool) -> int:
    return int(section.get("lora_config", {}).get("r", 0)) if lora and section.get("use_lora") else 0


def analytic_flux_forward_flops(
    transformer_config: Mapping[str, Any], model_section: Mapping[str, Any], image_tokens: int, text_tokens: int,
    batch: int = 1, lora: bool = True,
) -> dict[str, int]:
    """Closed-form FLOPs of one FLUX reward forward: ``{"embed", "blocks", "lora", "head", "total"}``.

    Double-stream block: AdaLN-Zero linears (6 chunks) on both streams, q/k/v/out on both streams, joint
    attention over image + text tokens, a 4x GELU FFN on both streams.
    """
    c = transformer_config
    d = int(c["num_attention_heads"] * c["attention_head_dim"])
    n, m, b = image_tokens, text_tokens, batch
    vis, txt = _taps(model_section)
    last = max(vis + txt)
    embed = 2 * b * n * int(c["in_channels"]) * d  # x_embedder on the packed tokens
    embed += 2 * b * (256 * d + d * d) * (2 if c.get("guidance_embeds") else 1)  # timestep (+ guidance) MLP
    embed += 2 * b * (int(c["pooled_projection_dim"]) * d + d * d)  # pooled-text MLP
    embed += 2 * b * m * int(c["joint_attention_dim"]) * d  # context embedder
    per_block = 2 * b * 2 * 6 * d * d + 2 * b * 4 * (n + m) * d * d + 2 * 2 * b * (n + m) ** 2 * d
    per_block += 2 * b * 8 * (n + m) * d * d
    blocks = last * per_block
    r = _lora_rank(model_section, lora)
    n_layers = int(model_section["num_transformer_layers"])
    lora_flops = 0
    for i in range(last):
        ctx = 0 if (i == n_layers - 1 and not (txt and txt[-1] == n_layers)) else 4
        lora_flops += 2 * b * (4 * n + ctx * m) * r * 2 * d if r else 0
    head = analytic_head_flops(model_section, token_dim=d, temb_dim=d, image_tokens=n, text_tokens=m, batch=b)
    total = embed + blocks + lora_flops + head
    return {"embed": embed, "blocks": blocks, "lora": lora_flops, "head": head, "total": total}


def analytic_zimage_forward_flops(
    transformer_config: Mapping[str, Any], model_section: Mapping[str, Any], image_tokens: int, text_tokens: int,
    batch: int = 1, lora: bool = True,
) -> dict[str, int]:
    """Closed-form FLOPs of one Z-Image reward forward: ``{"embed", "blocks", "lora", "head", "total"}``.

    ``image_tokens`` / ``text_tokens`` are the real counts (padded to multiples of 32 inside). Block: q/k/v/out
    (no bias), attention, SwiGLU FFN (hidden ``int(dim / 3 * 8)``), adaLN linear on the 256-wide time
    embedding in the modulated blocks (noise refiner, main layers; the context refiner is unmodulated).
    """
    c = transformer_config
    d = int(c["dim"])
    hidden = int(d / 3 * 8)
    temb = min(d, 256)
    n, m, b = image_tokens, text_tokens, batch
    n_pad, m_pad = _padded(n), _padded(m)
    vis, txt = _taps(model_section)
    last = max(vis + txt)
    p = int(c["all_patch_size"][0])
    refiners = int(c["n_refiner_layers"])
    embed = 2 * b * (256 * 1024 + 1024 * temb)  # time MLP 256 -> 1024 -> 256
    embed += 2 * b * n_pad * p * p * int(c["in_channels"]) * d + 2 * b * m_pad * int(c["cap_feat_dim"]) * d

    def block(tokens: int, modulated: bool) -> int:
        flops = 2 * b * 4 * tokens * d * d + 2 * 2 * b * tokens**2 * d + 2 * b * 3 * tokens * d * hidden
        return flops + (2 * b * temb * 4 * d if modulated else 0)

    blocks = refiners * (block(n_pad, True) + block(m_pad, False)) + last * block(n_pad + m_pad, True)
    r = _lora_rank(model_section, lora)
    lora_flops = 2 * b * 4 * (refiners * (n_pad + m_pad) + last * (n_pad + m_pad)) * r * 2 * d if r else 0
    head = analytic_head_flops(model_section, token_dim=d, temb_dim=temb, image_tokens=n, text_tokens=m, batch=b)
    total = embed + blocks + lora_flops + head
    return {"embed": embed, "blocks": blocks, "lora": lora_flops, "head": head, "total": total}
