"""CPU benchmark at a reduced, matched scale: ratios of the latent reward vs a pixel-space reward.

Everything runs in one process, workloads alternate round-robin, medians of the repeats are
reported, and only ratios are meant to be read (absolute CPU times say nothing about a GPU).

Scale (preset ``small``, see ``benchmarks/configs.py``): SD3.5-Medium, its VAE and CLIP ViT-H/14
with every width divided by 8 and every depth kept (24 policy blocks, 12 reward blocks + head,
a 4-level VAE decoder, a 32-layer ViT at 224 px). The matmul FLOPs of each workload at this scale
are counted too (meta device), so that time ratios can be compared with FLOP ratios.

Measured:

1. reward forward and forward + backward to the latents: DiNa-LRM (project implementation) vs
   VAE decode + CLIP scorer; latency and peak tensor memory;
2. one tiny ReFL update with each reward: one no-grad CFG rollout step (shared), the graded
   policy step (LoRA) + reward + backward + AdamW step; the paper recipe's update is composed
   from these (34.5 CFG rollout steps on average);
3. the multi-noise ensemble: one batched backbone pass (``score_ensemble``) vs K separate passes;
4. ``share_base_weights``: parameter memory of policy + reward model with and without sharing,
   measured at this scale and exact at full scale (meta device, bf16).

Usage::

    python -m benchmarks.cpu                       # ~1-2 min on 2 cores (1 thread)
    python -m benchmarks.cpu --preset tiny --repeats 1 --resolution 64   # seconds (tests)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script (python benchmarks/x.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks.measure import alternating_medians, peak_memory  # noqa: E402
from benchmarks.reference import ReferenceLatentReward  # noqa: E402

DEFAULT_JSON = C.REPO_ROOT / "benchmarks" / "results" / "cpu.json"
ENSEMBLE_US = (0.2, 0.5, 0.7)
PAPER_ROLLOUT_STEPS = C.expected_rollout_steps(30, 39)  # 34.5 CFG steps


def shifted_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3 inference sigmas (shift 3), ``num_steps + 1`` values from 1 down to 0."""
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


class Workbench:
    """All models and inputs of one preset/resolution, with the workloads as closures."""

    def __init__(self, preset: C.Preset, resolution: int, t5_length: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.preset = preset
        self.resolution = resolution
        self.t5_length = t5_length
        gen = torch.Generator().manual_seed(seed)
        self.inputs = C.sd3_inputs(preset, resolution, t5_length, device="cpu", generator=gen)
        self.uncond = C.sd3_inputs(preset, resolution, t5_length, device="cpu", generator=gen)
        self.rm_transformer = C.build_transformer(preset, device="cpu")
        self.rm_impl = "project"
        try:
            self.rm = C.build_reward_model(preset, self.rm_transformer, device="cpu")
        except ImportError as exc:  # the reward model package is not available
            self.rm_impl = f"reference (project model unavailable: {exc})"
            self.rm = ReferenceLatentReward(self.rm_transformer, preset.rm_model)
        #: The architecture minimum (independent re-implementation, reward LoRA merged) on the same weights.
        self.minimum = ReferenceLatentReward(self.rm_transformer, preset.rm_model, lora="merged")
        self.vae = C.build_vae(preset, device="cpu")
        self.clip = C.build_clip(preset, device="cpu")
        vocab = self.clip.config.text_config.vocab_size
        self.input_ids = torch.randint(0, vocab, (1, 77), generator=gen)
        self.policy = C.build_transformer(preset, device="cpu")
        self.lora_params = C.add_policy_lora(self.policy, preset)
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=1e-6)
        self.sigmas = shifted_sigmas(40)

    # ------------------------------------------------------------------ rewards
    def latent_reward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.inputs
        if isinstance(self.rm, ReferenceLatentReward):
            return self.rm.score(latents, x["noise"], x["prompt_embeds"], x["pooled_prompt_embeds"], 0.4)
        return self.rm.score(
            latents, prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
            u=0.4, noise=x["noise"],
        )

    def minimum_reward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.inputs
        return self.minimum.score(latents, x["noise"], x["prompt_embeds"], x["pooled_prompt_embeds"], 0.4)

    def pixel_reward(self, latents: torch.Tensor) -> torch.Tensor:
        return C.clip_score(self.clip, C.vae_decode(self.vae, latents), self.input_ids)

    def reward_call(self, which: str, backward: bool) -> Callable[[], None]:
        reward = {"latent": self.latent_reward, "minimum": self.minimum_reward, "pixel": self.pixel_reward}[which]

        def run() -> None:
            latents = self.inputs["latents"].clone().requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                out = reward(latents)
                if backward:
                    out.sum().backward()

        return run

    # ------------------------------------------------------------------ ReFL
    def rollout_step(self) -> None:
        """One no-grad sampler step with CFG (conditional + unconditional batch of 2)."""
        x, u = self.inputs, self.uncond
        with torch.no_grad():
            z = torch.cat([x["latents"], x["latents"]])
            pe = torch.cat([x["prompt_embeds"], u["prompt_embeds"]])
            pooled = torch.cat([x["pooled_prompt_embeds"], u["pooled_prompt_embeds"]])
            v_cond, v_uncond = C.transformer_velocity(self.policy, z, pe, pooled, float(self.sigmas[30])).chunk(2)
            v = v_uncond + 4.5 * (v_cond - v_uncond)
            _ = x["latents"] + (self.sigmas[31] - self.sigmas[30]) * v

    def graded_update(self, which: str) -> Callable[[], None]:
        """Graded policy step with grad -> x0_hat -> reward -> backward -> AdamW step."""
        reward = self.latent_reward if which == "latent" else self.pixel_reward
        sigma = float(self.sigmas[34])

        def run() -> None:
            x = self.inputs
            z_k = x["latents"]
            v = C.transformer_velocity(self.policy, z_k, x["prompt_embeds"], x["pooled_prompt_embeds"], sigma)
            x0_hat = z_k - sigma * v
            loss = -reward(x0_hat).mean() / 10.0
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return run

    # ------------------------------------------------------------------ ensemble
    def ensemble_batched(self) -> torch.Tensor:
        x = self.inputs
        with torch.no_grad():
            return self.rm.score_ensemble(
                x["latents"], prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
                us=ENSEMBLE_US, noise=x["noise"],
            )

    def ensemble_separate(self) -> torch.Tensor:
        """K backbone passes in a Python loop (``rm.features`` at each level's table sigma, shared noise),
        then the same single read-out of all K levels."""
        x = self.inputs
        rm = self.rm
        levels = []
        with torch.no_grad():
            for u in ENSEMBLE_US:
                sigma, _ = rm.sigma_for(u)
                levels.append(rm.features(x["latents"], x["prompt_embeds"], x["pooled_prompt_embeds"],
                                          sigma=sigma, noise=x["noise"]))
            temb = torch.cat([f.temb for f in levels])
            vis = [torch.cat([f.image[i] for f in levels]) for i in range(len(levels[0].image))]
            txt = [torch.cat([f.text[i] for f in levels]) for i in range(len(levels[0].text))]
            mask = None
            if any(f.text_mask is not None for f in levels):
                mask = torch.cat([f.text_mask if f.text_mask is not None
                                  else torch.ones(f.text[0].shape[:2], dtype=torch.bool) for f in levels])
            raw = rm.reward_head.forward_ensemble(vis, txt, temb, num_levels=len(ENSEMBLE_US), text_mask=mask)
        return raw.float()[:, 0]


def _flop_counts(preset: C.Preset, resolution: int, t5_length: int) -> dict[str, Any]:
    """Meta-device FLOPs of the measured workloads at the same reduced scale."""
    tr = C.build_transformer(preset)
    x = C.sd3_inputs(preset, resolution, t5_length)
    try:
        rm: nn.Module = C.build_reward_model(preset, tr, device="meta")
    except ImportError:
        rm = ReferenceLatentReward(tr, preset.rm_model)
    vae, clip = C.build_vae(preset), C.build_clip(preset)
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")

    def lat() -> torch.Tensor:
        z = x["latents"].detach().requires_grad_(torch.is_grad_enabled())
        if isinstance(rm, ReferenceLatentReward):
            return rm.score(z, x["noise"], x["prompt_embeds"], x["pooled_prompt_embeds"])
        with C.skip_finite_checks_on_meta():
            return rm.score(z, prompt_embeds=x["prompt_embeds"], pooled_prompt_embeds=x["pooled_prompt_embeds"],
                            noise=x["noise"])

    def pix() -> torch.Tensor:
        z = x["latents"].detach().requires_grad_(torch.is_grad_enabled())
        return C.clip_score(clip, C.vae_decode(vae, z), ids)

    return {"latent": C.count_flops(lat, backward=True), "pixel_clip": C.count_flops(pix, backward=True)}


def share_memory_full_scale() -> dict[str, Any]:
    """Exact parameter bytes (bf16) of policy + reward model at full scale, with/without sharing."""
    preset = C.get_preset("full")
    out: dict[str, Any] = {}
    for share in (False, True):
        tr = C.build_transformer(preset)
        rm = C.build_reward_model(preset, tr, device="meta", share_base_weights=share)
        out["shared" if share else "separate"] = C.unique_param_bytes(tr, rm, bytes_per_param=2)
    out["saving_bytes"] = out["separate"] - out["shared"]
    return out


def share_memory_measured(preset: C.Preset) -> dict[str, Any]:
    """Parameter bytes (fp32, real tensors) of policy + reward model at the benchmark scale."""
    out: dict[str, Any] = {}
    for share in (False, True):
        tr = C.build_transformer(preset, device="cpu")
        rm = C.build_reward_model(preset, tr, device="cpu", share_base_weights=share)
        out["shared" if share else "separate"] = C.unique_param_bytes(tr, rm)
    out["saving_bytes"] = out["separate"] - out["shared"]
    return out


def run(
    preset_name: str = "small",
    resolution: int = 256,
    t5_length: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    full_scale_share: bool = True,
) -> dict[str, Any]:
    """Run every CPU measurement; returns a JSON-serialisable dict (restores the thread count)."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            return _run(preset_name, resolution, t5_length, repeats, warmup, full_scale_share)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    preset_name: str, resolution: int, t5_length: int, repeats: int, warmup: int, full_scale_share: bool
) -> dict[str, Any]:
    preset = C.get_preset(preset_name)
    t0 = time.perf_counter()
    bench = Workbench(preset, resolution, t5_length)
    result: dict[str, Any] = {
        "preset": preset_name,
        "resolution": resolution,
        "t5_length": t5_length,
        "latent_tokens": (resolution // 16) ** 2,
        "text_tokens": C.text_tokens(t5_length),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}), torch {torch.__version__}",
        "reward_model_implementation": bench.rm_impl,
    }

    # 1. reward forward / forward+backward -------------------------------------------------
    workloads = {
        "latent_fwd": bench.reward_call("latent", backward=False),
        "pixel_clip_fwd": bench.reward_call("pixel", backward=False),
        "latent_fwd_bwd": bench.reward_call("latent", backward=True),
        "pixel_clip_fwd_bwd": bench.reward_call("pixel", backward=True),
        "minimum_merged_fwd_bwd": bench.reward_call("minimum", backward=True),
    }
    times = alternating_medians(workloads, repeats=repeats, warmup=warmup)
    memory = {name: peak_memory(fn) for name, fn in workloads.items()}
    flops = _flop_counts(preset, resolution, t5_length)
    result["reward"] = {
        name: {**times[name].to_dict(), "peak_tensor_bytes": memory[name]} for name in workloads
    }
    result["reward_flops"] = {k: v.to_dict() for k, v in flops.items()}

    # 2. ReFL update ------------------------------------------------------------------------
    refl = {
        "rollout_step_cfg": bench.rollout_step,
        "graded_latent": bench.graded_update("latent"),
        "graded_pixel_clip": bench.graded_update("pixel"),
    }
    refl_times = alternating_medians(refl, repeats=repeats, warmup=warmup)
    refl_memory = {name: peak_memory(refl[name]) for name in ("graded_latent", "graded_pixel_clip")}
    step = refl_times["rollout_step_cfg"].median
    result["refl"] = {
        name: {**refl_times[name].to_dict(), **({"peak_tensor_bytes": refl_memory[name]} if name in refl_memory else {})}
        for name in refl
    }
    result["refl"]["paper_update_latent_s"] = PAPER_ROLLOUT_STEPS * step + refl_times["graded_latent"].median
    result["refl"]["paper_update_pixel_clip_s"] = PAPER_ROLLOUT_STEPS * step + refl_times["graded_pixel_clip"].median

    # 3. ensemble ---------------------------------------------------------------------------
    if hasattr(bench.rm, "score_ensemble"):
        ens = {"ensemble_batched": bench.ensemble_batched, "ensemble_separate": bench.ensemble_separate}
        ens_times = alternating_medians(ens, repeats=repeats, warmup=warmup)
        diff = float((bench.ensemble_batched() - bench.ensemble_separate()).abs().max())
        result["ensemble"] = {
            **{k: v.to_dict() for k, v in ens_times.items()},
            "levels": list(ENSEMBLE_US),
            "max_abs_difference": diff,
            "peak_tensor_bytes": {k: peak_memory(fn) for k, fn in ens.items()},
        }

    # 4. share_base_weights -----------------------------------------------------------------
    if bench.rm_impl == "project":
        result["share_base_weights"] = {"measured_fp32": share_memory_measured(preset)}
        if full_scale_share:
            result["share_base_weights"]["full_scale_bf16"] = share_memory_full_scale()
    result["ratios"] = ratios(result)
    result["wall_s"] = time.perf_counter() - t0
    return result


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Latent / pixel ratios of the headline quantities (lower = the latent reward is cheaper)."""
    rw, fl = r["reward"], r["reward_flops"]
    out = {
        "reward_fwd_time": _ratio(rw["latent_fwd"]["median_s"], rw["pixel_clip_fwd"]["median_s"]),
        "reward_fwd_bwd_time": _ratio(rw["latent_fwd_bwd"]["median_s"], rw["pixel_clip_fwd_bwd"]["median_s"]),
        "reward_fwd_bwd_peak_memory": _ratio(
            rw["latent_fwd_bwd"]["peak_tensor_bytes"], rw["pixel_clip_fwd_bwd"]["peak_tensor_bytes"]
        ),
        "reward_fwd_flops": _ratio(fl["latent"]["forward"], fl["pixel_clip"]["forward"]),
        "reward_fwd_bwd_flops": _ratio(fl["latent"]["total"], fl["pixel_clip"]["total"]),
        "graded_update_time": _ratio(r["refl"]["graded_latent"]["median_s"], r["refl"]["graded_pixel_clip"]["median_s"]),
        "graded_update_peak_memory": _ratio(
            r["refl"]["graded_latent"]["peak_tensor_bytes"], r["refl"]["graded_pixel_clip"]["peak_tensor_bytes"]
        ),
        "paper_update_time": _ratio(r["refl"]["paper_update_latent_s"], r["refl"]["paper_update_pixel_clip_s"]),
    }
    out["latent_over_minimum_fwd_bwd_time"] = _ratio(
        rw["latent_fwd_bwd"]["median_s"], rw["minimum_merged_fwd_bwd"]["median_s"]
    )
    if "ensemble" in r:
        out["ensemble_batched_vs_separate_time"] = _ratio(
            r["ensemble"]["ensemble_batched"]["median_s"], r["ensemble"]["ensemble_separate"]["median_s"]
        )
    if "share_base_weights" in r:
        m = r["share_base_weights"]["measured_fp32"]
        out["share_base_weights_param_memory"] = _ratio(m["shared"], m["separate"])
    return out


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def markdown(r: dict[str, Any]) -> str:
    """Markdown section of a CPU run."""
    rw, q = r["reward"], r["ratios"]
    lines = [
        f"CPU, preset `{r['preset']}` ({C.get_preset(r['preset']).description}), {r['resolution']}x{r['resolution']} "
        f"({r['latent_tokens']} latent tokens, {r['text_tokens']} text tokens), median of {r['repeats']} "
        f"alternating runs, {r['machine']}. Reward model: {r['reward_model_implementation']}.",
        "",
        C.md_table(
            ["workload", "latent (DiNa-LRM)", "pixel (VAE decode + CLIP)", "latent / pixel"],
            [
                ["reward fwd, ms", f"{rw['latent_fwd']['median_s'] * 1e3:.1f}",
                 f"{rw['pixel_clip_fwd']['median_s'] * 1e3:.1f}", f"{q['reward_fwd_time']:.2f}"],
                ["reward fwd+bwd, ms", f"{rw['latent_fwd_bwd']['median_s'] * 1e3:.1f}",
                 f"{rw['pixel_clip_fwd_bwd']['median_s'] * 1e3:.1f}", f"{q['reward_fwd_bwd_time']:.2f}"],
                ["reward fwd+bwd peak tensor memory, MiB", _mb(rw["latent_fwd_bwd"]["peak_tensor_bytes"]),
                 _mb(rw["pixel_clip_fwd_bwd"]["peak_tensor_bytes"]), f"{q['reward_fwd_bwd_peak_memory']:.2f}"],
                ["reward fwd GFLOPs (same scale)", f"{r['reward_flops']['latent']['forward'] / 1e9:.1f}",
                 f"{r['reward_flops']['pixel_clip']['forward'] / 1e9:.1f}", f"{q['reward_fwd_flops']:.2f}"],
                ["reward fwd+bwd GFLOPs (same scale)", f"{r['reward_flops']['latent']['total'] / 1e9:.1f}",
                 f"{r['reward_flops']['pixel_clip']['total'] / 1e9:.1f}", f"{q['reward_fwd_bwd_flops']:.2f}"],
                ["graded ReFL step (policy fwd+bwd + reward fwd+bwd + AdamW), ms",
                 f"{r['refl']['graded_latent']['median_s'] * 1e3:.1f}",
                 f"{r['refl']['graded_pixel_clip']['median_s'] * 1e3:.1f}", f"{q['graded_update_time']:.2f}"],
                ["graded ReFL step peak tensor memory, MiB", _mb(r["refl"]["graded_latent"]["peak_tensor_bytes"]),
                 _mb(r["refl"]["graded_pixel_clip"]["peak_tensor_bytes"]), f"{q['graded_update_peak_memory']:.2f}"],
                [f"paper ReFL update ({PAPER_ROLLOUT_STEPS:g} CFG rollout steps + graded step), s",
                 f"{r['refl']['paper_update_latent_s']:.2f}", f"{r['refl']['paper_update_pixel_clip_s']:.2f}",
                 f"{q['paper_update_time']:.2f}"],
            ],
        ),
        "",
        f"One CFG rollout step (no grad, batch 2): {r['refl']['rollout_step_cfg']['median_s'] * 1e3:.1f} ms. "
        f"Architecture minimum (independent re-implementation, reward LoRA merged) fwd+bwd: "
        f"{rw['minimum_merged_fwd_bwd']['median_s'] * 1e3:.1f} ms; project / minimum = "
        f"{q['latent_over_minimum_fwd_bwd_time']:.2f}.",
    ]
    if "ensemble" in r:
        e = r["ensemble"]
        lines += [
            "",
            f"Ensemble over u = {tuple(e['levels'])}: one batched backbone pass "
            f"{e['ensemble_batched']['median_s'] * 1e3:.1f} ms vs {len(e['levels'])} separate passes "
            f"{e['ensemble_separate']['median_s'] * 1e3:.1f} ms (ratio {q['ensemble_batched_vs_separate_time']:.2f}); "
            f"peak tensor memory {_mb(e['peak_tensor_bytes']['ensemble_batched'])} vs "
            f"{_mb(e['peak_tensor_bytes']['ensemble_separate'])} MiB; outputs agree to {e['max_abs_difference']:.1e}.",
        ]
    if "share_base_weights" in r:
        s = r["share_base_weights"]
        m = s["measured_fp32"]
        lines += [
            "",
            f"`share_base_weights`: policy + reward-model parameters {_mb(m['separate'])} MiB separate vs "
            f"{_mb(m['shared'])} MiB shared at this scale (fp32; saves {_mb(m['saving_bytes'])} MiB).",
        ]
        if "full_scale_bf16" in s:
            f = s["full_scale_bf16"]
            lines[-1] += (
                f" At full scale (bf16, exact count): {f['separate'] / 1e9:.2f} GB vs {f['shared'] / 1e9:.2f} GB, "
                f"saving {f['saving_bytes'] / 1e9:.2f} GB."
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["small", "tiny"])
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent side = /8)")
    parser.add_argument("--t5-length", type=int, default=64, help="T5 tokens (text tokens = 77 + this)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 by default: robust on a shared machine, see docs/benchmarks.md)")
    parser.add_argument("--no-full-scale-share", action="store_true", help="skip the full-scale meta count")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown section here")
    parser.add_argument("--update-doc", type=Path, default=None, help="replace the cpu section of this doc")
    args = parser.parse_args(argv)
    result = run(args.preset, args.resolution, args.t5_length, args.repeats, args.warmup, args.threads,
                 full_scale_share=not args.no_full_scale_share)
    text = markdown(result)
    print(text)
    C.write_json(args.json, result)
    print(f"\nJSON: {args.json}  ({result['wall_s']:.0f} s)")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.update_doc:
        C.replace_doc_section(args.update_doc, "cpu", text)
    return result


if __name__ == "__main__":
    main()
