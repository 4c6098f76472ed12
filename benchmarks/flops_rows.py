"""Building blocks of the FLOP benchmark shared by every backbone (all on the meta device).

* :class:`LatentRewardCounter` / :func:`backbone_rows` -- the project's reward model of one backbone,
  forward + backward to the latents, at every resolution and text length;
* :class:`PixelRewards` -- VAE decode (a given VAE), CLIP-H and Qwen2-VL-7B, fwd and fwd+bwd;
* :class:`Scenario` / :func:`refl_breakdown` -- the ReFL cost per graded sample (no-grad rollout + graded
  policy step + reward) when ``G`` graded steps share one rollout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks import common as C

#: ReFL graded-step window of the paper's SD3.5 recipe: k uniform in [30, 39] of 40 steps.
K_LOW, K_HIGH = 30, 39


def fwd_bwd(forward: Callable[[], torch.Tensor]) -> C.FlopCount:
    """FLOPs of ``forward()`` and of a backward from its (summed) output."""
    return C.count_flops(forward, backward=True)


def sum_counts(*counts: C.FlopCount) -> dict[str, int]:
    """``{"forward", "backward", "total"}`` of several calls made one after the other."""
    fwd = sum(c.forward for c in counts)
    bwd = sum(c.backward for c in counts)
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


# --------------------------------------------------------------------------------------------
# The project's latent reward
# --------------------------------------------------------------------------------------------

#: ``(resolution, text length) -> inputs`` of one backbone on the meta device: ``latents`` and ``noise``
#: (B, 16, h, w) unpacked, ``prompt_embeds`` as the family's ``encode_prompt`` gives them, and
#: ``pooled_prompt_embeds`` (absent or None for families without one).
InputBuilder = Callable[[int, int], dict[str, Any]]


class LatentRewardCounter:
    """FLOPs of one backbone's project reward model (``LatentRewardModel``) on the meta device.

    ``build`` makes the model (once; ``from_config`` initialises the head on the CPU, under a forked RNG).
    A failure to build is recorded in :attr:`error` (the caller counts a reference instead). If
    ``rm.score`` refuses meta tensors (a value check reading data), it is counted once more with the finite
    checks skipped, and :attr:`needed_workaround` says so.
    """

    def __init__(self, build: Callable[[], nn.Module]) -> None:
        self.error: str | None = None
        self.needed_workaround = False
        try:
            with torch.random.fork_rng(devices=[]):
                self.rm: nn.Module | None = build()
        except Exception as exc:  # noqa: BLE001 - reported, the reference is counted instead
            self.rm = None
            self.error = f"from_config on meta failed: {type(exc).__name__}: {exc}"

    def _score(self, x: dict[str, Any], grad: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            z = x["latents"].detach().requires_grad_(grad)
            return self.rm.score(z, prompt_embeds=x["prompt_embeds"],  # type: ignore[union-attr]
                                 pooled_prompt_embeds=x.get("pooled_prompt_embeds"), u=0.4, noise=x["noise"])

        return call

    def _guarded(self, count: Callable[[], Any]) -> Any:
        if not self.needed_workaround:
            try:
                return count()
            except Exception as exc:  # noqa: BLE001
                self.needed_workaround = True
                self.error = f"rm.score on meta failed: {type(exc).__name__}: {exc}"
        with C.skip_finite_checks_on_meta():
            return count()

    def count(self, x: dict[str, Any]) -> tuple[C.FlopCount, int] | None:
        """``(fwd+bwd to the latents, forward FLOPs in the unused output layers)``; None without a model."""
        if self.rm is None:
            return None
        counted = self._guarded(lambda: fwd_bwd(self._score(x, True)))
        output_layers = self._guarded(lambda: C.unused_output_flops(self.rm, self._score(x, False)))
        return counted, output_layers

    def parameters(self) -> dict[str, int | None]:
        rm = self.rm
        if rm is None:
            return {"reward_model_total": None, "reward_model_head": None, "reward_model_lora": None}
        return {
            "reward_model_total": C.param_count(rm),
            "reward_model_head": C.param_count(rm.reward_head),
            "reward_model_lora": sum(p.numel() for n, p in rm.named_parameters() if "lora_" in n),
        }

    def meta_device(self) -> dict[str, Any]:
        return {"project_model_counted": self.rm is not None, "needed_workaround": self.needed_workaround,
                "error": self.error}


def backbone_rows(
    build_reward_model: Callable[[], nn.Module],
    build_inputs: InputBuilder,
    resolutions: Sequence[int],
    text_lengths: Sequence[int],
) -> dict[str, Any]:
    """The latent-reward rows of one backbone: its reward model (built once by ``build_reward_model``, on
    the meta device) counted at every resolution and text length.

    Returns ``{"backbone", "parameters", "meta_device", "rows": [{"resolution", "text_length",
    "image_tokens", "text_tokens", "latent_reward" (FlopCount dict or None), "output_layers_forward"}]}``.
    """
    counter = LatentRewardCounter(build_reward_model)
    rm = counter.rm
    rows = []
    for res in resolutions:
        for length in text_lengths:
            x = build_inputs(res, length)
            counted = counter.count(x)
            h, w = x["latents"].shape[-2:]
            patch = rm.adapter.latent_multiple(rm.backbone) if rm is not None else 2
            pe = x["prompt_embeds"]
            rows.append({
                "resolution": res,
                "text_length": length,
                "image_tokens": (h // patch) * (w // patch),
                "text_tokens": max(t.shape[0] for t in pe) if isinstance(pe, (list, tuple)) else int(pe.shape[1]),
                "latent_reward": None if counted is None else counted[0].to_dict(),
                "output_layers_forward": None if counted is None else counted[1],
            })
    return {
        "backbone": rm.adapter.name if rm is not None else None,
        "parameters": counter.parameters(),
        "meta_device": counter.meta_device(),
        "rows": rows,
    }


def row_count(row: dict[str, Any]) -> C.FlopCount | None:
    """A ``backbone_rows`` row's latent-reward count as a :class:`FlopCount` (None if not counted)."""
    if row["latent_reward"] is None:
        return None
    return C.FlopCount(**{k: row["latent_reward"][k] for k in ("forward", "backward", "by_op")})


# --------------------------------------------------------------------------------------------
# Pixel rewards
# --------------------------------------------------------------------------------------------


class PixelRewards:
    """VAE decode + CLIP-H / + Qwen2-VL-7B of a preset on the meta device; ``vae`` is the family's VAE."""

    def __init__(self, preset: C.Preset, vae: nn.Module, clip: nn.Module | None = None,
                 vlm: nn.Module | None = None) -> None:
        self.preset = preset
        self.vae = vae
        self.clip = clip if clip is not None else C.build_clip(preset)
        self.vlm = vlm if vlm is not None else C.build_vlm(preset)

    def vae_decode(self, resolution: int) -> C.FlopCount:
        h = resolution // self.preset.vae_factor
        z = torch.empty(1, int(self.vae.config.latent_channels), h, h, device="meta")
        return fwd_bwd(lambda: C.vae_decode(self.vae, z.requires_grad_(True)))

    def clip_score(self, resolution: int) -> C.FlopCount:
        images = torch.empty(1, 3, resolution, resolution, device="meta")
        ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
        return fwd_bwd(lambda: C.clip_score(self.clip, images.requires_grad_(True), ids))

    def vlm_score(self, resolution: int) -> C.FlopCount:
        images = torch.empty(1, 3, resolution, resolution, device="meta")
        return fwd_bwd(lambda: C.vlm_score(self.vlm, images.requires_grad_(True), self.preset.vlm_text_tokens))

    def vlm_score_capped(self, resolution: int, cap: int) -> C.FlopCount:
        """VLM on the image downscaled to ``cap`` px (the resize itself is not a counted op)."""
        side = min(resolution, cap)
        images = torch.empty(1, 3, side, side, device="meta")
        return fwd_bwd(lambda: C.vlm_score(self.vlm, images.requires_grad_(True), self.preset.vlm_text_tokens))

    def components(self, resolution: int, vlm_cap: int | None = None,
                   scorers: dict[str, C.FlopCount] | None = None) -> dict[str, Any]:
        """``vae_decode``, ``clip_h``, ``vlm`` (+ ``vlm_capped``) counts and the two pixel rewards' sums.

        ``scorers``: CLIP / VLM counts already made at this resolution (``clip_h``, ``vlm``), reused.
        """
        vae = self.vae_decode(resolution)
        clip = (scorers or {}).get("clip_h") or self.clip_score(resolution)
        vlm = (scorers or {}).get("vlm") or self.vlm_score(resolution)
        out: dict[str, Any] = {
            "vae_decode": vae.to_dict(),
            "clip_h": clip.to_dict(),
            "vlm": vlm.to_dict(),
            "vlm_image_tokens": C.vlm_image_tokens(resolution),
            "pixel_clip": sum_counts(vae, clip),
            "pixel_vlm": sum_counts(vae, vlm),
        }
        if vlm_cap:
            capped = self.vlm_score_capped(resolution, vlm_cap)
            out["vlm_capped"] = {**capped.to_dict(), "input_px": min(resolution, vlm_cap),
                                 "image_tokens": C.vlm_image_tokens(min(resolution, vlm_cap))}
            out["pixel_vlm_capped"] = sum_counts(vae, capped)
        return out


# --------------------------------------------------------------------------------------------
# ReFL per graded sample
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One way of paying for a graded sample: CFG in the rollout or not, ``G`` graded steps per rollout,
    graded step index ``k`` uniform in ``[k_low, k_high]`` (the rollout runs to the largest of the ``G``)."""

    name: str
    cfg: bool
    graded_per_rollout: int
    k_low: int = K_LOW
    k_high: int = K_HIGH

    @property
    def rollout_steps(self) -> float:
        return C.expected_rollout_steps(self.k_low, self.k_high, self.graded_per_rollout)

    @property
    def rollout_forwards(self) -> float:
        """Policy forward passes (batch-1 equivalents) of the no-grad rollout per graded sample."""
        return self.rollout_steps * (2 if self.cfg else 1) / self.graded_per_rollout


def refl_breakdown(entry: dict[str, Any], latent_reward_fwd_bwd: int,
                   scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
    """Per graded sample and scenario: rollout, graded step, reward, update (= graded + reward), total, and
    the ratios ours / pixel reward (``entry`` holds ``policy_forward``, ``policy_graded_fwd_bwd``,
    ``pixel_clip`` and ``pixel_vlm``)."""
    rewards = {
        "ours": latent_reward_fwd_bwd,
        "pixel_clip": entry["pixel_clip"]["total"],
        "pixel_vlm": entry["pixel_vlm"]["total"],
    }
    graded = entry["policy_graded_fwd_bwd"]["total"]
    out = []
    for sc in scenarios:
        rollout = sc.rollout_forwards * entry["policy_forward"]
        row: dict[str, Any] = {
            "scenario": sc.name,
            "cfg": sc.cfg,
            "graded_per_rollout": sc.graded_per_rollout,
            "rollout_steps": sc.rollout_steps,
            "rollout": rollout,
            "graded_step": graded,
        }
        for name, rew in rewards.items():
            row[f"reward_{name}"] = rew
            row[f"update_{name}"] = graded + rew
            row[f"total_{name}"] = rollout + graded + rew
        for base in ("pixel_clip", "pixel_vlm"):
            row[f"total_ratio_ours_over_{base}"] = row["total_ours"] / row[f"total_{base}"]
            row[f"update_ratio_ours_over_{base}"] = row["update_ours"] / row[f"update_{base}"]
        out.append(row)
    return out
