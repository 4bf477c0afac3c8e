"""A local stack on 127.0.0.1: Ray head (dashboard + job server, token auth on), S3 server, MLflow server.

    python infra/local/stack.py up       # start everything, create the bucket, print what to source
    eval "$(python infra/local/stack.py env)"   # load RAY_ADDRESS, AWS_*, MLFLOW_TRACKING_URI, Ray token path
    python infra/local/stack.py status   # which services run, on which ports, where the logs are
    python infra/local/stack.py down     # stop everything this stack started (by pid), keep its data

The S3 server is MinIO when ``minio`` is on PATH (data persists in the state dir) and ``moto_server``
otherwise (in memory: the bucket is empty again after ``down``); ``--s3`` chooses explicitly. MLflow keeps
runs in SQLite in the state dir and artifacts in ``s3://<bucket>/mlflow``, proxied by the server, so clients
need no S3 credentials to log artifacts.

Jobs submitted with ``ray job submit`` run inside the Ray head's environment, which holds the S3 endpoint,
the credentials and the MLflow URI: nothing secret travels in job arguments or runtime envs, as on a real
cluster where pods get them from a Secret. Secrets (the Ray token, S3 credentials) live in 0600 files under
``<state-dir>/secrets`` and are never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
DEFAULT_BASE_PORT = 26300  # clear of 6379/8265 (Ray), 5000 (MLflow), 9000 (MinIO), 8080/8888
DEFAULT_BUCKET = "videomae"
REGION = "us-east-1"

# Offsets from --base-port. Every Ray port is pinned so that two stacks (or a stack and someone's
# `ray start`) on one machine never collide; workers take ports from a fixed range.
PORT_OFFSETS = {
    "ray_gcs": 0,
    "dashboard": 1,
    "s3": 2,
    "mlflow": 3,
    "s3_console": 4,
    "node_manager": 5,
    "object_manager": 6,
    "dashboard_agent_listen": 7,
    "dashboard_agent_grpc": 8,
    "runtime_env_agent": 9,
    "metrics_export": 10,
}
WORKER_PORT_OFFSETS = (20, 119)  # 100 ports: one per concurrent Ray worker process


class StackError(RuntimeError):
    """The stack cannot start or stop as asked; the message says what to do."""


def default_state_dir() -> Path:
    """Outside the repository on purpose: `ray job submit --working-dir .` must never upload the token."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "videomae-pipeline" / "local-stack"


@dataclass
class StackState:
    """What `up` started; written to <state-dir>/state.json (no secret values)."""

    state_dir: str
    s3_backend: str
    bucket: str
    ports: dict[str, int]
    worker_ports: tuple[int, int]
    ray_temp_dir: str
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports['dashboard']}"

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def secrets_dir(self) -> Path:
        return Path(self.state_dir) / "secrets"

    @property
    def token_path(self) -> Path:
        return self.secrets_dir / "ray_auth_token"

    @property
    def env_file(self) -> Path:
        return self.secrets_dir / "stack.env"

    @property
    def logs_dir(self) -> Path:
        return Path(self.state_dir) / "logs"

    def save(self) -> None:
        path = Path(self.state_dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = state_dir / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["worker_ports"] = tuple(data["worker_ports"])
        return cls(**data)


# ---------------------------------------------------------------- secrets


def _write_private(path: Path, text: str) -> None:
    """Create or replace a file readable by its owner only (0600), never briefly wider."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _load_or_create_secrets(state: StackState) -> dict[str, str]:
    """Ray token and S3 credentials, generated once per state dir (MinIO data is bound to its root creds)."""
    creds_path = state.secrets_dir / "s3_credentials.json"
    if not state.token_path.exists():
        _write_private(state.token_path, secrets.token_hex(32))
    if not creds_path.exists():
        creds = {"access_key": "stack" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
        _write_private(creds_path, json.dumps(creds))
    creds = json.loads(creds_path.read_text())
    return {"AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"]}


def job_environment(state: StackState) -> dict[str, str]:
    """Everything a job (and `ray job submit`) needs to use this stack, credentials included."""
    return {
        "RAY_ADDRESS": state.dashboard_url,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(state.token_path),
        "AWS_ENDPOINT_URL": state.s3_url,
        "AWS_REGION": REGION,
        **_load_or_create_secrets(state),
        "MLFLOW_TRACKING_URI": state.mlflow_url,
    }


PUBLIC_VARS = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "MLFLOW_TRACKING_URI",
)
# Variables of the caller's shell that would silently override what the stack sets.
SHADOWING_VARS = (
    "RAY_AUTH_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
)


def _write_env_file(state: StackState) -> None:
    env = job_environment(state)
    lines = ["# Written by infra/local/stack.py up: source it to use the local stack. Owner-only (0600)."]
    lines += [f"unset {name}" for name in SHADOWING_VARS]
    lines += [f"export {k}={v}" for k, v in env.items()]
    _write_private(state.env_file, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- processes


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # Ray's gRPC servers bind every interface: check the same
        except OSError:
            return False
    return True


def _running(pid: int | None, state: StackState) -> bool:
    """``pid`` is alive (not a zombie) and still one of this stack's processes (not a reused pid)."""
    return bool(pid) and pid in _stack_processes(state)


def _spawn(name: str, cmd: list[str], env: dict[str, str], state: StackState) -> int:
    """Start a service in its own session (so `down` can stop its whole process group), logging to a file."""
    state.logs_dir.mkdir(parents=True, exist_ok=True)
    log = open(state.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=state.state_dir,
    )
    log.close()
    state.pids[name] = proc.pid
    state.save()
    return proc.pid


def _log_tail(state: StackState, name: str, lines: int = 25) -> str:
    path = state.logs_dir / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_until(name: str, check, state: StackState, timeout: float) -> None:
    """Poll ``check()`` until it returns True; fail with the service's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if not _running(state.pids.get(name), state):
            raise StackError(f"{name} exited during start-up; last log lines:\n{_log_tail(state, name)}")
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not up yet"
            last_error = str(e)
        time.sleep(0.5)
    raise StackError(
        f"{name} not ready after {timeout:.0f}s ({last_error}); "
        f"log {state.logs_dir / name}.log:\n{_log_tail(state, name)}"
    )


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# Set in every service's environment only (not in stack.env, so never in the user's shell): it marks the
# stack's processes and everything they start (Ray workers, job drivers), and only those are ever signalled.
MARKER_VAR = "VIDEOMAE_LOCAL_STACK"


def _stack_processes(state: StackState) -> dict[int, int]:
    """pid -> process group of every live process carrying this stack's marker (services and what they
    started). psutil keeps it portable (Linux, macOS); processes of other users are skipped."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(MARKER_VAR) == state.state_dir:
                out[proc.pid] = os.getpgid(proc.pid)
        except (psutil.Error, OSError):
            continue
    return out


def stack_pids(state: StackState) -> list[int]:
    """Live processes of this stack (for `down` and the tests' no-leftover check)."""
    return sorted(_stack_processes(state))


def _stop_group(pid: int, state: StackState, timeout: float, leader_only: bool = False) -> None:
    """SIGTERM a service (each runs in its own session; ``pid`` leads the group), SIGKILL what remains.

    Only processes carrying the stack's marker are signalled: a recorded pid that has since been reused
    by another program is left alone. ``leader_only``: `ray start --block` drains and stops its own
    children on SIGTERM, better than a signal to all of them at once (the raylet then waits on a dead GCS).
    """

    def members() -> list[int]:
        return [p for p, group in _stack_processes(state).items() if group == pid]

    if pid not in members():
        return  # the leader is gone; stragglers are collected by `down`
    with contextlib.suppress(ProcessLookupError):
        if leader_only:
            os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (remaining := members()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for member in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


# ---------------------------------------------------------------- services


def _service_env(state: StackState) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHADOWING_VARS and k != "RAY_ADDRESS"}
    env.update(job_environment(state))
    env.pop("RAY_ADDRESS")  # the head must start a new cluster, not join one
    # `python` in a job's entrypoint must be this environment's interpreter, with the project installed.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env[MARKER_VAR] = state.state_dir
    return env


def service_specs(
    state: StackState,
    env: dict[str, str],
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Command line and environment of each service, in start order. Every listener binds 127.0.0.1 except
    Ray's internal gRPC ports, which Ray binds on all interfaces and guards with the token."""
    root = Path(state.state_dir)
    p = state.ports
    specs: dict[str, tuple[list[str], dict[str, str]]] = {}
    if state.s3_backend == "minio":
        minio_env = {**env, "MINIO_ROOT_USER": env["AWS_ACCESS_KEY_ID"]}
        minio_env["MINIO_ROOT_PASSWORD"] = env["AWS_SECRET_ACCESS_KEY"]
        data = str(root / "minio" / "data")
        cmd = [shutil.which("minio") or "minio", "server", data, "--address", f"{HOST}:{p['s3']}",
               "--console-address", f"{HOST}:{p['s3_console']}"]  # fmt: skip
        specs["s3"] = (cmd, minio_env)
    else:
        specs["s3"] = ([str(BIN / "moto_server"), "-H", HOST, "-p", str(p["s3"])], env)

    cmd = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(p["mlflow"]),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{state.bucket}/mlflow", "--workers", "1"]  # fmt: skip
    # No job-execution workers (GenAI features): seven extra processes a training stack does not use.
    mlflow_env = {
        **env,
        "MLFLOW_S3_ENDPOINT_URL": state.s3_url,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    specs["mlflow"] = (cmd, mlflow_env)

    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", HOST, "--port", str(p["ray_gcs"]),
           "--dashboard-host", HOST, "--dashboard-port", str(p["dashboard"]),
           "--dashboard-agent-listen-port", str(p["dashboard_agent_listen"]),
           "--dashboard-agent-grpc-port", str(p["dashboard_agent_grpc"]),
           "--runtime-env-agent-port", str(p["runtime_env_agent"]),
           "--metrics-export-port", str(p["metrics_export"]),
           "--node-manager-port", str(p["node_manager"]),
           "--object-manager-port", str(p["object_manager"]),
           "--min-worker-port", str(state.worker_ports[0]), "--max-worker-port", str(state.worker_ports[1]),
           "--temp-dir", state.ray_temp_dir]  # fmt: skip
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if object_store_memory is not None:
        cmd += ["--object-store-memory", str(object_store_memory)]
    # `down` of a local stack should not wait out the 30 s node drain meant for Serve replicas on k8s.
    # RAY_ADDRESS: Ray's state API, called inside the cluster with no address (Ray Train's placement group
    # cleaner asks it whether the run's controller is alive), otherwise asks the machine's most recently
    # started Ray, which on a laptop with a second Ray knows no such actor: the cleaner then removes the
    # placement group of a live run.
    specs["ray"] = (cmd, {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
                          "RAY_ADDRESS": f"{HOST}:{p['ray_gcs']}"})
    return specs


def _wait_s3_and_create_bucket(state: StackState, env: dict[str, str]) -> None:
    import boto3  # here: `status`/`down` work without it

    client = boto3.client(
        "s3",
        endpoint_url=state.s3_url,
        region_name=REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    _wait_until("s3", lambda: client.list_buckets() is not None, state, timeout=60)
    if state.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=state.bucket)


def _wait_ready(state: StackState, env: dict[str, str]) -> None:
    _wait_s3_and_create_bucket(state, env)
    _wait_until("mlflow", lambda: _http_status(state.mlflow_url + "/health") == 200, state, timeout=180)
    token = state.token_path.read_text().strip()
    # Ready = the job server answers an authenticated request (it comes up a few seconds after the GCS).
    _wait_until(
        "ray",
        lambda: _http_status(state.dashboard_url + "/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200,
        state,
        timeout=180,
    )


# ---------------------------------------------------------------- commands


def up(
    state_dir: Path,
    base_port: int = DEFAULT_BASE_PORT,
    s3: str = "auto",
    bucket: str = DEFAULT_BUCKET,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    port_overrides: dict[str, int] | None = None,
) -> StackState:
    """Start the stack (or report the running one); on any failure stop what was started."""
    state_dir = state_dir.expanduser().resolve()
    existing = StackState.load(state_dir)
    if existing and any(_running(p, existing) for p in existing.pids.values()):
        if all(_running(p, existing) for p in existing.pids.values()):
            print(f"stack already running (state dir {state_dir})", file=sys.stderr)
            return existing
        raise StackError(f"a previous stack in {state_dir} is half running; run `down` first")
    if s3 == "auto":
        s3 = "minio" if shutil.which("minio") else "moto"
    if s3 == "minio" and not shutil.which("minio"):
        raise StackError("--s3 minio: no `minio` binary on PATH (install MinIO or use --s3 moto)")
    if s3 == "moto" and not (BIN / "moto_server").exists():
        raise StackError(f"--s3 moto: {BIN / 'moto_server'} missing; pip install 'moto[server]'")
    ports = {name: base_port + off for name, off in PORT_OFFSETS.items()}
    ports.update(port_overrides or {})
    worker_ports = (base_port + WORKER_PORT_OFFSETS[0], base_port + WORKER_PORT_OFFSETS[1])
    needed = dict(ports)
    if s3 != "minio":
        needed.pop("s3_console")
    busy = [f"{name}={port}" for name, port in needed.items() if not _port_free(port)]
    busy += [f"worker port {p}" for p in range(worker_ports[0], worker_ports[1] + 1) if not _port_free(p)][:3]
    if busy:
        raise StackError(f"ports in use: {', '.join(busy)}; choose another --base-port")

    state_dir.mkdir(parents=True, exist_ok=True)
    # Ray puts unix sockets under its temp dir: keep the path short (sun_path is 107 bytes).
    ray_temp = tempfile.mkdtemp(prefix="vmae-ray-", dir="/tmp")
    state = StackState(
        state_dir=str(state_dir),
        s3_backend=s3,
        bucket=bucket,
        ports=ports,
        worker_ports=worker_ports,
        ray_temp_dir=ray_temp,
        started_at=time.time(),
    )
    _write_env_file(state)
    state.save()
    env = _service_env(state)
    try:  # the three start independently (MLflow touches S3 only when artifacts arrive): start together
        print(
            f"starting S3 ({s3}) on {state.s3_url}, MLflow on {state.mlflow_url}, "
            f"Ray head with dashboard on {state.dashboard_url} ...",
            file=sys.stderr,
        )
        t0 = time.monotonic()
        (Path(state_dir) / "mlflow").mkdir(exist_ok=True)
        if s3 == "minio":
            (Path(state_dir) / "minio" / "data").mkdir(parents=True, exist_ok=True)
        for name, (cmd, service_env) in service_specs(state, env, num_cpus, object_store_memory).items():
            _spawn(name, cmd, service_env, state)
        _wait_ready(state, env)
        print(f"ready in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    except BaseException:
        down(state_dir, quiet=True)
        raise
    return state


def down(state_dir: Path, purge: bool = False, keep_ray_logs: bool = False, quiet: bool = False) -> list[int]:
    """Stop every process of the stack; returns pids that would not die (normally none)."""
    state_dir = state_dir.expanduser().resolve()
    state = StackState.load(state_dir)
    if state is None:
        if not quiet:
            print(f"no stack state in {state_dir}: nothing to stop", file=sys.stderr)
        return []
    # Ray first (it drains running jobs), then the services it writes to.
    for name in ("ray", "mlflow", "s3"):
        pid = state.pids.get(name)
        if pid:
            t0 = time.monotonic()
            _stop_group(pid, state, timeout=40 if name == "ray" else 15, leader_only=name == "ray")
            if not quiet:
                print(f"stopped {name} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    for pid in stack_pids(state):  # e.g. a Ray worker that left its group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    stuck = stack_pids(state)
    if not keep_ray_logs:
        shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    state.pids = {}
    state.save()
    if purge:
        shutil.rmtree(state_dir, ignore_errors=True)
    if not quiet:
        print("stack stopped" + (f"; still running: {stuck}" if stuck else ""), file=sys.stderr)
    return stuck


def status(state_dir: Path) -> dict[str, dict]:
    """Per service: pid, alive, URL, health; for scripts (`status --json`) and humans."""
    state = StackState.load(state_dir.expanduser().resolve())
    if state is None:
        return {}
    token = state.token_path.read_text().strip() if state.token_path.exists() else ""
    checks = {
        "s3": (state.s3_url, lambda: _http_status(state.s3_url) < 500),
        "mlflow": (state.mlflow_url, lambda: _http_status(state.mlflow_url + "/health") == 200),
        "ray": (
            state.dashboard_url,
            lambda: (
                _http_status(state.dashboard_url + "/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
            ),
        ),
    }
    out = {}
    for name, (url, check) in checks.items():
        pid = state.pids.get(name)
        try:
            healthy = _running(pid, state) and check()
        except Exception:  # noqa: BLE001 - unreachable means unhealthy
            healthy = False
        out[name] = {
            "pid": pid,
            "alive": _running(pid, state),
            "healthy": healthy,
            "url": url,
            "log": str(state.logs_dir / f"{name}.log"),
        }
    return out


def env_lines(state: StackState) -> str:
    """Shell lines for `eval`: public values inline; credentials sourced from the 0600 file, never printed."""
    env = job_environment(state)
    lines = [f"unset {name}" for name in SHADOWING_VARS]
    lines += [f"export {k}={env[k]}" for k in PUBLIC_VARS]
    lines.append(f". {state.env_file}  # S3 credentials (0600 file)")
    return "\n".join(lines)


def _summary(state: StackState) -> str:
    state_flag = f" --state-dir {state.state_dir}" if Path(state.state_dir) != default_state_dir() else ""
    b = state.bucket
    return f"""local stack is up (everything on 127.0.0.1):
  Ray dashboard + job server  {state.dashboard_url}   token auth on, token in {state.token_path}
  S3 ({state.s3_backend})  {state.s3_url}   bucket s3://{b}
  MLflow      {state.mlflow_url}   artifacts in s3://{b}/mlflow
  logs        {state.logs_dir}   Ray: {state.ray_temp_dir}/session_latest/logs

load the job environment in your shell (credentials stay in the 0600 file):
  eval "$(python infra/local/stack.py env{state_flag})"
then, e.g.:
  ray job submit --working-dir . -- \\
      python jobs/pretrain.py --config configs/pretrain_tiny_demo.yaml \\
      --set data.uri=s3://{b}/videos --set storage_path=s3://{b}/runs"""


def _parse_port_override(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in PORT_OFFSETS or not value.isdigit():
        names = ", ".join(PORT_OFFSETS)
        raise argparse.ArgumentTypeError(f"--port {text!r}: expected NAME=PORT with NAME one of {names}")
    return name, int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("VIDEOMAE_STACK_DIR") or default_state_dir()),
        help="pids, ports, logs, SQLite, secrets (default: $VIDEOMAE_STACK_DIR or %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack", parents=[common])
    p_up.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help=f"first of a block of 120 ports (default %(default)s); offsets: {PORT_OFFSETS}",
    )
    p_up.add_argument(
        "--port",
        action="append",
        type=_parse_port_override,
        default=[],
        metavar="NAME=PORT",
        help="override one port, e.g. --port dashboard=8265 --port mlflow=5000",
    )
    p_up.add_argument(
        "--s3",
        choices=("auto", "minio", "moto"),
        default="auto",
        help="S3 server: minio if on PATH else moto_server (default %(default)s)",
    )
    p_up.add_argument("--bucket", default=DEFAULT_BUCKET)
    p_up.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    p_up.add_argument("--object-store-memory", type=int, default=None, help="bytes (default: Ray's choice)")
    p_down = sub.add_parser("down", help="stop the stack", parents=[common])
    p_down.add_argument("--purge", action="store_true", help="also delete the state dir (data, secrets)")
    p_down.add_argument("--keep-ray-logs", action="store_true", help="keep Ray's temp dir with its logs")
    sub.add_parser("env", help="print shell lines that load the job environment (for eval)", parents=[common])
    p_status = sub.add_parser("status", help="show services, ports, health", parents=[common])
    p_status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            state = up(
                args.state_dir,
                args.base_port,
                args.s3,
                args.bucket,
                args.num_cpus,
                args.object_store_memory,
                dict(args.port),
            )
            print(_summary(state))
        elif args.command == "down":
            return 1 if down(args.state_dir, purge=args.purge, keep_ray_logs=args.keep_ray_logs) else 0
        elif args.command == "env":
            state = StackState.load(args.state_dir.expanduser().resolve())
            if state is None or not state.pids:
                raise StackError(f"no running stack in {args.state_dir}; run `up` first")
            print(env_lines(state))
        elif args.command == "status":
            report = status(args.state_dir)
            if args.json:
                print(json.dumps(report, indent=2))
            elif not report:
                print(f"no stack in {args.state_dir}")
            else:
                for name, s in report.items():
                    health = "healthy" if s["healthy"] else ("not answering" if s["alive"] else "stopped")
                    print(f"{name:7s} {health:22s} {s['url']:28s} pid {s['pid']}  log {s['log']}")
            return 0 if report and all(s["healthy"] for s in report.values()) else 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
