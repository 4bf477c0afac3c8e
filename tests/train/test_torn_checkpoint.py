"""A checkpoint cut off in its upload is never resumed from: a rerun takes the complete one before it,
reports and removes the torn one, and still ends at the planned step (real Ray Train)."""

from __future__ import annotations

import pytest
from helpers.runs import tiny_config
from mlflow.tracking import MlflowClient

from pipeline.train import checkpointing
from pipeline.train.pretrain import run_pretrain

pytestmark = pytest.mark.integration


def test_a_torn_last_checkpoint_is_passed_over_reported_and_removed(ray_session, sample_videos, tmp_path):
    sets = {"run_name": "torn", "train.max_steps": "6", "checkpoint.every_steps": "3",
            "checkpoint.keep_last": "3", "train.log_every_steps": "1", "scaling.num_workers": "1"}
    cfg = tiny_config(tmp_path, str(sample_videos), **sets)
    first = run_pretrain(cfg)
    assert first.final_step == 6
    run_dir = tmp_path / "runs" / "torn"
    last = run_dir / "checkpoint_00000006" / "model.safetensors"
    size = last.stat().st_size
    with open(last, "r+b") as f:  # the upload stopped halfway through the weights
        f.truncate(size // 3)
    assert checkpointing.torn_reason(last.parent) == f"model.safetensors has {size // 3} of {size} bytes"

    again = run_pretrain(cfg)  # the same run name: Ray Train hands over checkpoint 6, which is torn
    assert again.start_step == 3 and again.final_step == 6
    assert checkpointing.torn_reason(last.parent) is None  # step 6 trained again and saved whole
    history = MlflowClient(again.tracking_uri).get_metric_history(again.mlflow_run_id, "torn_checkpoints")
    assert max(m.value for m in history) == 1
