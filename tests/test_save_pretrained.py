"""``LatentRewardModel.save_pretrained``: only its own files change, other checkpoints are refused, atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinalrm_align import LatentRewardModel
from dinalrm_align.reward_model import checkpoint as ckpt
from dinalrm_align.tiny import tiny_reward_model


def _latents(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 16, 32, 32, generator=torch.Generator().manual_seed(seed))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _scores(rm: LatentRewardModel, text) -> torch.Tensor:
    _, pe, pooled = text
    return rm.score(_latents(4, 1), prompt_embeds=pe, pooled_prompt_embeds=pooled, noise=_latents(4, 2))


def _no_temp_left(root: Path) -> bool:
    return not [p for p in root.rglob(".dinalrm-save-*")]


def _user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes")
    (folder / "report.json").write_text(json.dumps({"accuracy": 0.71}))
    (folder / "plots").mkdir()
    (folder / "plots" / "reliability.png").write_bytes(b"\x89PNG fake")
    return _snapshot(folder)


def test_save_keeps_files_it_did_not_write(tmp_path, tiny_pipe, tiny_rm, tiny_text):
    folder = tmp_path / "rm"
    before = _user_files(folder)
    tiny_rm.save_pretrained(folder)
    after = _snapshot(folder)
    assert {k: after[k] for k in before} == before  # untouched, byte for byte
    assert {"config.json", "checkpoint/rm_head.safetensors",
            "checkpoint/backbone_lora/adapter_model.safetensors"} <= set(after)
    loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    torch.testing.assert_close(_scores(loaded, tiny_text), _scores(tiny_rm, tiny_text), atol=0, rtol=0)
    assert _no_temp_left(tmp_path)


def test_save_over_previous_save_replaces_only_its_files(tmp_path, tiny_pipe, tiny_text):
    folder = tmp_path / "rm"
    first = tiny_reward_model(tiny_pipe.transformer, seed=1)
    first.save_pretrained(folder)
    (folder / "checkpoint" / "backbone_lora" / "README.md").write_text("adapter card")  # e.g. written by PEFT tools
    (folder / "eval.txt").write_text("acc 0.7")
    second = tiny_reward_model(tiny_pipe.transformer, seed=2)
    second.save_pretrained(folder)
    loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    torch.testing.assert_close(_scores(loaded, tiny_text), _scores(second, tiny_text), atol=0, rtol=0)
    assert not torch.allclose(_scores(first, tiny_text), _scores(second, tiny_text))
    assert (folder / "eval.txt").read_text() == "acc 0.7"
    assert (folder / "checkpoint" / "backbone_lora" / "README.md").read_text() == "adapter card"
    # a head-only model over the LoRA save: the now stale adapter weights of the layout go, the card stays
    head_only = tiny_reward_model(tiny_pipe.transformer, seed=3, use_lora=False, freeze_backbone=True)
    head_only.save_pretrained(folder)
    assert not (folder / "checkpoint" / "backbone_lora" / "adapter_model.safetensors").exists()
    assert (folder / "checkpoint" / "backbone_lora" / "README.md").is_file()
    loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    torch.testing.assert_close(_scores(loaded, tiny_text), _scores(head_only, tiny_text), atol=0, rtol=0)
    assert _no_temp_left(tmp_path)


def _diffusers_pipeline(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def _diffusers_model(tmp_path, pipe):
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    return tmp_path / "transformer"


def _training_run(tmp_path, pipe):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    (run / "checkpoints" / "step_000010" / "weights.safetensors").write_bytes(b"x")
    (run / "train.log").write_text("step 10")
    return run


def _peft_adapter(tmp_path, pipe):
    from peft import LoraConfig

    folder = tmp_path / "adapter"
    LoraConfig(r=4, target_modules=["to_q"]).save_pretrained(str(folder))
    (folder / "adapter_model.safetensors").write_bytes(b"not ours")
    return folder


def _other_weights(tmp_path, pipe):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights of something else")
    return folder


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_diffusers_pipeline, "diffusers pipeline"),
        (_diffusers_model, "not a reward-model config"),
        (_training_run, "training run"),
        (_peft_adapter, "PEFT adapter"),
        (_other_weights, "model.safetensors"),
    ],
)
def test_foreign_checkpoint_is_refused_unless_overwrite(tmp_path, tiny_pipe, tiny_rm, tiny_text, make, why):
    folder = make(tmp_path, tiny_pipe)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=why) as info:
        tiny_rm.save_pretrained(folder)
    assert "overwrite=True" in str(info.value)
    assert _snapshot(folder) == before and _no_temp_left(tmp_path)
    ckpt.save_model(tiny_rm, folder, overwrite=True)
    after = _snapshot(folder)
    kept = {k: v for k, v in before.items() if k != "config.json"}
    assert {k: after[k] for k in kept} == kept  # overwrite replaces only config.json and checkpoint/
    loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    torch.testing.assert_close(_scores(loaded, tiny_text), _scores(tiny_rm, tiny_text), atol=0, rtol=0)


def test_failed_save_leaves_the_folder_as_it_was(tmp_path, tiny_pipe, tiny_rm, tiny_text, monkeypatch):
    folder = tmp_path / "rm"
    old = tiny_reward_model(tiny_pipe.transformer, seed=7)
    old.save_pretrained(folder)
    (folder / "notes.md").write_text("keep")
    before = _snapshot(folder)
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        tiny_rm.save_pretrained(folder)
    with pytest.raises(OSError, match="No space"):
        tiny_rm.save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    assert _snapshot(folder) == before and not (tmp_path / "new").exists() and _no_temp_left(tmp_path)
    loaded = LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    torch.testing.assert_close(_scores(loaded, tiny_text), _scores(old, tiny_text), atol=0, rtol=0)


def test_save_into_empty_new_or_file_target(tmp_path, tiny_pipe, tiny_rm):
    (tmp_path / "empty").mkdir()
    tiny_rm.save_pretrained(tmp_path / "empty")
    tiny_rm.save_pretrained(tmp_path / "a" / "b" / "new")
    for folder in (tmp_path / "empty", tmp_path / "a" / "b" / "new"):
        assert (folder / "config.json").is_file() and (folder / "checkpoint" / "rm_head.safetensors").is_file()
        LatentRewardModel.from_pretrained(folder, transformer=tiny_pipe.transformer)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        tiny_rm.save_pretrained(tmp_path / "file")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoint").write_text("a file where the weights folder goes")
    with pytest.raises(ValueError, match="in the way"):
        tiny_rm.save_pretrained(blocked)
    assert (blocked / "checkpoint").read_text().startswith("a file") and not (blocked / "config.json").exists()
    assert _no_temp_left(tmp_path)


def test_saved_folder_has_the_permissions_of_a_plain_mkdir(tmp_path, tiny_rm):
    """The folder is staged with mkdtemp (private, 0700) and renamed into place: it must come out readable."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder = tiny_rm.save_pretrained(tmp_path / "rm")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
