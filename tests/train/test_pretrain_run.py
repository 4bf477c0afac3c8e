"""A real 2-worker Ray Train pretraining run on real video files, some of them broken.

One run (a module fixture: a run costs tens of seconds here) serves several tests, each one concern: a
chaos loop SIGKILLs a random training worker after each of the first checkpoints and Ray Train restarts
the group from the last one each time; the run ends at exactly the planned step; every epoch trains on each
video once (but those in flight at a checkpoint); bad videos are counted and reported; MLflow (local store)
holds params, metrics and artifacts; the exported model loads. Failing inputs fail before any worker starts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.runs import (
    committed_checkpoint,
    data_with_broken_videos,
    pretrain_in_thread,
    tiny_config,
    train_worker_pids,
)
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from pipeline.data.labels import LabelError
from pipeline.models.videomae import VideoMAEForPreTraining
from pipeline.storage import StorageError
from pipeline.train import checkpointing
from pipeline.train.pretrain import main, run_pretrain

pytestmark = pytest.mark.integration


@dataclass
class ChaosRun:
    result: Any
    run_dir: Path
    data: Path
    consumed: Path
    killed: list[int]


@pytest.fixture(scope="module")
def chaos_run(ray_session, sample_videos, tmp_path_factory) -> ChaosRun:
    """The run every test below reads: a random training worker SIGKILLed after each of the first two
    checkpoints (a few seconds apart), bad videos in the data, the kNN monitor on, every clip audited."""
    tmp_path = tmp_path_factory.mktemp("chaos")
    data = data_with_broken_videos(sample_videos, tmp_path)
    consumed = tmp_path / "consumed"  # every trained clip's (epoch, position), by the workers
    consumed.mkdir()
    probe = {"probe.every_steps": "6", "probe.data.uri": str(sample_videos),
             "probe.data.decode_isolation": "inline", "train.audit_dir": str(consumed)}
    thread, outcome = pretrain_in_thread(tiny_config(tmp_path, str(data), **probe))
    run_dir = tmp_path / "runs" / "kill-test"
    rng, killed, killed_after = random.Random(0), [], set()
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline and len(killed) < 2:
        committed = committed_checkpoint(run_dir)
        if committed and committed not in killed_after:
            pids = train_worker_pids()
            if pids:
                killed.append(rng.choice(pids))
                killed_after.add(committed)
                os.kill(killed[-1], signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return ChaosRun(outcome["result"], run_dir, data, consumed, killed)


def test_killed_workers_resume_to_exactly_the_planned_step(chaos_run):
    result, run_dir = chaos_run.result, chaos_run.run_dir
    assert len(chaos_run.killed) >= 2, f"the run finished after {len(chaos_run.killed)} kill(s)"
    assert result.final_step == 12
    assert result.start_step >= 3, result.metrics  # the last attempt resumed rather than restarted
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000009", "checkpoint_00000012"]  # keep_last=2
    assert all(checkpointing.torn_reason(run_dir / name) is None for name in kept)  # none torn
    progress = checkpointing.read_progress(run_dir / "checkpoint_00000012")
    assert progress.step == 12 and progress.clips_seen == 12 * 4


def test_the_interrupted_epoch_continues_with_the_videos_it_had_not_trained_on(chaos_run):
    # the run's lineage is, per step, what the last attempt that trained that step trained (steps after
    # the checkpoint it resumed from were trained again)
    attempts = []
    for f in chaos_run.consumed.glob("consumed-*.txt"):
        records = [tuple(map(int, line.split()[:3])) for line in f.read_text().splitlines()]
        attempts.append((min(r[0] for r in records), records))
    starts = sorted({first for first, _ in attempts})
    assert len(starts) >= 2, "the audit shows no restart"
    lineage = Counter()
    for first, records in attempts:
        after = next((s for s in starts if s > first), None)  # the next attempt took over from there
        lineage.update(p for step, e, p in records if e == 0 and (after is None or step < after))
    good = len(list(chaos_run.data.glob("good_*.mp4")))
    # every readable video of the epoch (but a last partial batch per worker: drop_last) ...
    assert good - 2 <= len(lineage) <= good, sorted(lineage)
    # ... each once (both clips), except videos in flight at a checkpoint: a clip trained before it and
    # both again after (at most one per rank and restart: 2 clips per video = 1 batch)
    again = {p: n for p, n in lineage.items() if n != 2}
    assert len(again) <= 2 * (len(starts) - 1) and all(n in (3, 4) for n in again.values()), lineage


def test_bad_videos_are_counted_by_reason_and_reported(chaos_run):
    report = [json.loads(line) for line in Path(chaos_run.result.error_report_uri).read_text().splitlines()]
    assert {Path(e["uri"]).name for e in report} >= {"random_bytes.mp4", "empty.mp4", "truncated.mp4"}
    assert "empty" in {e["reason"] for e in report}


def test_the_exported_model_loads(chaos_run):
    model = VideoMAEForPreTraining.from_pretrained(chaos_run.result.export_uri)
    assert model.config.hidden_size == 64


def test_mlflow_holds_one_run_with_params_metrics_and_artifacts_through_the_restarts(chaos_run):
    result = chaos_run.result
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("test-train")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert run.data.params["train.batch_size"] == "2" and run.data.params["schedule.total_steps"] == "12"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(run.data.params)
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(loss_steps) == 12 and 2 in loss_steps
    for name in ("lr", "clips_per_s", "data_wait_fraction", "data/errors"):
        assert name in run.data.metrics, name
    assert run.data.metrics["data/errors_total"] >= 3
    assert any(k.startswith("data/errors_total/") for k in run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)
    artifacts = {a.path for top in ("config", "data", "model", "reconstructions")
                 for a in client.list_artifacts(run.info.run_id, top)}
    assert {"config/resolved_config.yaml", "data/data_errors.jsonl", "model/model.safetensors"} <= artifacts
    assert any(a.startswith("reconstructions/") and a.endswith(".png") for a in artifacts)


def test_the_knn_monitor_scores_the_random_init_every_six_steps_and_the_end(chaos_run):
    result = chaos_run.result
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    probe_steps = {m.step for m in client.get_metric_history(run.info.run_id, "probe/knn_top1")}
    assert probe_steps == {0, 6, 12}
    assert [step for step, _ in result.probe_knn_top1] == [0, 6, 12]
    assert all(0.0 <= top1 <= 1.0 for _, top1 in result.probe_knn_top1) and result.probe_chance == 1 / 8
    assert run.data.metrics["probe/bank_videos"] == 8 and run.data.metrics["probe/query_videos"] == 8
    assert "frozen-feature kNN top-1" in result.summary()


def test_bad_inputs_fail_before_any_worker_starts(tmp_path, s3_endpoint, sample_videos, capsys):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here'"):
        run_pretrain(tiny_config(tmp_path, str(tmp_path), storage_path="s3://no-such-bucket-here/runs"))
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        run_pretrain(tiny_config(tmp_path, str(tmp_path), storage_path="gs://bucket/runs"))
    with pytest.raises(StorageError, match="no-such-folder"):
        run_pretrain(tiny_config(tmp_path, str(tmp_path / "no-such-folder")))
    (tmp_path / "unlabeled").mkdir()
    (tmp_path / "unlabeled" / "a.mp4").write_bytes(b"a folder of videos has no labels")
    unlabeled = {"probe.every_steps": "5", "probe.data.uri": str(tmp_path / "unlabeled")}
    with pytest.raises(LabelError, match="probe train split have no label"):
        run_pretrain(tiny_config(tmp_path, str(sample_videos), **unlabeled))
    # the MLflow run opens before Ray Train starts (driver.session): no store, no worker started
    assert not (tmp_path / "mlflow.db").exists()

    assert main(["--set", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    assert main(["--set", "model.num_attention_heads=3"]) == 2
    assert "not divisible by num_attention_heads 3" in capsys.readouterr().err
    assert main(["--set", "data.mask_ratio=1.5"]) == 2
    assert "data.mask_ratio must lie in (0, 1)" in capsys.readouterr().err


def test_too_few_videos_for_one_batch_is_a_config_error(tmp_path, sample_videos):
    cfg = tiny_config(tmp_path, str(sample_videos), **{"data.limit": "3", "train.batch_size": "4"})
    with pytest.raises(ConfigError, match="fewer than one global batch of 8"):
        run_pretrain(cfg)
