"""The local stack end to end, as a user drives it: `stack.py up`, videos into its bucket, `ray job submit`
of the real pretraining job (token auth on: a wrong token is refused), `ray job stop` after its first
checkpoint and a resubmission that resumes it; then the job's MLflow run (one, continued) and checkpoints are
where they should be, and `stack.py down` leaves no process behind."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STACK = REPO / "infra" / "local" / "stack.py"
RUN_NAME = "infra-local-e2e"


def _load_stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", STACK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_stack"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def free_port_block(size: int = 120, attempts: int = 50) -> int:
    """A base port with `size` free ports above it (the stack pins every port it uses)."""
    for _ in range(attempts):
        base = random.randrange(30000, 45000)
        ok = True
        for port in range(base, base + size):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"export (\w+)=(.*)", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def wait_for_checkpoint(s3, bucket: str, run_prefix: str, at_least: int, timeout_s: float) -> int:
    """The step of the run's newest committed checkpoint once it is at least ``at_least`` (Ray Train's
    snapshot of its checkpoint manager, in the bucket)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{run_prefix}/checkpoint_manager_snapshot.json")["Body"]
            latest = json.loads(body.read())["latest_checkpoint_result"]
            step = int(latest["metrics"]["step"]) if latest else 0
        except Exception:  # noqa: BLE001 - not written yet
            step = 0
        if step >= at_least:
            return step
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint of step >= {at_least} within {timeout_s} s")


def stack(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STACK), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_local_stack_pretrain_via_ray_job_submit(tmp_path: Path) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    from pipeline.data.synthetic import make_dataset

    mod = _load_stack_module()
    started = time.monotonic()

    def lap(what: str) -> None:  # phase timings, shown on failure or with -s
        print(f"[{time.monotonic() - started:6.1f}s] {what}", flush=True)

    state_dir = tmp_path / "stack"
    base = free_port_block()
    up = stack(
        "up",
        "--state-dir",
        str(state_dir),
        "--base-port",
        str(base),
        "--num-cpus",
        "4",
        "--object-store-memory",
        str(400 * 1024**2),
        "--s3",
        "moto",
    )
    state = mod.StackState.load(state_dir)
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        lap("stack up")
        env_file = state.env_file
        job_env = read_env_file(env_file)
        secret = job_env["AWS_SECRET_ACCESS_KEY"]
        token = state.token_path.read_text().strip()

        # secrets live in owner-only files and are never printed
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert state.token_path.stat().st_mode & 0o777 == 0o600
        printed = stack("env", "--state-dir", str(state_dir))
        assert printed.returncode == 0
        for text in (up.stdout, up.stderr, printed.stdout, printed.stderr):
            assert secret not in text and token not in text
        assert f". {env_file}" in printed.stdout
        assert job_env["RAY_AUTH_MODE"] == "token"

        # every service answers on loopback only; the dashboard refuses requests without the token
        status = json.loads(stack("status", "--state-dir", str(state_dir), "--json").stdout)
        assert all(s["healthy"] for s in status.values()), status
        for url in (job_env["RAY_ADDRESS"], job_env["AWS_ENDPOINT_URL"], job_env["MLFLOW_TRACKING_URI"]):
            assert url.startswith("http://127.0.0.1:")
        assert mod._http_status(job_env["RAY_ADDRESS"] + "/api/jobs/") == 401

        # a few generated videos into the stack's bucket
        videos = tmp_path / "videos"
        make_dataset(str(videos), videos_per_class=2, num_frames=24, size=(48, 64), seed=0, num_classes=4)
        s3 = boto3.client(
            "s3",
            endpoint_url=job_env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=job_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=secret,
        )
        for path in sorted((videos / "videos").rglob("*.mp4")):
            s3.upload_file(str(path), state.bucket, f"videos/{path.relative_to(videos / 'videos')}")

        lap("videos uploaded")
        # the user's shell: only the env file's variables, no AWS credentials needed to submit
        submit_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
        submit_env.update({k: job_env[k] for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        submit_env["PATH"] = f"{BIN}{os.pathsep}{submit_env.get('PATH', '')}"
        bucket = f"s3://{state.bucket}"
        overrides = {
            "data.uri": f"{bucket}/videos",
            "storage_path": f"{bucket}/runs",
            "run_name": RUN_NAME,
            "train.max_steps": 16,  # long enough that the stop lands before the end
            "train.batch_size": 2,
            "train.global_batch_size": "null",  # a step of one micro-batch, not the demo's 32 clips
            "checkpoint.every_steps": 2,
            "train.log_every_steps": 1,
            "optim.warmup_steps": 2,
            "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 1,
            "tracking.recon_every_steps": 0,
            "tracking.system_metrics": "false",
            "probe.every_steps": 0,  # the demo's kNN monitor would generate and embed 520 videos of its own
        }
        entrypoint = ["python", "jobs/pretrain.py", "--config", "configs/pretrain_tiny_demo.yaml"]
        entrypoint += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]

        def ray_job(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run(["ray", "job", *args], cwd=REPO, env=submit_env, capture_output=True,
                                  text=True, timeout=timeout)

        # a client holding the wrong token is refused
        denied = subprocess.run(["ray", "job", "list"], cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**submit_env, "RAY_AUTH_TOKEN": "not-the-token",
                                     "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token-here")})
        assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()

        # submitted, stopped after its first checkpoint, resubmitted under the same run name: it resumes
        first = ray_job("submit", "--working-dir", ".", "--submission-id", "infra-e2e-first", "--no-wait",
                        "--", *entrypoint)
        assert first.returncode == 0, first.stdout + first.stderr
        stopped_at = wait_for_checkpoint(s3, state.bucket, f"runs/{RUN_NAME}", at_least=2, timeout_s=300)
        assert ray_job("stop", "infra-e2e-first").returncode == 0
        lap(f"first job stopped after step {stopped_at}")
        submission_id = "infra-e2e-second"
        submit = ray_job("submit", "--working-dir", ".", "--submission-id", submission_id, "--", *entrypoint,
                         timeout=450)
        lap("second job finished")
        # the job's state from the job server's REST API, authenticated as a user's curl would be
        request = urllib.request.Request(
            f"{job_env['RAY_ADDRESS']}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            job_info = json.load(response)
        logs = submit.stdout + submit.stderr
        assert job_info["status"] == "SUCCEEDED", (
            f"job {job_info['status']}: {job_info.get('message')}\n{logs[-6000:]}"
        )
        assert secret not in logs
        resumed = re.search(r"resuming from step (\d+)", logs)
        assert resumed and 0 < int(resumed.group(1)) < 16, logs[-3000:]
        assert "finished at step 16" in logs
        # the console a user reads: each progress line once (Ray Train's patched print gave every line
        # twice), and no progress-bar redraws in a log that is not a terminal
        progress = [line for line in logs.splitlines() if re.search(r"step \d+/16 \(\d+%\) \| epoch", line)]
        steps = [re.search(r"step \d+/16", line).group() for line in progress]
        assert len(steps) == 16 - int(resumed.group(1)) and len(steps) == len(set(steps)), progress
        assert "\x1b[A" not in logs

        # the MLflow run is on the stack's server, its artifacts in the bucket
        client = MlflowClient(job_env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("videomae-pretrain")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{RUN_NAME}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resubmitted job continued it
        losses = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
        assert losses[0] <= stopped_at and losses[-1] == 16
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=state.bucket).get("Contents", [])]
        run_id = runs[0].info.run_id
        assert any(k.startswith("mlflow/") and k.endswith(f"{run_id}/artifacts/model/model.safetensors")
                   for k in keys), keys  # fmt: skip
        # the checkpoint and the exported model are in the bucket
        run_keys = [k for k in keys if k.startswith(f"runs/{RUN_NAME}/")]
        assert any("checkpoint" in k for k in run_keys), run_keys
        assert f"runs/{RUN_NAME}/export/model.safetensors" in run_keys, run_keys
    finally:
        down = stack("down", "--state-dir", str(state_dir), timeout=120)
    lap("stack down")
    assert down.returncode == 0, down.stderr
    assert mod.stack_pids(state) == []
    for name in ("ray_gcs", "dashboard", "s3", "mlflow"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", state.ports[name]))  # raises if something still listens
