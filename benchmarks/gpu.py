"""GPU benchmark: time and peak memory of the latent reward vs VAE decode + CLIP-H, full-size SD3.5-M.

Random-initialised full-size models (weights do not change the cost) on one CUDA card in bf16:

* reward forward (no grad) and forward + backward to the latents: DiNa-LRM vs VAE decode +
  CLIP ViT-H/14, with and without gradient checkpointing;
* one ReFL update: one no-grad CFG rollout step (timed; the paper recipe's 34.5 steps are
  composed from it, or run for real with ``--full-rollout``) + the graded policy step (LoRA r 32,
  fp32 under bf16 autocast) + reward fwd+bwd + AdamW step, with and without gradient
  checkpointing (policy and reward);
* at 512 and 1024, batch 1, T5 length 128; medians of alternating repeats.

Memory: ``activation`` = peak allocated above what was resident before the call (activations,
gradients, temporaries); ``weights`` = bytes of the models that configuration needs (policy + its
LoRA/optimizer + reward side); ``peak`` = their sum, what a card must hold.

Usage::

    python -m benchmarks.gpu --update-doc docs/benchmarks.md     # on a CUDA machine (~5-10 min)
    python -m benchmarks.gpu --small                             # CPU smoke run at a tiny size (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/x.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks.measure import alternating_medians, peak_memory  # noqa: E402

DEFAULT_JSON = C.REPO_ROOT / "benchmarks" / "results" / "gpu.json"
PAPER_ROLLOUT_STEPS = C.expected_rollout_steps(30, 39)


class GpuBench:
    """Models and workloads on one device."""

    def __init__(self, preset: C.Preset, device: torch.device, dtype: torch.dtype, t5_length: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.preset, self.device, self.dtype, self.t5_length = preset, device, dtype, t5_length
        base = C.build_transformer(preset, device=device, dtype=dtype)
        self.rm = C.build_reward_model(preset, base, device=device, dtype=dtype)
        self.policy = base  # the reward model holds its own copy of the first blocks
        self.lora = C.add_policy_lora(self.policy, preset)
        for p in self.lora:
            p.data = p.data.float()  # trainable weights in fp32 under autocast
        self.optimizer = torch.optim.AdamW(self.lora, lr=1e-6)
        for p in self.lora:  # allocate the AdamW state now, so no measured call pays for it
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.vae = C.build_vae(preset, device=device, dtype=dtype)
        self.clip = C.build_clip(preset, device=device, dtype=dtype)
        self.input_ids = torch.zeros(1, 77, dtype=torch.long, device=device)
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self.uncond: dict[int, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def x(self, res: int) -> dict[str, torch.Tensor]:
        if res not in self.inputs:
            g = torch.Generator().manual_seed(res)
            self.inputs[res] = C.sd3_inputs(self.preset, res, self.t5_length, device=self.device, dtype=self.dtype, generator=g)
            self.uncond[res] = C.sd3_inputs(self.preset, res, self.t5_length, device=self.device, dtype=self.dtype, generator=g)
        return self.inputs[res]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def checkpointing(self, on: bool) -> Iterator[None]:
        """Gradient checkpointing of policy, reward backbone, VAE decoder and CLIP towers."""
        # the reward model's backbone is its own truncated copy of the diffusers transformer
        for m in (self.policy, self.vae, self.rm.backbone):
            if on:
                m.enable_gradient_checkpointing()
            else:
                m.disable_gradient_checkpointing()
        self._clip_checkpointing(on)
        try:
            yield
        finally:
            if on:
                self._clip_checkpointing(False)
                for m in (self.policy, self.vae, self.rm.backbone):
                    m.disable_gradient_checkpointing()

    def _clip_checkpointing(self, on: bool) -> None:
        """transformers checkpoints only in train mode; CLIP has no dropout, so train() is harmless."""
        enable = getattr(self.clip, "activation_checkpointing_enable", None) or self.clip.gradient_checkpointing_enable
        disable = getattr(self.clip, "activation_checkpointing_disable", None) or self.clip.gradient_checkpointing_disable
        if on:
            enable()
            self.clip.train()
        else:
            disable()
            self.clip.eval()

    def weights_bytes(self, which: str, training: bool) -> int:
        """Resident parameter (+ AdamW state) bytes a configuration needs."""
        reward = [self.rm] if which == "latent" else [self.vae, self.clip]
        total = C.unique_param_bytes(*reward)
        if training:
            total += C.unique_param_bytes(self.policy)
            total += sum(p.numel() * 4 * 2 for p in self.lora)  # AdamW exp_avg + exp_avg_sq (fp32)
        return total

    # ------------------------------------------------------------------ rewards
    def reward(self, which: str, latents: torch.Tensor, res: int) -> torch.Tensor:
        x = self.x(res)
        if which == "latent":
            return self.rm.score(latents, prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
                                 u=0.4, noise=x["noise"])
        return C.clip_score(self.clip, C.vae_decode(self.vae, latents.to(self.dtype)), self.input_ids)

    def reward_call(self, which: str, res: int, backward: bool) -> Callable[[], None]:
        def run() -> None:
            latents = self.x(res)["latents"].detach().to(torch.float32, copy=True).requires_grad_(backward)
            with torch.set_grad_enabled(backward), self.autocast():
                out = self.reward(which, latents, res)
            if backward:
                out.float().sum().backward()

        return run

    # ------------------------------------------------------------------ ReFL
    def rollout_step(self, res: int) -> Callable[[], None]:
        def run() -> None:
            x, u = self.x(res), self.uncond[res]
            with torch.no_grad(), self.autocast():
                z = torch.cat([x["latents"], x["latents"]])
                pe = torch.cat([x["prompt_embeds"], u["prompt_embeds"]])
                pooled = torch.cat([x["pooled_prompt_embeds"], u["pooled_prompt_embeds"]])
                v_c, v_u = C.transformer_velocity(self.policy, z, pe, pooled, 0.3).chunk(2)
                _ = x["latents"] + (-0.02) * (v_u + 4.5 * (v_c - v_u))

        return run

    def graded_update(self, which: str, res: int) -> Callable[[], None]:
        def run() -> None:
            x = self.x(res)
            sigma = 0.2
            with self.autocast():
                v = C.transformer_velocity(self.policy, x["latents"], x["prompt_embeds"], x["pooled_prompt_embeds"], sigma)
                x0_hat = x["latents"].float() - sigma * v.float()
                loss = -self.reward(which, x0_hat, res).float().mean() / 10.0
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return run

    def full_rollout(self, res: int, steps: int) -> Callable[[], None]:
        step = self.rollout_step(res)

        def run() -> None:
            for _ in range(steps):
                step()

        return run


def _gb(x: float) -> float:
    return x / 1e9


def run(
    small: bool = False,
    device: str | None = None,
    resolutions: Sequence[int] | None = None,
    t5_length: int | None = None,
    repeats: int = 5,
    warmup: int = 0,
    full_rollout: bool = False,
) -> dict[str, Any]:
    """Measure everything on ``device`` (CUDA by default; ``small``: tiny models on CPU)."""
    previous_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            return _run(small, device, resolutions, t5_length, repeats, warmup, full_rollout)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    small: bool,
    device: str | None,
    resolutions: Sequence[int] | None,
    t5_length: int | None,
    repeats: int,
    warmup: int,
    full_rollout: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if small:
        preset = C.get_preset("tiny")
        dev = torch.device(device or "cpu")
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        resolutions = list(resolutions or [64])
        t5_length = t5_length or 16
        card = f"{dev.type} smoke run (--small: tiny models, not a performance number)"
        if dev.type == "cpu":
            torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available() and (device is None or device.startswith("cuda")):
            raise SystemExit("no CUDA device: run on a GPU machine, or use --small for the CPU smoke run")
        preset = C.get_preset("full")
        dev = torch.device(device or "cuda")
        dtype = torch.bfloat16
        resolutions = list(resolutions or [512, 1024])
        t5_length = t5_length or 128
        card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    bench = GpuBench(preset, dev, dtype, t5_length)
    result: dict[str, Any] = {
        "card": card,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "preset": preset.name,
        "t5_length": t5_length,
        "repeats": repeats,
        "resolutions": {},
    }
    for res in resolutions:
        entry: dict[str, Any] = {}
        for ckpt in (False, True):
            with bench.checkpointing(ckpt):
                work = {
                    "latent_fwd": bench.reward_call("latent", res, backward=False),
                    "pixel_clip_fwd": bench.reward_call("pixel", res, backward=False),
                    "latent_fwd_bwd": bench.reward_call("latent", res, backward=True),
                    "pixel_clip_fwd_bwd": bench.reward_call("pixel", res, backward=True),
                    "rollout_step_cfg": bench.rollout_step(res),
                    "refl_graded_latent": bench.graded_update("latent", res),
                    "refl_graded_pixel_clip": bench.graded_update("pixel", res),
                }
                if ckpt:  # forward-only and rollout timings do not depend on checkpointing
                    for k in ("latent_fwd", "pixel_clip_fwd", "rollout_step_cfg"):
                        work.pop(k)
                rows: dict[str, Any] = {}
                activation: dict[str, int] = {}
                for name in list(work):
                    # Probe on CUDA first (drops what does not fit; absorbs lazy library init), then the
                    # memory pass, which also warms the timed runs up.
                    try:
                        if dev.type == "cuda":
                            work[name]()
                        activation[name] = peak_memory(work[name], device=dev)
                    except torch.cuda.OutOfMemoryError:
                        work.pop(name)
                        bench.optimizer.zero_grad(set_to_none=True)
                        rows[name] = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                times = alternating_medians(work, repeats=repeats, warmup=warmup, device=dev)
                for name in work:
                    which = "latent" if "latent" in name else "pixel"
                    if name.startswith("rollout"):
                        weights = C.unique_param_bytes(bench.policy)
                    else:
                        weights = bench.weights_bytes(which, training=name.startswith("refl"))
                    rows[name] = {**times[name].to_dict(), "activation_bytes": activation[name],
                                  "weights_bytes": weights, "peak_bytes": activation[name] + weights}
                entry["checkpointing" if ckpt else "plain"] = rows
        step = entry["plain"].get("rollout_step_cfg", {}).get("median_s")
        for mode in ("plain", "checkpointing"):
            for which in ("latent", "pixel_clip"):
                graded = entry[mode].get(f"refl_graded_{which}", {}).get("median_s")
                if step is not None and graded is not None:
                    entry[mode][f"paper_update_{which}_s"] = PAPER_ROLLOUT_STEPS * step + graded
        if full_rollout:
            steps = round(PAPER_ROLLOUT_STEPS)
            t = alternating_medians({"rollout": bench.full_rollout(res, steps)}, repeats=1, warmup=0, device=dev)
            entry["full_rollout"] = {"steps": steps, **t["rollout"].to_dict()}
        result["resolutions"][str(res)] = entry
    result["wall_s"] = time.perf_counter() - t0
    return result


def markdown(r: dict[str, Any]) -> str:
    """Markdown section naming the card."""
    lines = [
        f"Card: **{r['card']}** ({r['device']}, {r['dtype']}, torch {r['torch']}, CUDA {r['cuda']}); preset "
        f"`{r['preset']}`, batch 1, T5 {r['t5_length']}, median of {r['repeats']} alternating runs. Peak = weights "
        "the configuration needs + activation peak of the call.",
        "",
    ]
    rows = []
    for res, e in r["resolutions"].items():
        for mode in ("plain", "checkpointing"):
            for name, v in e[mode].items():
                if not isinstance(v, dict):
                    continue
                if "error" in v:
                    rows.append([res, "yes" if mode == "checkpointing" else "no", name, v["error"], "", ""])
                    continue
                rows.append([res, "yes" if mode == "checkpointing" else "no", name, f"{v['median_s'] * 1e3:.1f}",
                             f"{_gb(v['activation_bytes']):.3g}", f"{_gb(v['peak_bytes']):.3g}"])
    lines.append(C.md_table(["resolution", "grad ckpt", "workload", "time ms", "activation GB", "peak GB"], rows))
    for res, e in r["resolutions"].items():
        for mode in ("plain", "checkpointing"):
            m = e[mode]
            if "paper_update_latent_s" not in m or "paper_update_pixel_clip_s" not in m:
                continue
            lat, pix = m["paper_update_latent_s"], m["paper_update_pixel_clip_s"]
            lines += ["", f"{res}, checkpointing {'on' if mode == 'checkpointing' else 'off'}: paper ReFL update "
                      f"({PAPER_ROLLOUT_STEPS:g} CFG steps + graded step) {lat:.2f} s (latent) vs {pix:.2f} s "
                      f"(VAE + CLIP-H), ratio {lat / pix:.3f}."]
        if "full_rollout" in e:
            lines[-1] += f" Measured {e['full_rollout']['steps']}-step rollout: {e['full_rollout']['median_s']:.2f} s."
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny models on CPU (smoke run, used by the tests)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--t5-length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=0, help="extra warm-up rounds (the memory pass already warms up)")
    parser.add_argument("--full-rollout", action="store_true", help="also time a real 35-step CFG rollout")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--update-doc", type=Path, default=None, help="replace the gpu section of this doc")
    args = parser.parse_args(argv)
    result = run(args.small, args.device, args.resolutions, args.t5_length, args.repeats, args.warmup, args.full_rollout)
    text = markdown(result)
    print(text)
    C.write_json(args.json, result)
    print(f"\nJSON: {args.json}  ({result['wall_s']:.0f} s)")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.update_doc:
        C.replace_doc_section(args.update_doc, "gpu", text)
    return result


if __name__ == "__main__":
    main()
