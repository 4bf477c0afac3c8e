"""Epochs on real collections and real runs, end to end with real Ray, real video files and MLflow: a
short epoch (unreadable videos) ends where its data ends, a job stopped right after such an epoch's last
checkpoint resumes, a job killed mid-epoch and resubmitted trains exactly the clips not yet trained, and
an uneven elastic group trains its whole epoch. The invariants behind them, over every case, are in
test_epoch_invariants.py."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.runs import committed_checkpoint, pretrain_in_thread, tiny_config, train_worker_pids
from mlflow.tracking import MlflowClient

from pipeline.data.resume import AuditRecord, read_audit
from pipeline.train import checkpointing
from pipeline.train import finetune as finetune_job
from pipeline.train import pretrain as pretrain_job

pytestmark = pytest.mark.integration


def with_broken(folder: Path, good: list[Path]) -> list[Path]:
    """``good`` copied into ``folder`` as good_NN.mp4, and two unreadable videos beside them."""
    folder.mkdir(parents=True)
    out = []
    for i, path in enumerate(good):
        out.append(folder / f"good_{i:02d}.mp4")
        shutil.copy(path, out[-1])
    (folder / "random_bytes.mp4").write_bytes(os.urandom(4096))
    (folder / "truncated.mp4").write_bytes(good[0].read_bytes()[:300])
    return out


def readable_clips(records: list[AuditRecord]) -> Counter:
    return Counter((r.epoch, r.position, r.clip) for r in records)


def test_finetuning_with_unreadable_videos_validates_after_every_epoch(ray_session, sample_videos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_videos, data)
    (data / "broken.mp4").write_bytes(os.urandom(2048))
    (data / "empty.mp4").write_bytes(b"")
    with open(data / "train.csv", "a") as f:  # 8 readable + 2 unreadable: 5 steps planned, 4 in the data
        f.write("broken.mp4 0\nempty.mp4 1\n")
    db = tmp_path / "ml.db"
    code = finetune_job.main([
        "--set", "run_name=short-epochs", "--set", f"storage_path={tmp_path / 'runs'}",
        "--set", f"data.uri={data / 'train.csv'}", "--set", "init_from=", "--set", "model.preset=tiny",
        "--set", "data.decode_isolation=inline", "--set", "data.max_error_fraction=0.5",
        "--set", "data.clips_per_video=1", "--set", "data.sampling_rate=2", "--set", "train.batch_size=2",
        "--set", "train.global_batch_size=null",
        "--set", "train.epochs=3", "--set", "train.shuffle_buffer_batches=2", "--set", "optim.lr=1e-3",
        "--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=0.5",
        "--set", "checkpoint.every_steps=100", "--set", f"tracking.tracking_uri=sqlite:///{db}",
        "--set", "tracking.system_metrics=false", "--set", "val_split=val",
    ])
    assert code == 0
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("videomae-finetune").experiment_id])
    validated = [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")]
    # the three epochs ended where their data did (step 4, 8, 12), the run at its planned 15 steps
    assert sorted(validated) == [4, 8, 12, 15]
    epoch_steps = client.get_metric_history(run.info.run_id, "epoch/steps")
    assert {(m.step, m.value) for m in epoch_steps} == {(4, 4), (8, 4), (12, 4)}
    best = finetune_job.read_best(str(tmp_path / "runs" / "short-epochs" / "best"))
    top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/top1")}
    assert best["val_top1"] == max(top1.values()) and best["step"] in validated


def test_a_job_stopped_right_after_a_short_epochs_last_checkpoint_resumes(ray_session, sample_videos,
                                                                         tmp_path):
    good = sorted(sample_videos.glob("videos/*/train_*.mp4"))  # 8
    data = tmp_path / "videos"
    with_broken(data, good)
    audit = tmp_path / "audit"
    audit.mkdir()
    # 10 videos: 5 steps planned per epoch, 4 in the data. The first job stops at step 4, the short
    # epoch's last step, with its checkpoint: the state a kill right after that checkpoint leaves
    # compiled (tracing only: aot_eager), so its checkpoints must hold the model itself to resume
    compiled = {"train.compile": "true", "train.compile_backend": "aot_eager"}
    first = tiny_config(tmp_path, str(data), run_name="reopen", **{
        "data.clips_per_video": "1", "train.max_steps": "4", "checkpoint.every_steps": "4",
        "scaling.num_workers": "1", "train.audit_dir": str(audit), **compiled})
    assert pretrain_job.run_pretrain(first).final_step == 4
    progress = checkpointing.read_progress(tmp_path / "runs" / "reopen" / "checkpoint_00000004")
    assert (progress.epoch, progress.step_in_epoch) == (0, 4)
    # resubmitted for 10 steps: epoch 0 reopens with nothing readable left, ends, and epoch 1 trains
    again = tiny_config(tmp_path, str(data), run_name="reopen", **{
        "data.clips_per_video": "1", "train.max_steps": "10", "checkpoint.every_steps": "4",
        "scaling.num_workers": "1", "train.audit_dir": str(audit), **compiled})
    result = pretrain_job.run_pretrain(again)
    assert (result.start_step, result.final_step) == (4, 10)
    records = read_audit(str(audit))
    later = {(r.step, r.epoch) for r in records if r.step > 4}
    assert later == {(s, 1) for s in range(5, 9)} | {(9, 2), (10, 2)}
    assert Counter(r.epoch for r in records) == {0: 8, 1: 8, 2: 4}  # every readable video once an epoch


def test_a_killed_job_resubmitted_trains_exactly_the_clips_not_yet_trained(ray_session, sample_videos,
                                                                           tmp_path):
    good = with_broken(tmp_path / "videos", sorted(sample_videos.glob("videos/*/*.mp4")))  # 24 + 2
    paths = [str(p) for p in sorted((tmp_path / "videos").glob("*.mp4"))]
    manifest = tmp_path / "manifest.parquet"  # a Parquet dataset of 3 files: several read tasks
    manifest.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"path": paths[i::3]}), manifest / f"part-{i}.parquet")
    audit = tmp_path / "audit"
    audit.mkdir()
    sets = {"run_name": "resubmitted", "data.clips_per_video": "2", "data.piece_rows": "4",
            "data.group_pieces": "2", "data.decode_concurrency": "1", "scaling.num_workers": "1",
            "train.max_steps": "24", "checkpoint.every_steps": "3", "scaling.max_failures": "0",
            "train.audit_dir": str(audit), "data.seed": "0"}
    thread, outcome = pretrain_in_thread(tiny_config(tmp_path, str(manifest), **sets))
    run_dir = tmp_path / "runs" / "resubmitted"
    deadline = time.monotonic() + 240
    killed = None
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        committed = committed_checkpoint(run_dir)
        if committed and committed >= "checkpoint_00000006" and train_worker_pids():
            killed = train_worker_pids()[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=240)
    assert killed is not None and "error" in outcome, "the first job was to die mid-epoch"
    result = pretrain_job.run_pretrain(tiny_config(tmp_path, str(manifest), **sets))  # a new job
    assert 6 <= result.start_step < 24 and result.final_step == 24
    records = read_audit(str(audit))
    attempts = sorted({r.attempt for r in records}, key=lambda a: min(r.step for r in records
                                                                      if r.attempt == a))
    assert len(attempts) == 2
    before = [r for r in records if r.attempt == attempts[0] and r.step <= result.start_step]
    after = [r for r in records if r.attempt == attempts[1]]
    lineage = readable_clips(before) + readable_clips(after)
    readable = {(0, p, c) for p in range(26) for c in range(2)
                if any(r.position == p for r in records)}
    assert len(readable) == 48 and set(lineage) == readable  # every readable clip of the epoch ...
    assert max(lineage.values()) == 1  # ... once: the new job trained exactly those not yet trained
    uris = {}
    for r in records:  # the rebuilt plan put every video where the first job's had it
        assert uris.setdefault(r.position, r.uri) == r.uri
    assert {Path(u).name for u in uris.values()} == {p.name for p in good}


@pytest.mark.timeout(300)
def test_an_uneven_elastic_group_trains_every_video_of_its_epoch(ray_session, sample_videos, tmp_path):
    with_broken(tmp_path / "videos", sorted(sample_videos.glob("videos/*/*.mp4")))  # 24 + 2
    audit = tmp_path / "audit"
    audit.mkdir()
    # planned for 4 workers (global batch 8: 4 micro-batches); the session's 2 "decode" units hold 3.
    # Binary fractions: Ray Train's elastic policy divides summed reservations (0.6 x 3 = 1.79999...,
    # and // 0.6 gives 2 workers)
    sets = {"run_name": "uneven", "data.clips_per_video": "2", "scaling.num_workers": "[3, 4]",
            "scaling.resources_per_worker": "{decode: 0.625}", "scaling.cpus_per_worker": "0.25",
            "train.max_steps": "6", "checkpoint.every_steps": "6", "train.audit_dir": str(audit)}
    result = pretrain_job.run_pretrain(tiny_config(tmp_path, str(tmp_path / "videos"), **sets))
    assert result.final_step == 6
    records = read_audit(str(audit))
    assert len({r.attempt for r in records}) == 3  # three ranks: 2, 1, 1 micro-batches, rotating
    trained = readable_clips(records)
    # 48 readable clips, 16 a rank: every one trained once in epoch 0's 6 steps (with the remainder fixed
    # on rank 0, rank 0 ran out after 4 steps, the epoch ended with 16 clips untrained, and steps 5-6
    # went to epoch 1)
    assert {epoch for epoch, _, _ in trained} == {0}
    assert len(trained) == 48 and max(trained.values()) == 1
