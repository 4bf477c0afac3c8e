"""Helpers for tests that run whole training jobs in this process on the session's Ray: a tiny pretraining
config, a run in a thread, data with broken videos, and the hooks a test acts on a run through (the
checkpoint Ray Train registered last, the training workers' processes)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import psutil

from pipeline import config as C
from pipeline.train.pretrain import PretrainConfig, run_pretrain


def tiny_config(tmp_path: Path, data_uri: str, **overrides: str) -> PretrainConfig:
    sets = {
        "run_name": "kill-test", "storage_path": str(tmp_path / "runs"), "data.uri": data_uri,
        "data.decode_isolation": "inline", "data.max_error_fraction": "0.5", "data.clips_per_video": "2",
        "train.batch_size": "2", "train.max_steps": "12", "train.log_every_steps": "2",
        "checkpoint.every_steps": "3", "checkpoint.keep_last": "2", "tracking.recon_every_steps": "6",
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "test-train",
        "tracking.system_metrics_interval_s": "1", "scaling.num_workers": "2",
        "scaling.cpus_per_worker": "0.5", "scaling.max_failures": "5", "optim.lr": "1e-3",
        "optim.warmup_steps": "2", **overrides,
    }
    return C.load(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()])


def pretrain_in_thread(cfg: PretrainConfig) -> tuple[threading.Thread, dict]:
    """``run_pretrain(cfg)`` started in a thread, so the test can act on the run meanwhile; the dict gets
    ``result`` or ``error`` (re-raise it in the test)."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_pretrain(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    return thread, outcome


def data_with_broken_videos(sample_videos: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    good = sorted(sample_videos.glob("videos/*/*.mp4"))
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"good_{i:02d}.mp4")
    (folder / "random_bytes.mp4").write_bytes(os.urandom(4096))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(good[0].read_bytes()[:300])
    return folder


def committed_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train has registered (files on disk alone may be a report in flight)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes of *this* test session's Ray (descendants of pytest)."""
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


