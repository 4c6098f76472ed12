"""Sizes and hyper-parameters of the colour world (the demo and the alignment experiment share them)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BACKBONES", "ColourWorldConfig"]

#: Backbones the colour world runs on (their tiny built-in pipelines).
BACKBONES = ("sd3", "flux", "zimage")


@dataclass
class ColourWorldConfig:
    """Everything the colour world's stages read (defaults: the full demo).

    World: ``backbone`` (tiny pipeline family), ``colours`` x ``objects`` prompts, ``num_eval_prompts``
    held out, ``resolution`` pixels (16x16 latents at 32), ``num_steps`` Euler steps, the optics'
    ``tint_size`` / ``colour_contrast``. Pairs: ``seeds_per_prompt`` policy samples, ``tints_per_latent``
    perturbed copies each (tints ``N(0, tint_std^2)``), ``pairs_per_prompt`` random same-prompt pairs with golden gap >= ``min_gap``,
    annotator noise ``label_noise``. Reward model (``rm_*``) and ReFL (``refl_*``): the recipe values.
    """

    out_dir: str = "runs/colour_world"
    seed: int = 0
    backbone: str = "sd3"
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"])
    objects: list[str] | None = None
    num_eval_prompts: int = 24
    resolution: int = 32
    max_sequence_length: int = 8
    num_steps: int = 4
    # pairs
    tint_size: float = 1.0
    colour_contrast: float = 0.45
    seeds_per_prompt: int = 4
    eval_seeds_per_prompt: int = 2
    tints_per_latent: int = 5
    tint_std: float = 1.0
    pairs_per_prompt: int = 48
    eval_pairs_per_prompt: int = 24
    distractor_offset: float = 0.5
    distractor_pattern: float = 0.3
    min_gap: float = 0.1
    label_noise: float = 0.02
    # reward model
    rm_layers: int = 4
    rm_steps: int = 320
    rm_init_noise: float = 0.05
    rm_batch_size: int = 32
    rm_lr: float = 5e-3
    rm_ema_decay: float = 0.9
    eval_us: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    eval_ensemble: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.7])
    eval_max_pairs: int = 400
    rm_eval_batch_size: int = 128
    # alignment
    refl_steps: int = 80
    refl_batch_size: int = 16
    refl_lr: float = 1e-2
    refl_weight_decay: float = 0.0
    refl_lora_rank: int = 8
    refl_eval_every: int = 20
    refl_targets: list[str] | None = None
    refl_u: float = 0.4
    refl_last_steps: int = 1
    refl_ema_decay: float = 0.9
    refl_n_noise: int = 1
    num_threads: int | None = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown colour-world backbone {self.backbone!r}: expected one of {', '.join(BACKBONES)}")
        for name in ("rm_steps", "refl_steps", "num_eval_prompts", "seeds_per_prompt", "pairs_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls, out_dir: str, seed: int = 0, **changes: object) -> ColourWorldConfig:
        """A reduced size for tests and smoke runs (the accuracy target is not expected to hold)."""
        values: dict[str, object] = dict(
            out_dir=out_dir, seed=seed, colours=["red", "green", "blue", "white"], objects=["cube", "ball", "car", "tree"],
            num_eval_prompts=4, seeds_per_prompt=2, eval_seeds_per_prompt=1, tints_per_latent=3, rm_layers=2,
            rm_steps=30, rm_batch_size=16, eval_us=[0.4, 0.7], eval_max_pairs=64, refl_steps=4, refl_batch_size=4,
            refl_eval_every=2,
        )
        values.update(changes)
        return cls(**values)  # type: ignore[arg-type]
