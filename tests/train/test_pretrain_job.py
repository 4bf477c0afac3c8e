"""The job as a user runs it on a cluster: a Ray head started with ``ray start --head`` and token
authentication, ``ray job submit --working-dir .``, a stopped job resumed by resubmitting it with the same
run name, metrics in a real MLflow server."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from pipeline.train import checkpointing

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _ray(args: list[str], env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def _start_head(env: dict, temp_dir: str, dashboard: int, gcs_port: int | None = None,
                extra: list[str] = ()) -> subprocess.Popen:
    """``ray start --head --block`` on fresh ports; returns once the whole node is up (or raises)."""
    worker_base = random.randrange(12000, 32000, 200)  # below the ephemeral range free_port() draws from
    cmd = [RAY, "start", "--head", "--block", "--temp-dir", temp_dir, "--num-cpus", "4",
           "--node-ip-address", "127.0.0.1", *extra,
           "--port", str(gcs_port or free_port()), "--dashboard-port", str(dashboard),
           "--dashboard-host", "127.0.0.1",
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--min-worker-port", str(worker_base),
           "--max-worker-port", str(worker_base + 199), "--include-dashboard", "true",
           "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 360
    while "block forever" not in log_path.read_text(errors="replace"):  # printed after the node is up
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_head(proc, temp_dir)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the Ray head did not come up:\n{tail}")
        time.sleep(1)
    return proc


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in psutil.process_iter(["cmdline"]):  # anything of this head still alive (never other Rays)
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                p.kill()
        except psutil.Error:
            pass


@contextmanager
def ray_head(env: dict, attempts: int = 3) -> Iterator[str]:
    """A private Ray head (own ports, own temp dir) for this test; yields the job API address.

    A loaded machine can miss Ray's fixed 30 s raylet registration window, so start-up is retried."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's unix sockets live in here
    # a loaded test machine can take longer than Ray's default 60 s to bring up the dashboard
    env = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", **env}
    dashboard = free_port()
    try:
        for attempt in range(attempts):
            try:
                proc = _start_head(env, temp_dir, dashboard)
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                dashboard = free_port()
        address = f"http://127.0.0.1:{dashboard}"
        try:
            yield address
        finally:
            _stop_head(proc, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _committed_step(run_dir: Path) -> int:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        latest = snapshot["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def test_submit_stop_and_resume_under_token_auth(tmp_path, sample_videos, mlflow_server):
    token_file = tmp_path / "ray_token"
    token_file.write_text(secrets.token_hex(24))
    # as a user with the project's environment activated: `python` in the entrypoint is the venv's
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    storage = tmp_path / "runs"
    sets = {"run_name": "job-test", "storage_path": storage, "data.uri": sample_videos,
            "data.clips_per_video": 4, "train.batch_size": 2, "train.max_steps": 8,
            "train.log_every_steps": 2, "checkpoint.every_steps": 2, "tracking.tracking_uri": mlflow_server,
            "tracking.experiment": "job-test", "optim.warmup_steps": 2}
    job_args = ["python", "jobs/pretrain.py", "--config", "configs/pretrain_tiny_demo.yaml"]
    job_args += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    with ray_head(env) as address:
        # the cluster refuses a client with the wrong token
        wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
        denied = _ray(["job", "list", "--address", address], wrong, check=False)
        assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()

        submit = ["job", "submit", "--address", address, "--working-dir", "."]
        _ray([*submit, "--submission-id", "pretrain-first", "--no-wait", "--", *job_args], env)
        deadline = time.monotonic() + 300
        polls = 0
        while _committed_step(storage / "job-test") < 2:
            polls += 1
            if polls % 20 == 0:  # the CLI is slow: ask for the job's status only now and then
                status = _ray(["job", "status", "--address", address, "pretrain-first"], env, check=False)
                text = (status.stdout + status.stderr).lower()
                assert "failed" not in text and "succeeded" not in text, status.stdout + status.stderr
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.5)
        _ray(["job", "stop", "--address", address, "pretrain-first"], env)
        stopped_at = _committed_step(storage / "job-test")
        assert stopped_at < 8

        second = _ray([*submit, "--submission-id", "pretrain-second", "--", *job_args], env, timeout=400)
        logs = second.stdout + second.stderr
        assert "resuming from step" in logs and "resuming from step 0 " not in logs, logs[-3000:]
        assert "finished at step 8" in logs

    final = sorted((storage / "job-test").glob("checkpoint_0*"))[-1]
    assert checkpointing.read_progress(final).step == 8
    assert (storage / "job-test" / "export" / "model.safetensors").exists()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("job-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resubmitted job continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps[0] <= stopped_at and steps[-1] == 8
