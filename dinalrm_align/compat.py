"""Drop-in replacement for the upstream scorer ``DRMInferencer``.

Code written against ``diffusion_rm.infer.inference.DRMInferencer`` works unchanged::

    scorer = DRMInferencer(pipe, None, "liuhuohuo/DiNa-LRM-SD35M-12layers", device="cuda",
                           model_dtype=torch.bfloat16)
    raw = scorer.reward({"encoder_hidden_states": pe, "pooled_projections": pooled}, latents, u=0.4)  # (B, 1)

Differences from upstream, by design: the reward model holds its own copy of the backbone (the
pipeline's transformer is never modified, no adapter switching); everything else (sigma lookup,
noise drawn with ``torch.randn_like(latents)`` from the global RNG, raw output) is the same, so
with the same seed the scores match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dinalrm_align.reward_model.model import LatentRewardModel


class DRMInferencer:
    """Upstream-compatible scorer around :class:`LatentRewardModel`."""

    def __init__(
        self,
        pipeline: Any,
        config_path: str | Path | None,
        model_path: str | Path,
        load_from_disk: bool = False,
        device: str | torch.device = "cuda",
        model_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if load_from_disk and config_path is None:
            raise ValueError(
                "load_from_disk=True needs config_path (the config file) and model_path (the checkpoint folder)"
            )
        self.model = LatentRewardModel.from_pretrained(
            model_path,
            transformer=pipeline.transformer,
            torch_dtype=model_dtype,
            device=device,
            scheduler_config=pipeline.scheduler.config,
            config_path=config_path if load_from_disk else None,
        )
        self.model_dtype = model_dtype
        self.config = self.model.config
        self.add_noise = self.model.config.add_noise

    def reward(
        self, text_conds: dict[str, torch.Tensor], latents: torch.Tensor, u: float = 0.1
    ) -> torch.Tensor:
        """Raw reward (B, 1) of clean latents re-noised at sigma ~= u (differentiable, not no-grad)."""
        missing = [k for k in ("encoder_hidden_states", "pooled_projections") if k not in text_conds]
        if missing:
            raise ValueError(
                f"text_conds lacks {missing}; expected keys 'encoder_hidden_states' and 'pooled_projections'"
            )
        noise = torch.randn_like(latents)
        raw = self.model.score(
            latents,
            prompt_embeds=text_conds["encoder_hidden_states"],
            pooled_prompt_embeds=text_conds["pooled_projections"],
            u=u,
            noise=noise,
        )
        return raw.reshape(latents.shape[0], -1)
