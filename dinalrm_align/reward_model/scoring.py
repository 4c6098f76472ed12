"""The scoring API of :class:`~dinalrm_align.reward_model.model.LatentRewardModel` (noise, levels, ensemble).

``u`` is the *target* noise level sigma; the sigma used is the nearest entry of the scheduler's
construction-time table (SD3.5 / Z-Image: the shift-3 table, sigma ~= u to 1e-3; FLUX: the linear
table, sigma = u). ``x_sigma = (1 - sigma) x0 + sigma * noise`` with fresh noise unless ``noise`` or
``generator`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.reward_model import noise as noise_lib
from dinalrm_align.reward_model import validation

__all__ = ["ScoringMixin"]


class ScoringMixin:
    """Mixed into ``LatentRewardModel`` (uses its ``conditioning``, ``_check``, ``_features``, ``_reward``)."""

    # ------------------------------------------------------------------ noise
    def sigma_for(self, u: torch.Tensor | float | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest table ``(sigma, timestep)`` for target noise level(s) ``u`` -> each (B,) float32."""
        if not isinstance(u, torch.Tensor):
            u = torch.tensor(validation.check_noise_levels(u), dtype=torch.float32)
        return noise_lib.nearest_sigma(u, self._sigmas, self._timesteps)

    @staticmethod
    def _draw_noise(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    # ------------------------------------------------------------------ single level
    def forward_noisy(
        self,
        noisy_latents: torch.Tensor,
        sigma: torch.Tensor,
        *,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any = None,
    ) -> torch.Tensor:
        """Raw reward of already-noised latents at noise level(s) ``sigma`` (B,) (reward-model training,
        where chosen and rejected share one noise draw). Returns (B,) float32 (or (B, out_dim))."""
        cond = self.conditioning(prompt_embeds, pooled_prompt_embeds)
        self._check(noisy_latents, cond)
        sigma = sigma.reshape(-1).to(torch.float32).to(noisy_latents.device)
        return self._reward(self._features(noisy_latents, sigma.expand(noisy_latents.shape[0]), cond))

    def score(
        self,
        latents: torch.Tensor,
        *,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any = None,
        u: float = 0.4,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        n_noise: int = 1,
    ) -> torch.Tensor:
        """Raw reward of clean normalised latents, re-noised at sigma ~= ``u``.

        Args:
            latents: (B, C, h, w) clean unpacked latents, as the pipeline returns them with
                ``output_type="latent"`` (FLUX: unpack first, see :func:`~dinalrm_align.backbones.unpack_latents`).
            prompt_embeds, pooled_prompt_embeds: what :func:`~dinalrm_align.reward_model.text.encode_prompts`
                returns for this family (SD3: (B, 77 + L, 4096) and (B, 2048); FLUX: (B, L, 4096) and
                (B, 768); Z-Image: a list of (L_i, 2560) and None).
            u: target noise level in [0, 1]; 0.4 for generated latents, 0.1 for encoded real images.
            noise: optional fixed noise, (B, C, h, w) for ``n_noise=1`` or (n_noise, B, C, h, w).
            generator: seeds the noise when ``noise`` is not given.
            n_noise: average over this many independent noise draws (one batched pass).

        Returns:
            (B,) float32 raw reward (differentiable w.r.t. ``latents`` and trainable parameters).
        """
        cond = self.conditioning(prompt_embeds, pooled_prompt_embeds)
        return self.score_conditioning(latents, cond, u=u, noise=noise, generator=generator, n_noise=n_noise)

    def score_conditioning(
        self,
        latents: torch.Tensor,
        cond: TextConditioning,
        *,
        u: float = 0.4,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        n_noise: int = 1,
        check: bool = True,
    ) -> torch.Tensor:
        """:meth:`score` with a ready :class:`TextConditioning`; ``check=False`` skips the input checks
        (and their host synchronisation) in training hot paths whose inputs are known to be valid."""
        if check:
            self._check(latents, cond)
        (u_value,) = validation.check_noise_levels(u)
        if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 1:
            raise ValueError(f"n_noise must be a positive integer, got {n_noise!r}")
        b = latents.shape[0]
        draws_shape = (n_noise, *latents.shape)
        if noise is None:
            eps = self._draw_noise(draws_shape, latents, generator)
        else:
            expected = tuple(latents.shape) if n_noise == 1 and noise.dim() == latents.dim() else draws_shape
            eps = (validation.check_noise(noise, expected) if check else noise).reshape(draws_shape).to(latents.device)
        sigma, _ = self.sigma_for(torch.full((n_noise * b,), u_value))
        sigma = sigma.to(latents.device)
        x0 = latents.unsqueeze(0).expand(draws_shape).reshape(n_noise * b, *latents.shape[1:])
        noisy = noise_lib.add_noise(x0, eps.reshape_as(x0), sigma) if self.config.add_noise else x0
        raw = self._reward(self._features(noisy, sigma, cond.repeat(n_noise)))
        raw = raw.reshape(n_noise, b, *raw.shape[1:]).mean(dim=0)
        return validation.check_scores(raw, self.dtype) if check else raw

    # ------------------------------------------------------------------ ensemble
    def score_ensemble(
        self,
        latents: torch.Tensor,
        *,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any = None,
        us: Sequence[float] = (0.2, 0.5, 0.7),
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Multi-noise ensemble (DiNa-LRM*): one shared noise, K noise levels, token concatenation.

        The K backbone passes run as ONE batched pass (K*B rows); each level's features are FiLM-modulated
        with that level's embedding, then all tokens are concatenated and the queries read them once.
        Cost ~K x a single-level backbone pass. Returns (B,) raw.
        """
        cond = self.conditioning(prompt_embeds, pooled_prompt_embeds)
        self._check(latents, cond)
        levels = validation.check_noise_levels(list(us), name="us")
        k, b = len(levels), latents.shape[0]
        eps = (
            self._draw_noise(latents.shape, latents, generator)
            if noise is None
            else validation.check_noise(noise, latents.shape).to(latents.device)
        )
        sigma, _ = self.sigma_for(torch.tensor(levels, dtype=torch.float32).repeat_interleave(b))
        sigma = sigma.to(latents.device)
        x0 = latents.repeat(k, *([1] * (latents.dim() - 1)))
        noisy = noise_lib.add_noise(x0, eps.repeat(k, *([1] * (latents.dim() - 1))), sigma) if self.config.add_noise else x0
        feats = self._features(noisy, sigma, cond.repeat(k))
        out = self.reward_head.forward_ensemble(feats.image, feats.text, feats.temb, num_levels=k, text_mask=feats.text_mask)
        return validation.check_scores(self._head_output(out), self.dtype)

    # ------------------------------------------------------------------ scales
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Display scale ``(raw + offset) / scale`` (default ``(raw + 10) / 10``, ~[0, 2] centred near 1)."""
        norm = self.config.normalization
        return (raw + norm.offset) / norm.scale

    def preference_probability(self, raw_a: torch.Tensor, raw_b: torch.Tensor) -> torch.Tensor:
        """P(a preferred over b) = sigmoid((a - b) / T) with the calibrated temperature (T=1 if none)."""
        temperature = self.config.normalization.temperature or 1.0
        return torch.sigmoid((raw_a - raw_b) / temperature)

    def score_images(self, images: Any, prompts: Sequence[str] | str, pipe: Any, u: float = 0.1, **kwargs: Any) -> torch.Tensor:
        """Score PIL images, [0, 1] tensors (B, 3, H, W) or file paths; see :func:`images.score_images`."""
        from dinalrm_align.reward_model.images import score_images

        return score_images(self, images, prompts, pipe, u=u, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"backbone={c.backbone}, layers={c.num_transformer_layers}, visual_taps={c.visual_head_idx}, "
            f"text_taps={c.text_head_idx}, "
            f"lora={f'r{c.lora_config.r}/a{c.lora_config.lora_alpha}' if self.lora_config else 'none'}, "
            f"shared_base={self.share_base_weights}"
        )
