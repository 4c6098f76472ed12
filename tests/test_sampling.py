"""Tests for dinalrm_align.sampling: schedule, pure steps, the Denoiser, rollouts on the tiny SD3 pipeline."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dinalrm_align.backbones.conditioning import TextConditioning
from dinalrm_align.backbones.registry import get_adapter
from dinalrm_align.sampling.rollout import (
    Denoiser,
    Trajectory,
    choose_sde_window,
    ode_rollout,
    sde_rollout,
    step_log_prob,
)
from dinalrm_align.sampling.schedule import inference_schedule, step_sigmas
from dinalrm_align.sampling.steps import (
    cps_step_with_logprob,
    euler_step,
    gaussian_log_prob,
    predict_x0,
    sde_step_with_logprob,
    step_with_logprob,
)

SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models are faster on one thread (and the CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """``(pipe, cond (batch 2), negative (batch 1), noise (2, 16, 32, 32), raw tensors)`` of the tiny SD3 pipeline."""
    from dinalrm_align.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(["a red cube", "a blue ball"], None, None, max_sequence_length=16,
                                              do_classifier_free_guidance=False)
        neg, _, neg_pooled, _ = pipe.encode_prompt([""], None, None, max_sequence_length=16,
                                                   do_classifier_free_guidance=False)
    noise = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    return pipe, TextConditioning(pe, pooled), TextConditioning(neg, neg_pooled), noise, (pe, pooled, neg, neg_pooled)


def policy(pipe, guidance: float = 1.0, negative: TextConditioning | None = None, **kwargs) -> Denoiser:
    return Denoiser(get_adapter("sd3"), pipe.transformer, guidance_scale=guidance,
                    negative=negative if guidance > 1 else None, **kwargs)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_steps", [1, 4, 10, 40])
def test_schedule_equals_diffusers(num_steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    sched.set_timesteps(num_steps)
    sigmas, timesteps = inference_schedule(SD3_SCHEDULER_CONFIG, num_steps)
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,)
    assert torch.equal(sigmas, sched.sigmas) and torch.equal(timesteps, sched.timesteps)
    assert torch.equal(timesteps, sigmas[:-1] * 1000)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    # shift-3 closed form: sigma = 3 s / (1 + 2 s), s linear from 1 to sigma_min (= shifted 1/1000)
    s_min = 3 * 1e-3 / (1 + 2 * 1e-3)
    s = torch.linspace(1.0, s_min, num_steps, dtype=torch.float64) if num_steps > 1 else torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(sigmas[:-1].double(), 3 * s / (1 + 2 * s), atol=1e-6, rtol=0)


def test_schedule_from_pipeline_config_and_errors(tiny) -> None:
    pipe = tiny[0]
    sigmas, _ = inference_schedule(pipe.scheduler.config, 4)
    pipe.scheduler.set_timesteps(4)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    with pytest.raises(ValueError, match="num_steps"):
        inference_schedule(SD3_SCHEDULER_CONFIG, 0)
    with pytest.raises(ValueError, match="mu"):
        inference_schedule({**SD3_SCHEDULER_CONFIG, "use_dynamic_shifting": True}, 4)
    s, sn = step_sigmas(sigmas, 3)
    assert float(s) == float(sigmas[3]) and float(sn) == 0.0
    with pytest.raises(ValueError, match="out of range"):
        step_sigmas(sigmas, 4)


# ----------------------------------------------------------------------------- pure steps


def test_euler_and_predict_x0_hand_values() -> None:
    x = torch.ones(2, 1, 2, 2)
    v = torch.full((2, 1, 2, 2), 2.0)
    torch.testing.assert_close(euler_step(x, v, 0.5, 0.3), torch.full_like(x, 0.6))
    torch.testing.assert_close(predict_x0(x, v, 0.5), torch.zeros_like(x))
    # per-sample sigma (B,)
    out = euler_step(x, v, torch.tensor([0.5, 1.0]), torch.tensor([0.3, 0.5]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(predict_x0(x, v, torch.tensor([0.25, 0.5]))[:, 0, 0, 0], torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        euler_step(x, v[:1], 0.5, 0.3)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        euler_step(x, v, torch.tensor([0.5, 0.4, 0.3]), 0.3)


def _sde_expected(x, v, s, sn, a):
    x, v = x.double(), v.double()
    dt = sn - s
    s_denom = sn if s >= 1 else s
    std_dev_t = a * math.sqrt(s / (1 - s_denom))
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


@pytest.mark.parametrize(("s", "sn"), [(0.6, 0.5), (1.0, 0.9), (0.2, 0.0)])
def test_sde_step_closed_form(s: float, sn: float) -> None:
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    out = sde_step_with_logprob(x, v, s, sn, noise_level=0.7, noise=eps)
    mean, std = _sde_expected(x, v, s, sn, 0.7)
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std.double(), torch.full((3,), std, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.prev_sample.double(), mean + std * eps.double(), atol=1e-5, rtol=1e-5)
    lp = (-((out.prev_sample.double() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(out.log_prob.double(), lp.mean(dim=(1, 2, 3)), atol=1e-4, rtol=1e-5)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (3,)
    assert bool(torch.isfinite(out.log_prob).all())
    # log-prob of a given prev_sample (no resampling)
    prev = torch.randn(3, 4, 4, 4, generator=g)
    given = sde_step_with_logprob(x, v, s, sn, noise_level=0.7, prev_sample=prev)
    assert given.prev_sample is prev
    lp2 = -((prev.double() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(given.log_prob.double(), lp2.mean(dim=(1, 2, 3)), atol=1e-4, rtol=1e-5)


def test_sde_sigma_max_override() -> None:
    x, v = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    out = sde_step_with_logprob(x, v, 1.0, 0.9, noise_level=0.5, sigma_max=0.95, noise=torch.zeros_like(x))
    torch.testing.assert_close(out.std, torch.tensor([0.5 * math.sqrt(1 / 0.05) * math.sqrt(0.1)]))


@pytest.mark.parametrize("fn", [sde_step_with_logprob, cps_step_with_logprob])
def test_noise_level_zero_is_euler(fn) -> None:
    x, v = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    sig = torch.tensor([1.0, 0.7])
    out = fn(x, v, sig, torch.tensor([0.9, 0.6]), noise_level=0.0)
    assert torch.equal(out.prev_sample, euler_step(x, v, sig, torch.tensor([0.9, 0.6])))
    assert torch.equal(out.log_prob, torch.zeros(2)) and torch.equal(out.std, torch.zeros(2))


def test_cps_step_closed_form_and_marginal_scale() -> None:
    s, sn, a = 0.7, 0.6, 0.8
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 16, 32, 32, generator=g)
    eps = torch.randn(8, 16, 32, 32, generator=g)
    x = (1 - s) * x0 + s * eps
    v = eps - x0  # exact (per-sample) velocity
    out = cps_step_with_logprob(x, v, s, sn, noise_level=a, generator=g)
    std = sn * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    mean = (1 - sn) * x0_hat + math.sqrt(sn**2 - std**2) * x1_hat
    torch.testing.assert_close(out.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std, torch.full((8,), std))
    var = out.prev_sample.var().item()
    expected = (1 - sn) ** 2 + sn**2
    assert abs(var / expected - 1) < 0.02, (var, expected)
    # the coefficient on x0 is preserved exactly: E[prev * x0] = (1 - sn)
    assert abs((out.prev_sample * x0).mean().item() - (1 - sn)) < 0.02
    # constant-free log-prob
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - out.mean) ** 2).mean(dim=(1, 2, 3)))
    # last step: std = 0, deterministic, equals x0_hat
    last = cps_step_with_logprob(x, v, s, 0.0, noise_level=a, generator=g)
    torch.testing.assert_close(last.prev_sample, x0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="noise_level"):
        cps_step_with_logprob(x, v, s, sn, noise_level=1.5)


def test_sde_step_preserves_marginal_with_exact_marginal_velocity() -> None:
    # x0 ~ N(0, I): the marginal velocity at noise level t is linear, v(x) = (2t - 1) x / ((1-t)^2 + t^2)
    s, sn, a = 0.5, 0.48, 0.7
    g = torch.Generator().manual_seed(2)
    var_s = (1 - s) ** 2 + s**2
    x = torch.randn(8, 16, 32, 32, generator=g) * math.sqrt(var_s)
    v = (2 * s - 1) * x / var_s
    out = sde_step_with_logprob(x, v, s, sn, noise_level=a, generator=g)
    expected = (1 - sn) ** 2 + sn**2
    assert abs(out.prev_sample.var().item() / expected - 1) < 0.03


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_log_prob_equals_stored(sde_type: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 8, 8, generator=g).to(dtype)
    v = torch.randn(4, 16, 8, 8, generator=g).to(dtype)
    sig, sig_next = torch.tensor([1.0, 0.8, 0.5, 0.3]), torch.tensor([0.9, 0.7, 0.4, 0.2])
    out = step_with_logprob(sde_type, x, v, sig, sig_next, generator=g)
    assert out.prev_sample.dtype == dtype
    again = step_with_logprob(sde_type, x, v, sig, sig_next, prev_sample=out.prev_sample)
    assert torch.equal(out.log_prob, again.log_prob)
    # per-sample sigmas equal single-sample calls
    single = step_with_logprob(sde_type, x[1:2], v[1:2], 0.8, 0.7, prev_sample=out.prev_sample[1:2])
    torch.testing.assert_close(single.log_prob, out.log_prob[1:2])


def test_log_prob_gradient_flows_through_mean_only() -> None:
    x = torch.randn(2, 4, 4, 4)
    v = torch.randn(2, 4, 4, 4, requires_grad=True)
    prev = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = sde_step_with_logprob(x, v, 0.5, 0.4, prev_sample=prev)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None
    lp = gaussian_log_prob(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 1))
    torch.testing.assert_close(lp, torch.tensor([-0.5 * math.log(2 * math.pi)]))


@pytest.mark.parametrize(("s", "sn"), [(0.6, 0.5), (0.3, 0.0), (1.0, 0.9)])
def test_kl_std_is_flow_grpo_noise_scale(s: float, sn: float) -> None:
    """``StepOutput.kl_std``: sde -> ``noise_level * sqrt(sigma / (1 - sigma))`` (no ``sqrt(-dt)``), cps -> ``std``."""
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    out = sde_step_with_logprob(x, v, s, sn, noise_level=0.7, generator=g)
    denom = sn if s >= 1 else s  # the first SD3 step (sigma = 1) uses the next sigma in 1 - sigma
    std_t = 0.7 * math.sqrt(s / (1 - denom))
    torch.testing.assert_close(out.kl_std, torch.full((2,), std_t), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.std, out.kl_std * math.sqrt(s - sn), rtol=1e-6, atol=0)
    if sn > 0:
        cps = cps_step_with_logprob(x, v, s, sn, noise_level=0.8, generator=g)
        torch.testing.assert_close(cps.kl_std, cps.std)
        torch.testing.assert_close(cps.std, torch.full((2,), sn * math.sin(0.8 * math.pi / 2)))


# ----------------------------------------------------------------------------- the denoiser


class FakeTransformer(torch.nn.Module):
    """v = w * x + mean(prompt) + mean(pooled) + t / 1000; records the timesteps it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[torch.Tensor] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                joint_attention_kwargs=None, return_dict=True):
        self.calls.append(timestep.detach().clone())
        c = encoder_hidden_states.mean(dim=(1, 2)) + pooled_projections.mean(dim=1) + timestep / 1000
        return (self.w * hidden_states + c[:, None, None, None],)


def test_denoiser_cfg_and_detach_uncond() -> None:
    adapter = get_adapter("sd3")
    tr = FakeTransformer()
    x = torch.randn(3, 2, 4, 4)
    cond = TextConditioning(torch.ones(3, 5, 4), torch.ones(3, 6))
    neg = TextConditioning(torch.zeros(1, 5, 4), torch.zeros(1, 6))
    v1 = Denoiser(adapter, tr)(x, 0.25, cond)
    torch.testing.assert_close(tr.calls[-1], torch.full((3,), 250.0))  # SD3 time: timestep = 1000 sigma
    torch.testing.assert_close(v1, 0.5 * x + 2.25)
    # CFG: v_u = 0.5x + 0.25, v_c = 0.5x + 2.25 -> v_u + 4 (v_c - v_u) = 0.5x + 8.25; one batched call
    n_calls = len(tr.calls)
    detached = Denoiser(adapter, tr, guidance_scale=4.0, negative=neg, detach_uncond=True)
    v = detached(x, 0.25, cond)
    assert len(tr.calls) == n_calls + 1 and tr.calls[-1].shape == (6,)
    torch.testing.assert_close(v, 0.5 * x + 8.25)
    # detached uncond: d sum(v)/dw = g * sum(x); not detached (the default): (1 - g + g) * sum(x) = sum(x)
    v.sum().backward()
    torch.testing.assert_close(tr.w.grad, 4.0 * x.sum())
    tr.w.grad = None
    both = Denoiser(adapter, tr, guidance_scale=4.0, negative=TextConditioning(neg.embeds.expand(3, -1, -1),
                                                                               neg.pooled.expand(3, -1)))
    assert not both.detach_uncond
    both(x, 0.25, cond).sum().backward()
    torch.testing.assert_close(tr.w.grad, x.sum(), rtol=1e-4, atol=1e-4)
    # per-sample sigmas; the same settings on another transformer
    Denoiser(adapter, tr)(x, torch.tensor([0.9, 0.5, 0.003]), cond)
    torch.testing.assert_close(tr.calls[-1], torch.tensor([900.0, 500.0, 3.0]))
    other = FakeTransformer()
    swapped = detached.with_transformer(other)
    assert swapped.transformer is other and swapped.guidance_scale == 4.0 and swapped.detach_uncond
    with pytest.raises(ValueError, match="negative"):
        Denoiser(adapter, tr, guidance_scale=4.0)
    with pytest.raises(ValueError, match="batch 2"):
        Denoiser(adapter, tr)(x, 0.5, cond[:2])
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        Denoiser(adapter, tr)(x[0], 0.5, cond)
    with pytest.raises(ValueError, match="sigma"):
        Denoiser(adapter, tr)(x, torch.tensor([0.5, 0.4]), cond)
    for bad in (TextConditioning(torch.zeros(1, 7, 4), torch.zeros(1, 6)),  # other length (SD3: fixed length)
                TextConditioning(torch.zeros(1, 5, 8), torch.zeros(1, 6))):  # other width
        with pytest.raises(ValueError, match="does not match the prompt conditioning"):
            Denoiser(adapter, tr, guidance_scale=2.0, negative=bad)(x, 0.5, cond)


def test_choose_sde_window() -> None:
    gen = torch.Generator().manual_seed(0)
    starts = {choose_sde_window(10, 3, (0, 5), gen)[0] for _ in range(60)}
    assert starts == {0, 1, 2}
    start, end = choose_sde_window(10, 3, (0, 5), random.Random(0))
    assert end - start == 3 and 0 <= start <= 2
    assert choose_sde_window(10, 5, (0, 5)) == (0, 5)
    with pytest.raises(ValueError, match="window_size"):
        choose_sde_window(10, 6, (0, 5))
    with pytest.raises(ValueError, match="window_range"):
        choose_sde_window(10, 2, (4, 11))


# ----------------------------------------------------------------------------- tiny pipeline


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_rollout_matches_pipeline(tiny, guidance: float) -> None:
    pipe, cond, neg, noise, (pe, pooled, neg_pe, neg_pooled) = tiny
    sigmas, _ = get_adapter("sd3").inference_schedule(pipe.scheduler.config, 4, (32, 32))
    den = policy(pipe, guidance, neg)
    with torch.no_grad():
        ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_pe.expand(2, -1, -1),
                   negative_pooled_prompt_embeds=neg_pooled.expand(2, -1), latents=noise.clone(),
                   num_inference_steps=4, guidance_scale=guidance, output_type="latent").images
        ours = ode_rollout(den, noise, sigmas, cond)
        # bit-exact in practice; [0, 2) followed by [2, 4) gives the same result
        mid = ode_rollout(den, noise, sigmas, cond, stop=2)
        end = ode_rollout(den, mid, sigmas, cond, start=2)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(end, ours, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="start"):
        ode_rollout(den, noise, sigmas, cond, start=3, stop=2)
    with pytest.raises(ValueError, match="sigmas"):
        ode_rollout(den, noise, sigmas[:1], cond)


def test_sde_rollout_window_and_ode_limit(tiny) -> None:
    pipe, cond, _, noise, _ = tiny
    sigmas, _ = inference_schedule(pipe.scheduler.config, 4)
    den = policy(pipe)
    with torch.no_grad():
        ode = ode_rollout(den, noise, sigmas, cond)
        traj0 = sde_rollout(den, noise, sigmas, cond, noise_level=0.0)
        traj = sde_rollout(den, noise, sigmas, cond, sde_type="sde", noise_level=0.7,
                           sde_window=(1, 3), generator=torch.Generator().manual_seed(5))
        again = sde_rollout(den, noise, sigmas, cond, sde_type="sde", noise_level=0.7,
                            sde_window=(1, 3), generator=torch.Generator().manual_seed(5))
    assert isinstance(traj, Trajectory)
    assert torch.equal(traj0.final_latents, ode) and not traj0.sde_mask.any()
    assert torch.equal(traj0.log_probs, torch.zeros(2, 4))
    assert traj.latents.shape == (2, 5, 16, 32, 32) and traj.log_probs.shape == (2, 4)
    assert traj.sde_mask.tolist() == [False, True, True, False] and traj.train_steps() == [1, 2]
    assert torch.equal(traj.sigmas, sigmas) and traj.noise_level == 0.7 and traj.sde_type == "sde"
    with torch.no_grad():
        first_ode_step = ode_rollout(den, noise, sigmas, cond, stop=1)
    assert torch.equal(traj.latents[:, 0], noise) and torch.equal(traj.latents[:, 1], first_ode_step)
    assert (traj.log_probs[:, [0, 3]] == 0).all() and (traj.log_probs[:, 1:3] != 0).all()
    assert torch.equal(traj.latents, again.latents)  # reproducible with a seeded generator
    assert not torch.allclose(traj.final_latents, ode)
    # cps: final step (sigma_next = 0) is deterministic and therefore not in the mask
    with torch.no_grad():
        cps = sde_rollout(den, noise, sigmas, cond, sde_type="cps")
    assert cps.sde_mask.tolist() == [True, True, True, False] and cps.noise_level == 0.8
    with pytest.raises(ValueError, match="sde_type"):
        sde_rollout(den, noise, sigmas, cond, sde_type="ddim")
    with pytest.raises(ValueError, match="sde_window"):
        sde_rollout(den, noise, sigmas, cond, sde_window=(2, 6))


@pytest.mark.parametrize(("sde_type", "guidance"), [("sde", 1.0), ("cps", 4.5)])
def test_ratio_is_one_on_tiny_pipeline(tiny, sde_type: str, guidance: float) -> None:
    pipe, cond, neg, noise, _ = tiny
    sigmas, _ = inference_schedule(pipe.scheduler.config, 4)
    den = policy(pipe, guidance, neg)
    with torch.no_grad():
        traj = sde_rollout(den, noise, sigmas, cond, sde_type=sde_type, sde_window=(0, 3),
                           generator=torch.Generator().manual_seed(7))
    assert traj.train_steps() == [0, 1, 2]
    for i in traj.train_steps():
        x_t, x_next = traj.transition(i)
        out = step_log_prob(den, x_t, x_next, sigmas[i], sigmas[i + 1], cond,
                            sde_type=traj.sde_type, noise_level=traj.noise_level)
        ratio = torch.exp(out.log_prob - traj.log_probs[:, i])
        torch.testing.assert_close(ratio, torch.ones(2), atol=1e-5, rtol=0)
        assert out.std.shape == (2,) and out.kl_std.shape == (2,) and out.mean.shape == x_t.shape
    with pytest.raises(ValueError, match="must match"):
        step_log_prob(den, x_t, x_next[:, :8], sigmas[0], sigmas[1], cond)
