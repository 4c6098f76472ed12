"""Tests for dinalrm_align.algorithms.advantages and .losses (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch

import dinalrm_align.algorithms as algorithms
from dinalrm_align.algorithms.advantages import (
    PromptGrouper,
    as_group_ids,
    clip_advantages,
    combine_advantages,
    group_advantages,
    group_stats,
    rank_slice,
    sum_then_normalize,
    zero_std_mask,
    zero_std_ratio,
)
from dinalrm_align.algorithms.losses import (
    flow_matching_loss,
    gaussian_mean_kl,
    mix_regularized,
    ppo_clip_loss,
    refl_loss,
)

# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_values() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 14.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    adv = group_advantages(rewards, groups, eps=0.0)
    std_a = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    std_b = math.sqrt(((10 - 34 / 3) ** 2 * 2 + (14 - 34 / 3) ** 2) / 3)
    expected = torch.tensor([-1 / std_a, 0.0, 1 / std_a, (10 - 34 / 3) / std_b, (10 - 34 / 3) / std_b, (14 - 34 / 3) / std_b])
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32


def test_group_advantages_zero_mean_unit_std_per_group() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(6).repeat_interleave(8)[torch.randperm(48, generator=g)]
    rewards = torch.randn(48, generator=g) * torch.linspace(0.5, 3.0, 48) + 5
    adv = group_advantages(rewards, ids)
    for k in range(6):
        a = adv[ids == k].double()
        assert abs(a.mean().item()) < 1e-6
        assert abs(a.std(unbiased=False).item() - 1) < 1e-3
    # global std: one shared denominator
    adv_g = group_advantages(rewards, ids, global_std=True, eps=0.0)
    stats = group_stats(rewards, ids)
    expected = (rewards.double() - stats.mean[stats.inverse]) / rewards.double().std(unbiased=False)
    torch.testing.assert_close(adv_g.double(), expected, rtol=1e-6, atol=1e-6)


def test_group_split_across_ranks_matches_whole() -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [f"p{i}" for i in range(4) for _ in range(6)]  # 4 groups x 6
    rewards = torch.randn(24, generator=g)
    whole = group_advantages(rewards, prompts)
    # K-repeat sampler: shuffle, each of 2 ranks holds 12 samples with groups split across them
    perm = torch.randperm(24, generator=g)
    rank0, rank1 = perm[:12], perm[12:]
    gathered_r = torch.cat([rewards[rank0], rewards[rank1]])
    gathered_p = [prompts[i] for i in rank0.tolist() + rank1.tolist()]
    gathered_adv = group_advantages(gathered_r, gathered_p)
    torch.testing.assert_close(rank_slice(gathered_adv, 0, 2), whole[rank0])
    torch.testing.assert_close(rank_slice(gathered_adv, 1, 2), whole[rank1])
    with pytest.raises(ValueError, match="divisible"):
        rank_slice(gathered_adv[:11], 0, 2)


def test_group_id_forms_agree() -> None:
    rewards = torch.tensor([0.0, 1.0, 5.0, 2.0, 7.0, 3.0])
    names = ["x", "y", "x", "y", "x", "y"]
    tokens = torch.tensor([[3, 4, 0], [5, 6, 0], [3, 4, 0], [5, 6, 0], [3, 4, 0], [5, 6, 0]])
    ids = torch.tensor([7, 2, 7, 2, 7, 2])
    a = group_advantages(rewards, names)
    torch.testing.assert_close(group_advantages(rewards, tokens), a)
    torch.testing.assert_close(group_advantages(rewards, ids), a)
    inv, n = as_group_ids(names, 6)
    assert n == 2 and inv.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="entries"):
        group_advantages(rewards, names[:5])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), ["a", "a"])
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(rewards.reshape(2, 3), ["a", "b"])


def test_zero_std_filtering() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 4.0, 3.0])
    groups = ["a", "a", "a", "b", "b", "c", "d"]  # a constant, c/d singletons
    mask = zero_std_mask(rewards, groups)
    assert mask.tolist() == [True, True, True, False, False, True, True]
    assert zero_std_ratio(rewards, groups) == pytest.approx(3 / 4)
    adv = group_advantages(rewards, groups)
    assert torch.equal(adv[mask], torch.zeros(5))
    assert (adv[~mask].abs() > 0.9).all()


def test_combine_and_sum_then_normalize() -> None:
    groups = ["a", "a", "a", "b", "b", "b"]
    dina = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    pick = torch.tensor([20.0, 21.0, 23.0, 19.0, 22.0, 22.0])
    comps = {"dina_lrm": dina, "pickscore": pick, "logged_only": torch.zeros(6)}
    weights = {"dina_lrm": 1.0, "pickscore": 0.2}
    combined = combine_advantages(comps, weights, groups, False)
    torch.testing.assert_close(combined, group_advantages(dina, groups) + 0.2 * group_advantages(pick, groups))
    summed = sum_then_normalize(comps, weights, groups, False)
    torch.testing.assert_close(summed, group_advantages(dina + 0.2 * pick, groups))
    with pytest.raises(ValueError, match="unknown reward components"):
        combine_advantages(comps, {"hps": 1.0}, groups, False)
    with pytest.raises(ValueError, match="at least one"):
        sum_then_normalize(comps, {}, groups, False)


def test_clip_and_grouper() -> None:
    torch.testing.assert_close(clip_advantages(torch.tensor([-7.0, 0.5, 9.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(torch.zeros(2), 0.0)
    grouper = PromptGrouper()
    assert grouper(["a cat", "a dog", "a cat"]).tolist() == [0, 1, 0]
    assert grouper(["a dog", "a fox"]).tolist() == [1, 2]
    assert grouper.num_groups == 3 and grouper.prompts == ["a cat", "a dog", "a fox"]
    grouper.reset()
    assert grouper(["a fox"]).tolist() == [0]
    with pytest.raises(ValueError, match="single string"):
        grouper("a cat")


def test_package_lazy_exports() -> None:
    from dinalrm_align.algorithms.advantages import GroupAdvantages, compute_advantages

    assert algorithms.group_advantages is group_advantages
    assert algorithms.ppo_clip_loss is ppo_clip_loss
    assert algorithms.compute_advantages is compute_advantages and algorithms.GroupAdvantages is GroupAdvantages
    with pytest.raises(AttributeError):
        algorithms.does_not_exist  # noqa: B018


# ----------------------------------------------------------------------------- losses


def test_ppo_clip_loss_hand_values() -> None:
    ratios = torch.tensor([1.0, 1.2, 0.8, 1.05])
    old = torch.tensor([-3.0, -2.0, -1.0, 0.0])
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, info = ppo_clip_loss(logp, old, adv, clip_range=0.1)
    # per sample max(-A r, -A clip(r)): -1, max(-1.2, -1.1), max(0.8, 0.9), 2.1
    torch.testing.assert_close(loss, torch.tensor((-1.0 - 1.1 + 0.9 + 2.1) / 4))
    torch.testing.assert_close(info["clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(info["clipfrac_gt_one"], torch.tensor(0.25))
    torch.testing.assert_close(info["clipfrac_lt_one"], torch.tensor(0.25))
    torch.testing.assert_close(info["ratio_mean"], torch.tensor(1.0125))
    torch.testing.assert_close(info["approx_kl"], 0.5 * (ratios.log() ** 2).mean())
    torch.testing.assert_close(info["policy_loss"], loss.detach())
    loss.backward()
    # clipped samples (1, 2) get no gradient; d/dlogp (-A r)/4 = -A r / 4 for the others
    torch.testing.assert_close(logp.grad, torch.tensor([-0.25, 0.0, 0.0, 2 * 1.05 / 4]))
    assert not any(v.requires_grad for v in info.values())


def test_ppo_clip_loss_adv_clip_and_errors() -> None:
    zeros = torch.zeros(2)
    loss, info = ppo_clip_loss(zeros, zeros, torch.tensor([10.0, -1.0]), 1e-4, adv_clip_max=5.0)
    torch.testing.assert_close(loss, torch.tensor((-5.0 + 1.0) / 2))
    torch.testing.assert_close(info["clipfrac"], torch.tensor(0.0))
    torch.testing.assert_close(info["approx_kl"], torch.tensor(0.0))
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_loss(zeros, zeros, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(zeros, zeros, zeros, 0.0)


def test_gaussian_mean_kl() -> None:
    mean = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(gaussian_mean_kl(mean, mean.clone(), torch.full((3,), 0.3)), torch.zeros(3))
    kl = gaussian_mean_kl(mean + 1.0, mean, 0.5)
    torch.testing.assert_close(kl, torch.full((3,), 1 / (2 * 0.25)))
    kl_b = gaussian_mean_kl(mean + 1.0, mean, torch.tensor([1.0, 0.5, 0.25]))
    torch.testing.assert_close(kl_b, torch.tensor([0.5, 2.0, 8.0]))
    with pytest.raises(ValueError, match="same batched shape"):
        gaussian_mean_kl(mean, mean[:2], 1.0)


def test_refl_fm_and_mix() -> None:
    raw = torch.tensor([-8.0, -2.0, 4.0], requires_grad=True)
    loss = refl_loss((raw + 10) / 10)
    torch.testing.assert_close(loss, -torch.tensor([0.2, 0.8, 1.4]).mean())
    loss.backward()
    grad = raw.grad.clone()
    raw.grad = None
    (2 - (raw + 12) / 10).mean().backward()  # the released recipe's loss: same gradient
    torch.testing.assert_close(grad, raw.grad)
    v = torch.ones(2, 1, 2, 2)
    noise = torch.full((2, 1, 2, 2), 3.0)
    x0 = torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(flow_matching_loss(v, noise, x0), torch.tensor(1.0))  # target 2, error 1
    torch.testing.assert_close(flow_matching_loss(v, noise, x0, reduction="none"), torch.ones(2))
    torch.testing.assert_close(mix_regularized(torch.tensor(1.0), torch.tensor(3.0), 0.5), torch.tensor(2.5 / 1.5))
    torch.testing.assert_close(mix_regularized(torch.tensor(1.0), torch.tensor(3.0), 0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="lam"):
        mix_regularized(torch.tensor(1.0), torch.tensor(3.0), -1.0)
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(v, noise[:1], x0)
