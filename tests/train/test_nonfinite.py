"""Non-finite losses in a real 2-worker Ray Train pretraining run: skipped steps leave the optimizer alone,
a run of them rolls every rank back to the last checkpoint, and past the bound the run stops naming the
step and the batch's videos.

The non-finite loss comes from the objective (a NaN on rank 0 only, at chosen calls), since nothing in
a healthy tiny model on generated video produces one on cue; everything else is the real loop.
"""

from __future__ import annotations

import base64
import sys
from collections import Counter

import numpy as np
import pytest
import ray.cloudpickle
import ray.train
import torch
from helpers.runs import tiny_config
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.data.resume import Consumption, read_audit
from pipeline.train import checkpointing
from pipeline.train import pretrain as pretrain_job
from pipeline.train.nonfinite import NonFiniteGuard, NonFiniteTraining

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module


class NaNOnRankZero(pretrain_job.PretrainObjective):
    """The real objective, whose loss on rank 0 is NaN at the given (1-based) calls; rank 1 stays finite,
    so only the all-reduced decision can keep the ranks in step."""

    bad_calls: frozenset[int] = frozenset()

    def __init__(self) -> None:
        self.calls = 0

    def loss(self, model, batch, pixel_values, *, rank, step, micro):
        loss, extra = super().loss(model, batch, pixel_values, rank=rank, step=step, micro=micro)
        self.calls += 1
        if rank == 0 and self.calls in self.bad_calls:
            loss = loss * float("nan")
        return loss, extra


def _run(monkeypatch, tmp_path, sample_videos, bad_calls: set[int], **overrides: str):
    objective = type("Objective", (NaNOnRankZero,), {"bad_calls": frozenset(bad_calls)})
    monkeypatch.setattr(pretrain_job, "PretrainObjective", objective)
    sets = {"train.max_steps": "10", "checkpoint.every_steps": "2", "checkpoint.keep_last": "10",
            "train.max_nonfinite_in_a_row": "2", "train.max_nonfinite_rollbacks": "1",
            "scaling.max_failures": "0", "data.max_error_fraction": "0.05", **overrides}
    return pretrain_job.run_pretrain(tiny_config(tmp_path, str(sample_videos), **sets))


def test_skipped_steps_and_a_rollback_end_the_run_at_its_planned_step(
    ray_session, sample_videos, tmp_path, monkeypatch
):
    # call 3 = step 3 (one skip); calls 6, 7 = steps 6, 7: two in a row, back to the checkpoint of step 4.
    # Epochs of 6 videos (3 steps): the rollback at step 7 (epoch 2's first) goes back to step 4 (epoch 1)
    audit = tmp_path / "audit"
    audit.mkdir()
    result = _run(monkeypatch, tmp_path, sample_videos, {3, 6, 7}, **{"data.epoch_videos": "6",
                                                                      "train.audit_dir": str(audit)})
    assert result.final_step == 10
    run_dir = tmp_path / "runs" / "kill-test"
    state = torch.load(run_dir / "checkpoint_00000010" / checkpointing.TRAIN_STATE, weights_only=True)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    # applied: steps 1, 2, 4 before the rollback (the checkpoint of step 4 holds 3), then 5..10
    assert adam_steps == {3 + 6}, adam_steps
    weights = load_file(run_dir / "checkpoint_00000010" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # step 6 was saved after the rollback (3 + steps 5, 6), not inside the run of non-finite steps (4)
    redone = torch.load(run_dir / "checkpoint_00000006" / checkpointing.TRAIN_STATE, weights_only=True)
    assert {int(s["step"]) for s in redone["optimizer"]["state"].values()} == {5}
    metrics = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    assert metrics["nonfinite_steps"] == 3 and metrics["nonfinite_rollbacks"] == 1
    # the data position stayed the pass's: the checkpoint after the rollback holds epoch 2 and the videos
    # of epoch 2 trained so far (the checkpoint of step 4 had epoch 1's), so no epoch mixes another's
    progress = checkpointing.read_progress(run_dir / "checkpoint_00000006")
    assert (progress.epoch, progress.step_in_epoch) == (2, 3)
    clips = Counter(r.position for r in read_audit(str(audit)) if r.epoch == 2)
    done = Consumption.unpack(base64.b64decode(progress.epoch_done))
    assert set(np.flatnonzero(done).tolist()) == {p for p, n in clips.items() if n == 2}


def test_non_finite_steps_past_the_bound_stop_the_run_naming_step_and_videos(
    ray_session, sample_videos, tmp_path, monkeypatch
):
    # under fp16 autocast with GradScaler (on CPU here): the rollback also halves the loss scale
    with pytest.raises(Exception) as failed:
        _run(monkeypatch, tmp_path, sample_videos, set(range(5, 100)), **{"train.precision": "fp16"})
    message = str(failed.value)
    # steps 5, 6 -> rollback to step 4 -> steps 5, 6 again -> the bound of one rollback is passed
    assert "step 6: 2 steps in a row had a non-finite loss or gradient, after 1 rollback(s)" in message
    assert "last batch (its own loss " in message and ".mp4" in message  # a rank's batch and its videos
    run_dir = tmp_path / "runs" / "kill-test"
    assert checkpointing.torn_reason(run_dir / "checkpoint_00000004") is None  # the last good one, whole
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test-train").experiment_id])
    before = client.get_metric_history(run.info.run_id, "rollback/checkpoint_loss_scale")
    after = client.get_metric_history(run.info.run_id, "rollback/loss_scale")
    assert [m.step for m in after] == [4] and after[0].value == before[0].value / 2


def test_the_guard_counts_and_decides():
    guard = NonFiniteGuard(in_a_row=2, rollbacks=1)
    assert guard.check(torch.tensor(1.0), torch.tensor(3.0)) == (True, True)
    assert guard.check(torch.tensor(float("nan")), torch.tensor(3.0)) == (False, True)
    assert guard.check(torch.tensor(1.0), torch.tensor(float("inf"))) == (True, False)  # fp16: an overflow
    assert guard.skipped(5, ["a.mp4"]) == "skip"
    guard.stepped()
    assert guard.skipped(7, ["a.mp4"]) == "skip" and guard.skipped(8, ["a.mp4"]) == "rollback"
    assert guard.skipped(9, ["b.mp4"]) == "skip"
    with pytest.raises(NonFiniteTraining, match=r"step 10: 2 steps .* 1 rollback\(s\).* held b.mp4, c.mp4"):
        guard.skipped(10, ["c.mp4", "b.mp4"])
    assert guard.total == 5
