"""Reward-model training losses, noise-level sampling and the shared-noise pair forward."""

from __future__ import annotations

import math

import pytest
import torch

from dinalrm_align.rm_training.losses import (
    bradley_terry_loss,
    fixed_variance_thurstone_loss,
    noise_variance,
    preference_loss,
    sample_u,
    thurstone_fidelity_loss,
    thurstone_probability,
)
from dinalrm_align.rm_training.pair import PairScorer, noisy_pair

R_POS = torch.tensor([1.0, 0.0])
R_NEG = torch.tensor([0.0, 0.5])
SIGMA = torch.tensor([0.5, 0.1])


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_noise_variance_released_constants():
    torch.testing.assert_close(noise_variance(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.05, 0.55, 2.05]))


def test_thurstone_fidelity_loss_hand_computed():
    # pair 1: dr = 1, v = 2*0.25 + 0.05 = 0.55 each -> P = Phi(1 / sqrt(1.1 + 1e-6)) = 0.829822
    # pair 2: dr = -0.5, v = 2*0.01 + 0.05 = 0.07 each -> P = Phi(-0.5 / sqrt(0.14 + 1e-6)) = 0.090725
    p = thurstone_probability(R_POS, R_NEG, noise_variance(SIGMA), noise_variance(SIGMA))
    torch.testing.assert_close(p, torch.tensor([0.829822019, 0.090725384]), atol=1e-6, rtol=0)
    loss = thurstone_fidelity_loss(R_POS, R_NEG, SIGMA)
    expected = ((1 - math.sqrt(0.829822019 + 1e-6)) + (1 - math.sqrt(0.090725384 + 1e-6))) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert abs(loss.item() - 0.393922786) < 1e-6


def test_noise_calibration_softens_high_noise_pairs():
    dr = torch.tensor([1.0, 1.0])
    p = thurstone_probability(dr, torch.zeros(2), noise_variance(torch.tensor([0.05, 0.95])), noise_variance(torch.tensor([0.05, 0.95])))
    assert p[0] > 0.95 and 0.6 < p[1] < 0.8


def test_fixed_variance_and_bradley_terry_hand_computed():
    expected_const = ((1 - math.sqrt(_phi(1 / math.sqrt(1 + 1e-6)) + 1e-6)) + (1 - math.sqrt(_phi(-0.5 / math.sqrt(1 + 1e-6)) + 1e-6))) / 2
    assert abs(fixed_variance_thurstone_loss(R_POS, R_NEG).item() - expected_const) < 1e-6
    assert abs(fixed_variance_thurstone_loss(R_POS, R_NEG).item() - 0.263644261) < 1e-6
    # BT: mean(log(1 + e^-1), log(1 + e^0.5)) = 0.643669336
    assert abs(bradley_terry_loss(R_POS, R_NEG).item() - 0.643669336) < 1e-6


def test_preference_loss_dispatch_and_errors():
    assert preference_loss("bt", R_POS, R_NEG).item() == pytest.approx(0.643669336, abs=1e-6)
    assert preference_loss("thurstone", R_POS, R_NEG, SIGMA).item() == pytest.approx(0.393922786, abs=1e-6)
    with pytest.raises(ValueError, match="valid losses"):
        preference_loss("hinge", R_POS, R_NEG)
    with pytest.raises(ValueError, match="sigma"):
        preference_loss("thurstone", R_POS, R_NEG)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(R_POS, torch.zeros(3))


def test_losses_decrease_with_margin_and_have_gradients():
    r_pos = torch.tensor([0.2, 0.3], requires_grad=True)
    loss = thurstone_fidelity_loss(r_pos, torch.zeros(2), torch.tensor([0.4, 0.4]))
    loss.backward()
    assert torch.all(r_pos.grad < 0)  # raising the chosen reward lowers the loss
    for name in ("thurstone", "thurstone-constant", "bt"):
        small = preference_loss(name, torch.tensor([0.1]), torch.zeros(1), torch.tensor([0.5]))
        large = preference_loss(name, torch.tensor([2.0]), torch.zeros(1), torch.tensor([0.5]))
        assert large < small


def test_u_samplers():
    g = torch.Generator().manual_seed(0)
    u = sample_u(20000, "uniform", generator=g)
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    assert abs((u < 0.25).float().mean().item() - 0.25) < 0.015
    ln = sample_u(20000, "logit_normal", generator=g, logit_mean=0.0, logit_std=1.0)
    assert abs(ln.mean().item() - 0.5) < 0.01
    assert (ln < 0.25).float().mean() < 0.2  # mass concentrated in the middle
    torch.testing.assert_close(
        sample_u(5, generator=torch.Generator().manual_seed(3)), sample_u(5, generator=torch.Generator().manual_seed(3))
    )
    with pytest.raises(ValueError, match="valid samplers"):
        sample_u(3, "beta")


def test_u_maps_to_nearest_table_sigma(tiny_rm):
    u = sample_u(64, generator=torch.Generator().manual_seed(1))
    sigma, timestep = tiny_rm.sigma_for(u)
    table = tiny_rm._sigmas
    assert torch.all(torch.isin(sigma, table))
    assert (sigma - u).abs().max() < 2e-3
    torch.testing.assert_close(timestep, sigma * 1000)


def test_noisy_pair_shares_noise_and_sigma():
    g = torch.Generator().manual_seed(0)
    chosen, rejected, noise = (torch.randn(3, 16, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.9])
    xp, xn = noisy_pair(chosen, rejected, sigma, noise)
    s = sigma[:, None, None, None]
    torch.testing.assert_close(xp, (1 - s) * chosen + s * noise)
    torch.testing.assert_close(xn, (1 - s) * rejected + s * noise)
    # identical clean latents -> identical noisy latents (same eps, same sigma)
    a, b = noisy_pair(chosen, chosen.clone(), sigma, noise)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="same shape"):
        noisy_pair(chosen, rejected[:, :, :4], sigma, noise)


def test_pair_scorer_matches_forward_noisy(tiny_rm, tiny_text):
    _, pe, pooled = tiny_text
    g = torch.Generator().manual_seed(0)
    chosen, rejected, noise = (torch.randn(4, 16, 16, 16, generator=g) for _ in range(3))
    sigma, _ = tiny_rm.sigma_for(torch.tensor([0.2, 0.4, 0.6, 0.8]))
    with torch.no_grad():
        cond = tiny_rm.conditioning(pe, pooled)
        rp, rn = PairScorer(tiny_rm)(chosen, rejected, sigma, noise, cond)
        xp, xn = noisy_pair(chosen, rejected, sigma, noise)
        ref_p = tiny_rm.forward_noisy(xp, sigma, prompt_embeds=pe, pooled_prompt_embeds=pooled)
        ref_n = tiny_rm.forward_noisy(xn, sigma, prompt_embeds=pe, pooled_prompt_embeds=pooled)
        same_p, same_n = PairScorer(tiny_rm)(chosen, chosen, sigma, noise, cond)
    torch.testing.assert_close(rp, ref_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rn, ref_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same_p, same_n)  # shared noise: equal latents score equally
