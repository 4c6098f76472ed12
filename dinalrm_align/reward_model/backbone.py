"""Feature backbone: the first N blocks of an SD3 / SD3.5 ``SD3Transformer2DModel``.

The backbone holds its *own* module objects (``pos_embed``, ``time_text_embed``,
``context_embedder``, ``transformer_blocks[:N]``) so that a reward LoRA injected here can never
touch, or be switched by, a policy adapter on the pipeline's transformer. With
``share_base_weights`` the module objects are new but their parameter tensors are the
transformer's own (no memory for a second copy of the base weights).

Attribute names reproduce diffusers' (``transformer_blocks.<i>.attn.to_q`` ...) so that the
released PEFT adapter keys load unchanged.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import nn

#: LoRA targets (PEFT suffix match): joint attention image + context projections, and in dual
#: attention blocks also the image-only ``attn2`` projections.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
_CONTEXT_PROJECTIONS: tuple[str, ...] = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def lora_exclusions(
    num_layers: int, text_head_idx: Sequence[int], use_text_features: bool
) -> list[str] | None:
    """Modules left without LoRA: the last used block's context projections, unless text is tapped there.

    Their output would never be read when the text stream of block ``num_layers`` is not a tap.
    """
    if use_text_features and len(text_head_idx) > 0 and text_head_idx[-1] == num_layers:
        return None
    return [f"transformer_blocks.{num_layers - 1}.attn.{name}" for name in _CONTEXT_PROJECTIONS]


def _strip_adapters(module: nn.Module) -> None:
    """Replace any PEFT-wrapped layers in ``module`` (e.g. a policy LoRA) by their base layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _strip_adapters(child)


class LatentBackbone(nn.Module):
    """First ``num_layers`` MMDiT blocks with feature taps.

    Forward: latents (B, C, H, W), context (B, L, D_joint), pooled (B, D_pooled), timestep (B,) float
    -> ``temb`` (B, D), image-token taps [(B, H*W/p^2, D)], text-token taps [(B, L, D)].
    Tap index i means "after block i" (1-based); 0 means the embedding output before any block.
    """

    def __init__(
        self,
        transformer: nn.Module,
        num_layers: int,
        visual_taps: Sequence[int],
        text_taps: Sequence[int],
        share_base_weights: bool = False,
    ) -> None:
        super().__init__()
        blocks = transformer.transformer_blocks
        if num_layers > len(blocks):
            raise ValueError(
                f"num_transformer_layers={num_layers} exceeds the transformer's {len(blocks)} blocks"
            )
        source = nn.ModuleDict(
            {
                "pos_embed": transformer.pos_embed,
                "time_text_embed": transformer.time_text_embed,
                "context_embedder": transformer.context_embedder,
                "transformer_blocks": nn.ModuleList(list(blocks[:num_layers])),
            }
        )
        memo: dict[int, object] = {}
        if share_base_weights:
            memo = {id(t): t for t in itertools.chain(source.parameters(), source.buffers())}
        own = copy.deepcopy(source, memo)
        _strip_adapters(own)
        self.pos_embed = own["pos_embed"]
        self.time_text_embed = own["time_text_embed"]
        self.context_embedder = own["context_embedder"]
        self.transformer_blocks = own["transformer_blocks"]
        self.visual_taps = list(visual_taps)
        self.text_taps = list(text_taps)
        self.last_block = max(self.visual_taps + self.text_taps)
        config = getattr(transformer, "config", None)
        self.in_channels = int(getattr(config, "in_channels", 16))
        self.patch_size = int(getattr(config, "patch_size", 2))
        self.pos_embed_max_size = getattr(config, "pos_embed_max_size", None)
        self.joint_attention_dim = int(
            getattr(config, "joint_attention_dim", self.context_embedder.in_features)
        )
        self.pooled_projection_dim = int(getattr(config, "pooled_projection_dim", 2048))
        self.inner_dim = int(self.context_embedder.out_features)
        self.gradient_checkpointing = False

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        image = self.pos_embed(latents)
        temb = self.time_text_embed(timestep, pooled_projections)
        text = self.context_embedder(encoder_hidden_states)
        visual_feats = [image] if 0 in self.visual_taps else []
        text_feats = [text] if 0 in self.text_taps else []
        # Blocks after the last tap produce nothing that is read: they are not run.
        for index, block in enumerate(self.transformer_blocks[: self.last_block], start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                text, image = torch.utils.checkpoint.checkpoint(block, image, text, temb, use_reentrant=False)
            else:
                text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
            if index in self.visual_taps:
                visual_feats.append(image)
            if index in self.text_taps:
                text_feats.append(text)
        return temb, visual_feats, text_feats
