"""Rewards of the alignment experiment, plugged into the one Trainer's ReFL / GRPO without changing them.

Every policy algorithm reads its reward through ``ctx.reward`` (``score(latents, cond, prompts, u=, noise=,
n_noise=, **options)``, ``normalize(raw, offset, scale)``, ``latent_shape(policy_shape)``). :func:`with_reward` makes a
subclass of an algorithm whose ``build`` replaces that object, so the experiment can use:

* :class:`EnsembleReward`: the latent reward averaged over noise levels (u in {0.2, 0.5, 0.7}; the recipe's
  ``reward.ensemble`` is the other form, DiNa-LRM*'s token-concatenation ensemble);
* :class:`SignFlippedReward`: minus a reward (a control that must make the golden reward fall);
* :class:`PixelReward`: VAE decode (differentiable) + :class:`PixelRewardModel`, a small image-text scorer.

:func:`train_pixel_reward_model` trains the pixel scorer on the same preference pairs as the latent one
(decoded once, Thurstone fidelity loss with a fixed variance: clean images have no noise level).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "EnsembleReward", "PixelReward", "PixelRewardModel", "SignFlippedReward", "load_pixel_model", "pixel_pair_accuracy",
    "pixel_proxy_factory", "pooled_text", "save_pixel_model",
    "train_pixel_reward_model", "with_reward",
]  # fmt: skip


def with_reward(algorithm_cls: type, make_reward: Callable[[Any], Any]) -> type:
    """A subclass of ``algorithm_cls`` whose policy context gets ``make_reward(ctx)`` as its reward after build."""

    class WithReward(algorithm_cls):  # type: ignore[misc, valid-type]
        def build(self, run: Any) -> Any:
            result = super().build(run)
            self.ctx.reward = make_reward(self.ctx)
            return result

    WithReward.__name__ = f"{algorithm_cls.__name__}WithReward"
    return WithReward


class _Wrapped:
    """Delegates ``normalize`` / ``latent_shape`` / ``model`` to the wrapped latent reward scorer."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.model = base.model

    def latent_shape(self, policy_latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.base.latent_shape(policy_latent_shape)

    def normalize(self, raw: torch.Tensor, offset: float | None = None, scale: float | None = None) -> torch.Tensor:
        return self.base.normalize(raw, offset, scale)


class EnsembleReward(_Wrapped):
    """Mean of the latent reward at several noise levels ``us`` (one shared noise draw per sample)."""

    def __init__(self, base: Any, us: Sequence[float] = (0.2, 0.5, 0.7)) -> None:
        super().__init__(base)
        self.us = tuple(float(u) for u in us)

    def score(self, latents: torch.Tensor, cond: Any, prompts: list[str], *, u: float,
              noise: torch.Tensor | None = None, n_noise: int = 1, **_: Any) -> torch.Tensor:
        scores = [self.base.score(latents, cond, prompts, u=level, noise=noise, n_noise=n_noise) for level in self.us]
        return torch.stack(scores).mean(dim=0)


class SignFlippedReward(_Wrapped):
    """``-reward``: optimising it must lower the golden reward if the learned reward tracks it."""

    def score(self, latents: torch.Tensor, cond: Any, prompts: list[str], *, u: float,
              noise: torch.Tensor | None = None, n_noise: int = 1, **options: Any) -> torch.Tensor:
        return -self.base.score(latents, cond, prompts, u=u, noise=noise, n_noise=n_noise, **options)


class PixelRewardModel(nn.Module):
    """Image-text scorer on decoded pixels: images ``(B, 3, H, W)`` in [0, 1] and a pooled text vector
    ``(B, P)`` -> raw score ``(B,)``. Three 3x3 convolutions (two with stride 2), global average pooling,
    a text projection and an MLP on ``[image * text, image, text]`` (the product lets the text pick the
    colour that counts)."""

    def __init__(self, text_dim: int, width: int = 28) -> None:
        super().__init__()
        self.text_dim, self.width = text_dim, width
        self.image = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
        )
        self.text = nn.Linear(text_dim, 2 * width)
        self.head = nn.Sequential(nn.Linear(6 * width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 1))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        f = self.image(images * 2.0 - 1.0).mean(dim=(2, 3))
        t = self.text(text)
        return self.head(torch.cat([f * t, f, t], dim=1)).squeeze(1).float()


def decode_differentiable(pipe: Any, adapter: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1] WITH gradients to the latents."""
    vae = pipe.vae
    shift, scale = adapter.latent_norm(vae)
    images = vae.decode(latents.to(vae.dtype) / scale + shift, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class PixelReward:
    """The pixel path for ReFL / GRPO: decode the policy latents with the policy's VAE, score the pixels
    with :class:`PixelRewardModel` and the prompts' pooled text vector. Normalised like the latent reward
    (``(raw + offset) / scale``, default +10 / 10); the re-noising noise it is handed is unused."""

    def __init__(self, model: PixelRewardModel, pipe: Any, adapter: Any, text: Callable[[list[str]], torch.Tensor]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.pipe, self.adapter, self.text = pipe, adapter, text

    def latent_shape(self, policy_latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(policy_latent_shape)

    def score(self, latents: torch.Tensor, cond: Any, prompts: list[str], *, u: float,
              noise: torch.Tensor | None = None, n_noise: int = 1, **_: Any) -> torch.Tensor:
        with torch.autocast(device_type=latents.device.type, enabled=False):
            images = decode_differentiable(self.pipe, self.adapter, latents.float())
            return self.model(images, self.text(prompts).to(images.device))

    def normalize(self, raw: torch.Tensor, offset: float | None = None, scale: float | None = None) -> torch.Tensor:
        return (raw + (10.0 if offset is None else offset)) / (10.0 if scale is None else scale)


def pooled_text(pipe: Any, max_sequence_length: int, cache: Any = None) -> Callable[[list[str]], torch.Tensor]:
    """``prompts -> (B, P)`` text vectors for the pixel scorer: the pipeline's pooled embedding (SD3, FLUX) or
    the mean of its token embeddings (Z-Image, which has no pooled vector); no grad, cached."""
    from dinalrm_align.reward_model.text import PromptEmbeddingCache, encode_conditioning

    cache = cache if cache is not None else PromptEmbeddingCache()

    def encode(prompts: list[str]) -> torch.Tensor:
        cond = encode_conditioning(pipe, list(prompts), max_sequence_length, dtype=torch.float32, cache=cache)
        if cond.pooled is not None:
            return cond.pooled
        mask = cond.token_mask().float()
        return (cond.embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    return encode


def _decoded_pairs(pipe: Any, adapter: Any, dataset: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from dinalrm_align.demo.world import decode

    batch = dataset.batch(list(range(len(dataset))))
    return decode(pipe, batch.chosen), decode(pipe, batch.rejected), list(batch.prompts)


def pixel_pair_accuracy(model: PixelRewardModel, chosen: torch.Tensor, rejected: torch.Tensor, text: torch.Tensor) -> float:
    """Fraction of pairs (images) the scorer orders like the label (ties count as wrong)."""
    with torch.no_grad():
        return float((model(chosen, text) > model(rejected, text)).float().mean())


def train_pixel_reward_model(
    pipe: Any, adapter: Any, train_pairs: str, eval_pairs: str, *, max_sequence_length: int, steps: int = 1500,
    batch_size: int = 64, lr: float = 2e-3, width: int = 28, seed: int = 0,
) -> tuple[PixelRewardModel, dict[str, float]]:
    """Train :class:`PixelRewardModel` on the pair shards (decoded once with the pipeline's VAE; fixed-variance
    Thurstone fidelity loss, AdamW, cosine schedule). Returns the model and ``{accuracy, train_time_s, params}``."""
    from dinalrm_align.rm_training.data import PairDataset
    from dinalrm_align.rm_training.losses import fixed_variance_thurstone_loss

    text_fn = pooled_text(pipe, max_sequence_length)
    t0 = time.perf_counter()
    tr_c, tr_r, tr_p = _decoded_pairs(pipe, adapter, PairDataset.from_source(train_pairs))
    ev_c, ev_r, ev_p = _decoded_pairs(pipe, adapter, PairDataset.from_source(eval_pairs))
    tr_t, ev_t = text_fn(tr_p), text_fn(ev_p)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PixelRewardModel(tr_t.shape[1], width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(tr_p), (batch_size,), generator=g)
        loss = fixed_variance_thurstone_loss(model(tr_c[idx], tr_t[idx]), model(tr_r[idx], tr_t[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    info = {"accuracy": pixel_pair_accuracy(model, ev_c, ev_r, ev_t), "train_time_s": time.perf_counter() - t0,
            "params": float(sum(p.numel() for p in model.parameters())), "num_eval_pairs": float(len(ev_p))}
    return model, info


def save_pixel_model(model: PixelRewardModel, path: str | Path) -> Path:
    """The scorer's weights as safetensors (sizes in the metadata), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"text_dim": str(model.text_dim), "width": str(model.width)})
    tmp.replace(path)
    return path


def load_pixel_model(path: str | Path) -> PixelRewardModel:
    """Inverse of :func:`save_pixel_model` (eval mode, frozen)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pixel reward model not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    model = PixelRewardModel(int(meta["text_dim"]), int(meta["width"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def pixel_proxy_factory(path: str, backbone: str = "sd3", seed: int = 0, max_sequence_length: int = 8) -> Any:
    """Evaluation proxy for the trainer (``eval.proxy_rewards``, ``factory: true``): the saved pixel reward model
    scoring decoded images ``(B, 3, H, W)`` in [0, 1] with the tiny pipeline's text vectors -> ``(B,)``."""
    from dinalrm_align.tiny import tiny_pipeline

    model = load_pixel_model(path)
    text = pooled_text(tiny_pipeline(backbone, seed), max_sequence_length)

    def proxy(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model(images.float().cpu(), text(list(prompts)))

    return proxy
