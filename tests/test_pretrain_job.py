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

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _ray(args: list[str], env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


@contextmanager
def ray_head(env: dict) -> Iterator[str]:
    """A private Ray head (own ports, own temp dir) for this test; yields the job API address."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's unix sockets live in here
    dashboard = free_port()
    worker_base = random.randrange(20000, 60000, 200)
    cmd = [RAY, "start", "--head", "--block", "--temp-dir", temp_dir, "--num-cpus", "4",
           "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--min-worker-port", str(worker_base),
           "--max-worker-port", str(worker_base + 199), "--include-dashboard", "true",
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    # a loaded test machine can take longer than Ray's default 60 s to bring up the dashboard
    env = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", **env}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 360
        while _ray(["job", "list", "--address", address], env, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the Ray head did not come up:\n" +
                                     (Path(temp_dir) / "ray-start.log").read_text())
            time.sleep(1)
        yield address
    finally:
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
        log.close()
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
            "train.batch_size": 2, "train.max_steps": 16, "train.log_every_steps": 2,
            "checkpoint.every_steps": 4, "tracking.tracking_uri": mlflow_server,
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
        deadline = time.monotonic() + 240
        while _committed_step(storage / "job-test") < 4:
            status = _ray(["job", "status", "--address", address, "pretrain-first"], env, check=False)
            text = (status.stdout + status.stderr).lower()
            assert "failed" not in text and "succeeded" not in text, status.stdout + status.stderr
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(1)
        _ray(["job", "stop", "--address", address, "pretrain-first"], env)
        stopped_at = _committed_step(storage / "job-test")
        assert stopped_at < 16

        second = _ray([*submit, "--submission-id", "pretrain-second", "--", *job_args], env, timeout=400)
        logs = second.stdout + second.stderr
        assert "resuming from step" in logs and "resuming from step 0 " not in logs, logs[-3000:]
        assert "finished at step 16" in logs

    final = sorted((storage / "job-test").glob("checkpoint_*"))[-1]
    assert checkpointing.read_progress(final).step == 16
    assert (storage / "job-test" / "export" / "model.safetensors").exists()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("job-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resubmitted job continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps[0] <= stopped_at and steps[-1] == 16
