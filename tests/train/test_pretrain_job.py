"""The job as a user runs it on a cluster, one cluster for the module: a Ray head started with
``ray start --head`` and token authentication on 127.0.0.1, jobs sent with ``ray job submit --working-dir .``.

- Elastic training: a second ``ray start --address`` node joins; pretraining with
  ``scaling.num_workers=[2, 3]`` spreads over both; the second node is killed for good mid-run, and the
  run trains on on the two workers left with the same global batch (its 3 micro-batches split 2 + 1
  instead of 1 + 1 + 1); then a new node joins and the group grows back to three. The run ends at the
  planned step with every clip counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import FAST_NODE_DEATH, free_port

from pipeline.train import checkpointing

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
STEPS = 160  # of the elastic run: grow-back came at step 40 to 110 in three runs here


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
    gcs_port = gcs_port or free_port()
    cmd = [RAY, "start", "--head", "--block", "--temp-dir", temp_dir, "--num-cpus", "4",
           "--node-ip-address", "127.0.0.1", *extra,
           "--port", str(gcs_port), "--dashboard-port", str(dashboard),
           "--dashboard-host", "127.0.0.1",
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--min-worker-port", str(worker_base),
           "--max-worker-port", str(worker_base + 199), "--include-dashboard", "true",
           "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:  # RAY_ADDRESS: as infra/local/stack.py, the state API asks this Ray
        proc = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 360
    while "block forever" not in log_path.read_text(errors="replace"):  # printed after the node is up
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_head(proc, temp_dir)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the Ray head did not come up:\n{tail}")
        time.sleep(1)
    return proc


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head and everything it started. Ray's graceful stop took 30 s here, so after 5 s the rest
    is killed: a test cluster keeps nothing worth a clean shutdown. Ray's processes rename themselves
    (``ray::DashboardAgent``), so they are found as the head's descendants and by their raylet's pid; a job
    driver and a dashboard agent left alive by a head that is gone spun at a core each here and starved
    the next tests."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    raylets = {str(p.pid) for p in family if "raylet" in p.name()}
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    for p in psutil.process_iter(["cmdline"]):  # anything of this head still alive (never other Rays)
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []) or p.environ().get("RAY_RAYLET_PID") in raylets:
                p.kill()
        except psutil.Error:
            pass


@dataclass
class Cluster:
    """The module's Ray cluster: its job API address, its GCS address (for more nodes), the environment
    of a user holding its token, and its temp dir."""

    address: str
    gcs: str
    env: dict
    temp_dir: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A private Ray head for this module's tests (own ports, temp dir, token), with two ``train_slot``
    resources for the elastic test. A loaded machine can miss Ray's fixed 30 s raylet registration
    window, so start-up is retried."""
    token_file = tmp_path_factory.mktemp("ray-token") / "ray_token"  # as on a real cluster
    token_file.write_text(secrets.token_hex(24))
    # as a user with the project's environment activated: `python` in the entrypoint is the venv's
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # a loaded test machine can take longer than Ray's default 60 s to bring up the dashboard
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", **FAST_NODE_DEATH}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's unix sockets live in here
    try:
        for attempt in range(3):
            dashboard, gcs_port = free_port(), free_port()
            try:
                proc = _start_head(env, temp_dir, dashboard, gcs_port, ["--resources", '{"train_slot": 2}'])
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        try:
            yield Cluster(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs_port}", env, temp_dir)
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


SIZE_LINE = r"(\d) worker\(s\) x (\d(?:-\d)?) micro-step\(s\)"  # rank 0's line at each start of the group


def _group_sizes(logs_dir: Path) -> list[tuple[str, str]]:
    """(workers, micro-steps) of each start of the elastic job's group so far, read from its driver log on
    the head (a file: no CLI call, which would take a core from the training)."""
    sizes = []
    for path in logs_dir.glob("session_latest/logs/job-driver-*elastic*.log"):
        try:  # listed, then not found once in a fresh-clone run: read it at the next look
            sizes += re.findall(SIZE_LINE, path.read_text(errors="replace"))
        except OSError:
            continue
    return sizes


def _start_node(env: dict, gcs: str, log_path: Path, temp_dir: str) -> subprocess.Popen:
    """A second node on this machine. NOTE: its own ``--temp-dir``: without one it takes the head's, and two
    runtime-env agents then manage one package folder, the second deleting the job's working directory
    (the job driver's cwd) while the job runs: the failure this test showed in three runs."""
    worker_base = random.randrange(12000, 32000, 200)  # below the ephemeral range free_port() draws from
    cmd = [RAY, "start", "--address", gcs, "--block", "--temp-dir", temp_dir, "--num-cpus", "2",
           "--resources", '{"train_slot": 1}',
           "--node-ip-address", "127.0.0.1", "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--min-worker-port", str(worker_base),
           "--max-worker-port", str(worker_base + 199), "--disable-usage-stats"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": gcs}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 180
    while "block forever" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the second node did not come up:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def _kill_node(proc: subprocess.Popen) -> None:
    """The node is lost, not stopped: SIGKILL to its raylet, its workers and everything else it runs,
    including agents that left the process tree (found by their raylet's pid in their environment)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    raylets = {str(p.pid) for p in family if "raylet" in p.name()}
    for p in family:
        p.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_RAYLET_PID") in raylets:
                p.kill()
        except psutil.Error:
            pass


def test_a_node_lost_for_good_shrinks_the_group_and_the_run_finishes_exactly(cluster, tmp_path,
                                                                            sample_videos):
    env, address = cluster.env, cluster.address
    storage = tmp_path / "runs"
    sets = {"run_name": "elastic", "storage_path": storage, "data.uri": sample_videos,
            "data.clips_per_video": 2, "train.batch_size": 2, "train.max_steps": STEPS,
            "train.global_batch_size": "null",
            "train.log_every_steps": 5, "checkpoint.every_steps": 5, "checkpoint.keep_last": 3,
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "optim.warmup_steps": 2,
            "probe.every_steps": 0, "scaling.num_workers": "[2,3]", "scaling.cpus_per_worker": 1,
            "scaling.resources_per_worker": '{"train_slot": 1}', "scaling.max_failures": 5,
            "scaling.resize_interval_s": 3}
    job_args = ["python", "jobs/pretrain.py", "--config", "configs/pretrain_tiny_demo.yaml"]
    job_args += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    # how long a group waits for its workers before it settles for fewer (Ray's default: 60 s); a new
    # node's first worker took over 15 s to start here once (runtime env, imports), and the run ended
    # before the group grew back
    runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25"}})
    node_dir = tempfile.mkdtemp(prefix="rayelastic2-", dir="/tmp")  # short: Ray's unix sockets live in here
    node3_dir = tempfile.mkdtemp(prefix="rayelastic3-", dir="/tmp")
    logs_dir = Path(cluster.temp_dir)
    node = None
    try:
        node = _start_node(env, cluster.gcs, tmp_path / "node2.log", node_dir)
        submit = ["job", "submit", "--address", address, "--working-dir", ".", "--submission-id", "elastic",
                  "--runtime-env-json", runtime_env, "--no-wait", "--", *job_args]
        _ray(submit, env)
        # three workers have trained a while. The group can start with two: Ray Data's autoscaling
        # coordinator, a detached actor the module's earlier job left on the head, refreshes its view of
        # the nodes every 20 s, and Ray Train's elastic policy sizes the group from that view; the group
        # then grows to three once the coordinator has seen the second node
        deadline = time.monotonic() + 300
        three_at = None
        while three_at is None or _committed_step(storage / "elastic") <= max(three_at, 4):
            assert time.monotonic() < deadline, f"no checkpoint of three workers: {_group_sizes(logs_dir)}"
            if three_at is None and ("3", "1") in _group_sizes(logs_dir):
                three_at = _committed_step(storage / "elastic")
            time.sleep(0.5)
        lost_at = _committed_step(storage / "elastic")
        _kill_node(node)
        node = None
        deadline = time.monotonic() + 300
        while _committed_step(storage / "elastic") <= lost_at:  # the two workers left train on
            assert time.monotonic() < deadline, "no checkpoint after the node was lost"
            time.sleep(0.5)
        shrunk_at = _committed_step(storage / "elastic")
        # capacity returns: a new node, and the group grows back (Ray Train checks every resize_interval_s)
        node = _start_node(env, cluster.gcs, tmp_path / "node3.log", node3_dir)
        deadline = time.monotonic() + 600
        status, polls = "", 0
        while time.monotonic() < deadline:
            # a CLI call costs this 2-core machine a second or two of a core, taken from the training:
            # ask every 15 s, and every 2 s once the last checkpoint is in (the job then ends in seconds)
            last_in = _committed_step(storage / "elastic") >= STEPS
            polls += 1
            if not last_in and polls % 30 != 1:
                time.sleep(0.5)
                continue
            answer = _ray(["job", "status", "--address", address, "elastic"], env, check=False)
            with open(tmp_path / "status.log", "a") as out:  # every answer, for a failure
                out.write(f"--- {time.strftime('%T')}\n{answer.stdout}\n{answer.stderr[-2000:]}\n")
            # the job's own state only: a CLI call can fail (it is retried), its message is not the job's
            text = answer.stdout + answer.stderr
            found = re.search(r"(?:status for job 'elastic': |job 'elastic' )(\w+)", text, re.I)
            status = found.group(1).lower() if found else status
            if status in ("succeeded", "failed", "stopped"):
                break
            time.sleep(2 if last_in else 0.5)
        logs = _ray(["job", "logs", "--address", address, "elastic"], env).stdout
        (tmp_path / "job.log").write_text(logs)  # the whole log, for a failure
        assert "succeeded" in status, status + logs[-4000:]
    finally:
        if node is not None:
            _kill_node(node)
        for log in logs_dir.glob("session_latest/logs/job-driver-*elastic*.log"):  # kept for a failure
            shutil.copy(log, tmp_path / log.name)
        shutil.rmtree(node_dir, ignore_errors=True)
        shutil.rmtree(node3_dir, ignore_errors=True)

    assert lost_at < shrunk_at < STEPS
    # rank 0's start lines: 3 workers, 2 after the loss, 3 again after the new node joined
    sizes = re.findall(SIZE_LINE, logs)
    assert ("3", "1") in sizes, sizes
    first_three = sizes.index(("3", "1"))
    assert ("2", "1-2") in sizes[first_three:], sizes  # shrank: 3 micro-batches over 2 ranks, rotating
    assert ("3", "1") in sizes[sizes.index(("2", "1-2"), first_three):], sizes  # grew back
    assert logs.count("global batch 6,") >= 3  # the same global batch at every size
    assert f"finished at step {STEPS}" in logs
    final = checkpointing.read_progress(storage / "elastic" / f"checkpoint_{STEPS:08d}")
    assert final.step == STEPS and final.world_size == 3 and final.clips_seen == STEPS * 6
