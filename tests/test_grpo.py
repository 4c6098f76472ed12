"""GRPO on the tiny models: the k-repeat sampler, advantages across processes, zero-std filtering, the
batching arithmetic, ratio 1 and KL 0 through the real training path, the KL forms against a hand
computation, CFG gradients, device-side metrics, reward rise, exact resume (mid-epoch too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_grpo.yaml"
PROMPTS = REPO / "recipes" / "prompts" / "tiny_prompts.txt"
#: Small and fast: 32 px (16x16 latents), 4 steps, one trained step, 4 samples per batch.
FAST = [
    "sampling.resolution=32",
    "sampling.num_steps=4",
    "algorithm.sde_window_size=1",
    "algorithm.sde_window_range=[0,2]",
    "eval.num_steps=4",
    "train.batch_size=4",
    "eval.at_start=false",
    "eval.at_end=false",
    "eval.every=0",
    "checkpoint.every=0",
]


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A pixel-space reward on decoded images (B, 3, H, W) in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


class LatentNorm:
    """A reward in the keyword latent-reward protocol of ``dinalrm_align.rewards`` (log-only here)."""

    name = "latent_norm"
    required_fields = ("latents",)
    optional_fields = ("prompts",)

    def __call__(self, *, latents: torch.Tensor, prompts=None, **_) -> torch.Tensor:
        assert prompts is not None and len(prompts) == latents.shape[0]
        return latents.flatten(1).norm(dim=1)


pytestmark = pytest.mark.usefixtures("fresh_trainer_state")


def make_trainer(tmp: Path, *overrides: str):
    from dinalrm_align.trainer.config import load_train_config
    from dinalrm_align.trainer.loop import Trainer

    cfg = load_train_config(TINY, [f"data.prompts={PROMPTS}", f"run_dir={tmp}", *overrides])
    return Trainer(cfg, progress=False)


def update(trainer) -> dict[str, float]:
    """One optimizer update through the trainer; the metrics as they are logged (``train/...``, ``perf/...``)."""
    from dinalrm_align.trainer.metrics import MetricBuffer

    buffer = MetricBuffer()
    assert trainer._update(buffer), "the update was skipped"
    values = buffer.reduce(trainer.accelerator)
    return {(f"perf/{k}" if k in ("step_time_s", "peak_mem_gb") else f"train/{k}"): v for k, v in values.items()}


# ----------------------------------------------------------------------------- sampler


def test_k_repeat_sampler_groups_span_processes_and_resume():
    from dinalrm_align.trainer.grouping import KRepeatSampler, prompt_group_ids

    prompts = [f"p{i}" for i in range(10)]
    ranks = [KRepeatSampler(prompts, 2, 4, num_processes=2, rank=r, seed=3, batches_per_epoch=2) for r in (0, 1)]
    assert ranks[0].prompts_per_batch == 1
    for b in range(12):
        both = ranks[0].rank_indices(b) + ranks[1].rank_indices(b)
        assert both == ranks[0].global_indices(b) == ranks[1].global_indices(b)  # same shuffle on every rank
        assert len(set(both)) == 1 and len(both) == 4  # one prompt x k=4, split 2 + 2 over the ranks
    big = KRepeatSampler(prompts, 6, 3, num_processes=1, seed=3, batches_per_epoch=3)
    assert big.prompts_per_batch == 2 and big.batches_per_pass == 5
    seen = [big.batch_prompt_ids(b) for b in range(5)]
    assert sorted(i for s in seen for i in s) == list(range(10))  # one pass covers every prompt once
    for b in range(20):
        ids = big.global_indices(b)
        assert sorted(ids) == sorted(big.batch_prompt_ids(b) * 3)
    # one call per training chunk: the epoch's prompts come with the first call
    calls = [big.next_batch() for _ in range(6)]
    assert [len(c) for c in calls] == [18, 0, 0, 18, 0, 0]
    assert big.epoch == 2 and big.position == 2 * 3 * 2
    state = big.state_dict()
    again = KRepeatSampler(prompts, 6, 3, num_processes=1, seed=3, batches_per_epoch=3)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(3)] == [big.next_batch() for _ in range(3)]
    with pytest.raises(ValueError, match="batch_size=6"):
        KRepeatSampler(prompts, 3, 3, num_processes=2, batches_per_epoch=3).load_state_dict(state)
    with pytest.raises(ValueError, match="groups of 3"):
        KRepeatSampler(prompts, 2, 3, num_processes=2)
    with pytest.raises(ValueError, match="distinct prompts"):
        KRepeatSampler(prompts[:1], 4, 2)
    ids = prompt_group_ids(["a", "b", "a"])
    assert ids.dtype == torch.long and ids[0] == ids[2] != ids[1]


# ----------------------------------------------------------------------------- advantages


def test_advantages_when_a_group_spans_two_processes():
    """Rank 0 holds 3 samples of prompt A and 1 of B, rank 1 holds 1 of A and 3 of B: gathering first
    gives each rank exactly the advantages of the whole groups."""
    from dinalrm_align.algorithms.advantages import compute_advantages, rank_slice
    from dinalrm_align.trainer.grouping import prompt_group_ids

    prompts = [["A", "A", "A", "B"], ["A", "B", "B", "B"]]
    rewards = [torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([6.0, 12.0, 11.0, 15.0])]
    gathered = torch.cat(rewards)  # accelerator.gather concatenates in rank order
    ids = torch.cat([prompt_group_ids(p) for p in prompts])
    res = compute_advantages({"r": gathered}, ids, {"r": 1.0}, global_std=False, adv_clip_max=None, eps=0.0)
    a = torch.tensor([1.0, 2.0, 3.0, 6.0])
    b = torch.tensor([10.0, 12.0, 11.0, 15.0])
    exp_a = (a - a.mean()) / a.std(unbiased=False)
    exp_b = (b - b.mean()) / b.std(unbiased=False)
    torch.testing.assert_close(rank_slice(res.advantages, 0, 2), torch.cat([exp_a[:3], exp_b[:1]]))
    torch.testing.assert_close(rank_slice(res.advantages, 1, 2), torch.cat([exp_a[3:], exp_b[1:]]))
    for group in (ids == ids[0], ids != ids[0]):  # zero mean, unit std per group
        assert abs(float(res.advantages[group].mean())) < 1e-6
        assert abs(float(res.advantages[group].std(unbiased=False)) - 1) < 1e-5
    assert res.num_groups == 2 and res.zero_std_ratio == 0.0 and bool(res.keep.all())
    # a per-rank computation would be wrong: rank 0 alone sees A = (1, 2, 3) and B = (10,)
    local = compute_advantages({"r": rewards[0]}, prompt_group_ids(prompts[0]), {"r": 1.0}, adv_clip_max=None)
    assert not torch.allclose(local.advantages, rank_slice(res.advantages, 0, 2))
    # global std: one denominator for all samples
    glob = compute_advantages({"r": gathered}, ids, {"r": 1.0}, global_std=True, adv_clip_max=None, eps=0.0)
    centred = torch.cat([a - a.mean(), b - b.mean()])[[0, 1, 2, 4, 3, 5, 6, 7]]
    torch.testing.assert_close(glob.advantages, centred / gathered.std(unbiased=False))


def test_zero_std_filtering_components_and_chunks():
    from dinalrm_align.algorithms.advantages import compute_advantages
    from dinalrm_align.algorithms.grpo_rollout import make_chunks

    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    dina = torch.tensor([1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 7.0, 7.0, 7.0])
    pick = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    comps = {"dina_lrm": dina, "pick": pick}
    res = compute_advantages({"dina_lrm": dina}, ids, {"dina_lrm": 1.0})
    assert res.keep.tolist() == [True] * 3 + [False] * 6
    assert res.zero_std_ratio == pytest.approx(2 / 3) and bool((res.advantages[3:] == 0).all())
    # per component: a group is dropped only when every weighted component is constant in it
    both = compute_advantages(comps, ids, {"dina_lrm": 1.0, "pick": 0.2})
    assert both.keep.tolist() == [True] * 6 + [False] * 3 and both.zero_std_ratio == pytest.approx(1 / 3)
    single = compute_advantages({"pick": pick}, ids, {"pick": 1.0}, adv_clip_max=None)
    torch.testing.assert_close(both.advantages[3:6], 0.2 * single.advantages[3:6])  # dina is constant there
    # sum mode normalises the weighted sum (scales matter)
    summed = compute_advantages(comps, ids, {"dina_lrm": 1.0, "pick": 0.2}, mode="sum", adv_clip_max=None)
    assert summed.keep.tolist() == both.keep.tolist()
    unfiltered = compute_advantages({"dina_lrm": dina}, ids, {"dina_lrm": 1.0}, filter_zero_std=False)
    assert bool(unfiltered.keep.all()) and unfiltered.zero_std_ratio == pytest.approx(2 / 3)
    clipped = compute_advantages({"dina_lrm": torch.tensor([0.0] * 9 + [100.0])}, torch.zeros(10), {"dina_lrm": 1.0}, adv_clip_max=2.0)
    assert float(clipped.advantages.max()) == 2.0
    # chunks: sizes differ by at most one; too few kept samples -> one per chunk, padded with dropped ones
    chunks = make_chunks(torch.tensor([True] * 7 + [False] * 3), 3, torch.Generator().manual_seed(0))
    assert sorted(len(c) for c in chunks) == [2, 2, 3] and sorted(torch.cat(chunks).tolist()) == list(range(7))
    few = make_chunks(torch.tensor([False, True, False, False]), 3)
    assert [c.tolist() for c in few] == [[1], [0], [2]]
    with pytest.raises(ValueError, match="unknown|not computed"):
        compute_advantages({"dina_lrm": dina}, ids, {"pick": 1.0})


def test_batching_plan_and_config_errors(tmp_path, monkeypatch):
    from dinalrm_align.algorithms.grpo import GRPO
    from dinalrm_align.algorithms.grpo_config import BatchingPlan, GRPOConfig, trained_steps_per_sample
    from dinalrm_align.trainer.config import load_train_config

    plan = BatchingPlan(processes=8, batch_size=9, group_size=18, batches_per_epoch=16, accumulation=8, trained_steps=3)
    assert (plan.samples_per_epoch, plan.groups_per_epoch, plan.updates_per_epoch, plan.micro_steps_per_update) == (
        1152, 64, 2, 24,
    )
    assert "2 optimizer step(s) per epoch" in plan.format()
    with pytest.raises(ValueError, match="multiple of the gradient"):
        BatchingPlan(processes=1, batch_size=4, group_size=4, batches_per_epoch=3, accumulation=2, trained_steps=1)
    with pytest.raises(ValueError, match="not a multiple of algorithm.group_size"):
        BatchingPlan(processes=1, batch_size=6, group_size=4, batches_per_epoch=2, accumulation=1, trained_steps=1)

    base = [f"data.prompts={PROMPTS}", f"run_dir={tmp_path}"]

    def validate(*overrides: str) -> GRPO:
        cfg = load_train_config(TINY, [*base, *overrides])
        algo = GRPO(cfg.algorithm)
        algo.validate(cfg, 1)
        return algo

    # timestep_fraction defaults to Flow-GRPO's 0.99: int(S x 0.99) of S stochastic steps are trained
    assert GRPOConfig().timestep_fraction == 0.99
    assert trained_steps_per_sample(GRPOConfig(sde_type="sde"), 10) == 9
    assert trained_steps_per_sample(GRPOConfig(sde_type="cps"), 10) == 8  # 9 stochastic: the last cps step is not
    assert trained_steps_per_sample(GRPOConfig(sde_type="sde", timestep_fraction=1.0), 10) == 10
    assert validate().micro_steps_per_batch == 2
    assert validate("algorithm.sde_window_size=0").micro_steps_per_batch == 6  # cps: 7 stochastic of 8
    assert validate("algorithm.sde_window_size=0", "algorithm.sde_type=sde").micro_steps_per_batch == 7
    with pytest.raises(RuntimeError, match="after its preflight"):
        GRPO(GRPOConfig()).micro_steps_per_batch  # noqa: B018
    recipe = load_train_config(REPO / "recipes" / "grpo_sd35m.yaml", [f"data.prompts={PROMPTS}"])
    spec = GRPO(recipe.algorithm)
    spec.validate(recipe, 8)  # as under `accelerate launch --num_processes 8`
    assert spec.micro_steps_per_batch == 3 and spec.plan is not None
    assert (spec.plan.samples_per_epoch, spec.plan.groups_per_epoch, spec.plan.updates_per_epoch) == (1152, 64, 2)
    with pytest.raises(ValueError, match="not a multiple of algorithm.group_size"):
        spec.validate(recipe, 1)  # 9 samples on one process cannot hold groups of 18
    monkeypatch.setenv("WORLD_SIZE", "8")  # the preflight takes the launcher's process count
    from dinalrm_align.trainer.loop import Trainer

    eight = load_train_config(REPO / "recipes" / "grpo_sd35m.yaml", [f"data.prompts={PROMPTS}", "data.num_eval_prompts=4"])
    pre = Trainer(eight, progress=False).preflight()
    assert (pre.world_size, pre.accumulation) == (8, 8)
    monkeypatch.delenv("WORLD_SIZE")
    for overrides, match in [
        (["algorithm.sde_window_range=[4,8]"], "last cps step"),
        (["algorithm.sde_window_size=5"], "does not fit"),
        (["algorithm.kl_beta=0.01", "model.finetune=full"], "LoRA policy"),
        (["algorithm.cfg=true", "sampling.guidance_scale=1.0"], "guidance_scale > 1"),
        (["algorithm.noise_level=0"], "noise_level must be > 0"),
        (["algorithm.reward_weights={pickscore: 1.0}"], "unknown components"),
        (["train.batch_size=6"], "not a multiple of algorithm.group_size"),
        (["algorithm.num_batches_per_epoch=3", "train.gradient_accumulation_steps=2"], "multiple of the gradient"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate(*overrides)


# ----------------------------------------------------------------------------- the real training path


def _check_group_sampler(trainer) -> None:
    from dinalrm_align.trainer.grouping import KRepeatSampler

    assert isinstance(trainer.data, KRepeatSampler), type(trainer.data)


@pytest.mark.parametrize("cfg", [False, True])
def test_ratio_one_kl_zero_and_logged_metrics(tmp_path, cfg):
    """One optimizer step per epoch (2 chunks, accumulation 2), chunks = rollout batches: every ratio is 1
    within 1e-5 (recomputed log-probs == stored ones), with and without CFG in training, and the KL to the
    LoRA-disabled policy is exactly 0 while the LoRA is zero (gaussian init: lora_B = 0)."""
    trainer = make_trainer(
        tmp_path, *FAST,
        "algorithm.num_batches_per_epoch=2", "train.gradient_accumulation_steps=2", "algorithm.shuffle_chunks=false",
        "algorithm.kl_beta=0.004", "algorithm.clip_range=1.0e-5", f"algorithm.cfg={str(cfg).lower()}",
        "algorithm.extra_rewards=[{name: brightness, target: 'test_grpo:brightness', inputs: images}, "
        "{name: latent_norm, target: 'test_grpo:LatentNorm', factory: true}]",
        "algorithm.reward_weights={dina_lrm: 1.0, brightness: 0.2}",
    )
    trainer.setup()
    _check_group_sampler(trainer)
    algo = trainer.algorithm
    m1 = update(trainer)
    assert abs(m1["train/ratio_min"] - 1) < 1e-5 and abs(m1["train/ratio_max"] - 1) < 1e-5
    assert m1["train/approx_kl"] < 1e-10 and m1["train/clipfrac"] == 0.0
    assert m1["train/kl_loss"] == 0.0
    for key in (
        "reward_dina_lrm_mean", "reward_dina_lrm_std", "reward_brightness_mean", "reward_brightness_std",
        "reward_latent_norm_mean", "reward_latent_norm_std",
        "reward_raw_mean", "reward_weighted_mean", "zero_std_ratio", "group_size", "samples_per_s", "policy_loss",
        "kl_loss", "kept_fraction", "advantage_abs_mean", "rollout_time_s", "chunk_size", "ratio_min", "ratio_max",
        "approx_kl", "clipfrac", "ratio_mean", "loss",
    ):
        assert f"train/{key}" in m1, key
    assert m1["train/group_size"] == 4.0 and 0.0 <= m1["train/reward_brightness_mean"] <= 1.0
    roll = algo.last_rollout
    assert roll["windows"] and all(0 <= w <= 1 for w in roll["windows"])  # window of 1 step in [0, 2)
    assert sorted(set(roll["group_ids"].tolist())) and roll["components"]["brightness"].shape == (8,)
    for _ in range(2):
        m = update(trainer)
        assert abs(m["train/ratio_mean"] - 1) < 1e-5  # still on-policy: one update per epoch
    assert m["train/kl_loss"] > 0  # the LoRA moved away from zero
    with torch.no_grad():
        for name, p in trainer.algorithm.ctx.transformer.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert update(trainer)["train/kl_loss"] == 0.0


@pytest.mark.slow
def test_reward_rises_over_a_short_run(tmp_path):
    trainer = make_trainer(
        tmp_path, "sampling.resolution=32", "sampling.num_steps=6", "algorithm.sde_window_range=[0,3]",
        "eval.num_steps=6", "eval.every=0", "checkpoint.every=0", "train.batch_size=4", "train.max_steps=16",
        "algorithm.kl_beta=0.0",
    )
    trainer.setup()
    _check_group_sampler(trainer)
    summary = trainer.train()
    before, after = summary.eval_before["eval/reward_raw"], summary.eval_after["eval/reward_raw"]
    assert after > before + 0.02, (before, after)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/reward_raw_mean"] for r in rows if "train/reward_raw_mean" in r]
    assert sum(train[-4:]) / 4 > sum(train[:4]) / 4


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timing / memory columns (they differ between runs)."""
    timing = ("perf/", "train/samples_per_s", "train/rollout_time_s")
    return [{k: v for k, v in r.items() if not k.startswith(timing)} for r in
            (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_resume_equals_uninterrupted(tmp_path):
    """4 updates = 2 epochs of 2 updates; resuming the mid-epoch checkpoint (its remaining rollouts are
    in the algorithm state) and the epoch-boundary checkpoint both reproduce the final weights and the
    metrics rows bit for bit."""
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    common = [
        *FAST, "train.max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=4", "eval.at_end=true",
        "algorithm.sde_type=sde", "algorithm.noise_level=0.7",
    ]
    full = make_trainer(tmp_path / "full", *common)
    full.setup()
    _check_group_sampler(full)
    full.train()
    expected = load_file(str(tmp_path / "full" / "final" / "pytorch_lora_weights.safetensors"))
    expected_rows = _rows(tmp_path / "full")
    assert [r["step"] for r in expected_rows] == [1, 2, 3, 4, 4]  # 4 updates and the final evaluation
    for step in (3, 2):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        ckpt = tmp_path / "full" / "checkpoints" / f"step_{step:06d}"
        resumed = make_trainer(tmp_path / f"resumed{step}", *common, f"checkpoint.resume={ckpt}")
        resumed.setup()
        assert resumed.step == step and (resumed.algorithm.buffer is not None) == (step == 3)
        resumed.train()
        got = load_file(str(tmp_path / f"resumed{step}" / "final" / "pytorch_lora_weights.safetensors"))
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        assert _rows(tmp_path / f"resumed{step}") == [r for r in expected_rows if r["step"] > step]


# ----------------------------------------------------------------------------- fidelity


def _kl_setup(tmp_path, *overrides: str):
    """A GRPO trainer after one rollout epoch, with a random LoRA (policy != reference); returns
    ``(trainer, chunk)`` where ``chunk`` is the epoch's untrained second chunk (rollout batch 1)."""
    trainer = make_trainer(
        tmp_path, *FAST, "algorithm.sde_type=sde", "algorithm.noise_level=0.7", "algorithm.sde_window_range=[1,3]",
        "algorithm.shuffle_chunks=false", "algorithm.kl_beta=0.5", "train.max_steps=1", *overrides,
    )
    trainer.setup()
    algo = trainer.algorithm
    algo.train_step(trainer.data.next_batch())  # rolls out the epoch and trains chunk 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in algo.ctx.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    trainer.optimizer.zero_grad(set_to_none=True)
    (chunk,) = algo.buffer.chunks
    return trainer, chunk


def test_kl_forms_equal_a_hand_computation(tmp_path):
    """``kl_form: flow_grpo`` is ``mean((mu - mu_ref)^2) / (2 std_t^2)`` with ``std_t = a sqrt(s / (1 - s))``;
    ``transition`` divides by the step's variance ``std_t^2 (-dt)``: the two differ by the factor ``-dt``."""
    from dinalrm_align.sampling.rollout import Denoiser

    trainer, chunk = _kl_setup(tmp_path)
    algo, ctx = trainer.algorithm, trainer.algorithm.ctx
    assert algo.config.kl_form == "flow_grpo"  # the default
    buf = algo.buffer
    idx = chunk.to(buf.latents.device)
    x_t, sig, cond = buf.latents[idx][:, 0], buf.sigmas[idx], buf.cond[buf.embed_index[idx]]
    s, s_next = sig[:, 0].double(), sig[:, 1].double()
    assert bool((s == s[0]).all()) and 0 < float(s[0]) < 1  # one rollout batch: one window, sigma < 1
    flow = algo._train_chunk(ctx, chunk)["kl_loss"]
    algo.config.kl_form = "transition"
    transition = algo._train_chunk(ctx, chunk)["kl_loss"]
    trainer.optimizer.zero_grad(set_to_none=True)
    den = Denoiser(ctx.adapter, ctx.transformer)
    with torch.no_grad():
        v = den(x_t, s.float(), cond).double()
        ctx.transformer.disable_adapters()
        v_ref = den(x_t, s.float(), cond).double()
        ctx.transformer.enable_adapters()
    a = 0.7
    std_t = a * torch.sqrt(s / (1 - s)).view(-1, 1, 1, 1)
    dt = (s_next - s).view(-1, 1, 1, 1)
    # the SDE mean is x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt: only v differs
    mu_minus_ref = (v - v_ref) * (1 + std_t**2 * (1 - s.view(-1, 1, 1, 1)) / (2 * s.view(-1, 1, 1, 1))) * dt
    hand = (mu_minus_ref**2 / (2 * std_t**2)).mean()
    assert float(hand) > 1e-8  # the random LoRA moves the mean
    torch.testing.assert_close(flow.double(), hand, rtol=1e-4, atol=0)
    torch.testing.assert_close(flow.double(), transition.double() * float(-dt[0]), rtol=1e-5, atol=0)


def test_detach_uncond_is_respected_in_training(tmp_path):
    """With CFG in training, ``detach_uncond: false`` (the default) back-propagates through the unconditional
    branch too: the gradients differ from the detached ones on the same chunk."""
    trainer, chunk = _kl_setup(tmp_path, "algorithm.cfg=true")
    algo, ctx = trainer.algorithm, trainer.algorithm.ctx
    assert algo.config.detach_uncond is False

    def grads() -> dict[str, torch.Tensor]:
        trainer.optimizer.zero_grad(set_to_none=True)
        algo._train_chunk(ctx, chunk)
        return {n: p.grad.clone() for n, p in ctx.transformer.named_parameters() if p.grad is not None}

    both, again = grads(), grads()
    algo.config.detach_uncond = True
    detached = grads()
    assert both and both.keys() == detached.keys()
    for name in both:
        torch.testing.assert_close(again[name], both[name])  # deterministic on the stored chunk
    assert any(not torch.allclose(both[n], detached[n], rtol=1e-3, atol=1e-9) for n in both)


def test_train_step_returns_device_tensors(tmp_path, monkeypatch):
    """The rollout chunk and a training-only chunk return loss / reward metrics as device tensors; the
    training-only chunk makes no ``.item()`` call."""
    trainer = make_trainer(tmp_path, *FAST, "algorithm.kl_beta=0.004", "train.max_steps=1")
    trainer.setup()
    algo = trainer.algorithm
    first = algo.train_step(trainer.data.next_batch())  # the epoch's rollouts + chunk 0

    def no_sync(self, *args, **kwargs):
        raise AssertionError("train_step called Tensor.item() (a host synchronisation)")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    second = algo.train_step(trainer.data.next_batch())  # [] from the sampler: chunk 1 of the same epoch
    monkeypatch.undo()
    for metrics in (first, second):
        for key in ("loss", "policy_loss", "kl_loss", "reward_raw_mean", "reward_dina_lrm_mean", "advantage_abs_mean"):
            value = metrics[key]
            assert torch.is_tensor(value) and not isinstance(value, float), (key, type(value))
            assert value.device == trainer.accelerator.device and not value.requires_grad
    assert algo.buffer is None  # both chunks trained
