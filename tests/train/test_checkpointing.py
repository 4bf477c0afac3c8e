"""Checkpoint save/restore round trip (no Ray): model, optimizer, schedule, scaler, progress, RNG; export."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining
from pipeline.train import checkpointing as ckpt
from pipeline.train.optim import WarmupCosine, build_adamw


def _setup():
    model = VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny"))
    opt = build_adamw(model, 1e-3, 0.05, (0.9, 0.95))
    sched = WarmupCosine(opt, total_steps=20, warmup_steps=2, peak_lr=1e-3, min_lr=1e-5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler


def _train_step(model, opt, sched):
    x = torch.randn(2, 4, 3, 32, 32)
    mask = torch.zeros(2, model.config.num_patches, dtype=torch.bool)
    mask[:, ::2] = True
    model(x, mask).loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model, opt, sched, scaler = _setup()
    for _ in range(3):
        _train_step(model, opt, sched)
    progress = ckpt.Progress(step=3, epoch=1, step_in_epoch=1, clips_seen=6, world_size=1)
    ckpt.seed_everything(123)
    ckpt.save(tmp_path, rank=0, model=model, optimizer=opt, scheduler=sched, scaler=scaler, progress=progress,
              job_config_yaml="run_name: x\n")
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(99)
    model2, opt2, sched2, scaler2 = _setup()
    restored = ckpt.load(tmp_path, rank=0, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert restored == progress
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert sched2.step_count == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert scaler2.get_scale() == 1024.0
    draws = (torch.rand(3), np.random.rand(3), random.random())  # RNG continues where it was saved
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]
    assert (tmp_path / ckpt.JOB_CONFIG).read_text() == "run_name: x\n"
    # training continues identically from the restored state
    torch.manual_seed(5)
    _train_step(model, opt, sched)
    torch.manual_seed(5)
    _train_step(model2, opt2, sched2)
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_checkpoint_is_a_model_directory_and_exports(tmp_path):
    model, opt, sched, scaler = _setup()
    ckpt.save(tmp_path / "c", rank=0, model=model, optimizer=opt, scheduler=sched, scaler=None,
              progress=ckpt.Progress(), job_config_yaml="")
    loaded = VideoMAEForPreTraining.from_pretrained(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                   strict=True))
    out = ckpt.export_model(tmp_path / "c", str(tmp_path / "export"))
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert VideoMAEForPreTraining.from_pretrained(out).config.hidden_size == 64


def test_a_torn_checkpoint_is_found_and_refused(tmp_path):
    """A checkpoint whose upload stopped: a file missing (S3) or cut short (a local copy)."""
    model, opt, sched, scaler = _setup()
    whole = tmp_path / "checkpoint_00000010"
    ckpt.save(whole, rank=0, model=model, optimizer=opt, scheduler=sched, scaler=None,
              progress=ckpt.Progress(step=10), job_config_yaml="a: 1\n")
    assert ckpt.torn_reason(whole) is None
    manifest = json.loads((whole / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 10 and set(manifest["files"]) == {"config.json", "model.safetensors",
                                                                  "train_state.pt", "job_config.yaml"}
    short = tmp_path / "short"
    shutil.copytree(whole, short)
    size = (short / "model.safetensors").stat().st_size
    with open(short / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    assert ckpt.torn_reason(short) == f"model.safetensors has {size // 2} of {size} bytes"
    with pytest.raises(ckpt.TornCheckpoint, match="short is torn: model.safetensors has"):
        ckpt.load(short, rank=0, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    missing = tmp_path / "missing"
    shutil.copytree(whole, missing)
    (missing / "train_state.pt").unlink()
    assert ckpt.torn_reason(missing) == "missing train_state.pt"
    (missing / ckpt.MANIFEST).unlink()  # the manifest itself had not arrived
    assert ckpt.torn_reason(missing) == "missing train_state.pt"
    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(whole, no_manifest)
    (no_manifest / ckpt.MANIFEST).unlink()
    assert ckpt.torn_reason(no_manifest) == "no checkpoint.json"
    names = ("a", "checkpoint_00000010", "checkpoint_12")
    assert [ckpt.checkpoint_step(name) for name in names] == [None, 10, None]
    assert ckpt.checkpoints_in(str(tmp_path)) == [(10, str(whole))]
