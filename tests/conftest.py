"""Session fixtures that start real components once: an S3-compatible server, local Ray, an MLflow server.

Each server binds 127.0.0.1 on a free port and is stopped when the session ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["helpers.watchdog"]  # a hard bound on every test (see there)
BIN = Path(sys.executable).parent

# Fake credentials for the local S3 server; set before anything (Ray workers included) starts.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller looks at its workers every 2 s by default, so each run's end and each failure is
# seen up to 2 s late: about 2 s a run, over some 25 runs in the suite. Polling only; nothing else changes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# A lost node is declared dead after its raylet misses health checks: Ray's defaults (a check every 3 s,
# 5 misses) leave an elastic test waiting on the order of 20 s per loss; these find it within seconds, and
# still allow a raylet a few seconds of a loaded machine. Set in the environment of the process that starts
# the GCS (it reads them once).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                   "RAY_health_check_failure_threshold": "4"}


_HANDED_OUT: set[int] = set()


@dataclass(frozen=True)
class Background:
    """A test file whose work runs in a script of its own (tests/helpers/), started when the file's tests
    are collected so that it overlaps the tests before them; the tests read its ``RESULT {json}`` lines.
    ``idle`` lets it run only on the CPU the rest of the suite leaves idle (the suite is start-up bound:
    processes importing, polls and waits leave a share of both cores unused)."""

    script: str
    env: dict[str, str] = field(default_factory=dict)
    idle: bool = False  # run under SCHED_IDLE: only on CPU no other process wants (Ray's own workers run
    # at nice 15, which a nice 19 process still takes a third of a core from)


BACKGROUND = {
    "test_nearly_full_cluster.py": Background("nearly_full_cluster.py", FAST_NODE_DEATH),  # mostly waits
    "test_learning.py": Background("learning_run.py", idle=True),  # pure compute
}
_STARTED = pytest.StashKey[dict[str, tuple[Path, subprocess.Popen]]]()


def free_port() -> int:
    """A free port on 127.0.0.1, never one this session handed out before: a component started with
    several ports (a Ray node takes eight) binds them later, so the OS could offer one of them twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as e:  # noqa: BLE001 - any failure means "not up yet"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up in {timeout}s: {e}") from e
            time.sleep(0.3)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Forwarder:
    """A TCP forwarder on 127.0.0.1:``port`` to ``target``: what clients see as the S3 server. Closing it
    (listener and open connections) is an outage with the objects kept, as a real store comes back."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the outage began
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):  # wakes the accepting thread (close alone would not)
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self.connections = []


class S3Server:
    """moto_server behind a forwarder on a fixed 127.0.0.1 port; ``stop()`` / ``start()`` take the
    endpoint away and bring it back, the objects kept (an outage of the store, not a loss of its data)."""

    def __init__(self) -> None:
        self.port, self._moto_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._moto = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self._moto_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._forwarder = _Forwarder(self.port, self._moto_port)
        wait_http(f"http://127.0.0.1:{self._moto_port}/moto-api/")
        self.start()

    def start(self) -> None:
        self._forwarder.open()
        wait_http(self.endpoint + "/moto-api/")

    def stop(self) -> None:
        self._forwarder.close()

    def shutdown(self) -> None:
        self._forwarder.close()
        stop_process(self._moto)


def _scheduling() -> tuple[int, int] | None:
    """This thread's scheduling policy and priority (None where the OS has no such call)."""
    if not hasattr(os, "sched_getscheduler"):
        return None
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


# what the suite started under (a user may run it under nice or SCHED_BATCH)
_STARTING_SCHEDULING = _scheduling()


@pytest.fixture(autouse=True)
def _scheduling_unchanged() -> Iterator[None]:
    """Fail a test that leaves the test process under another scheduling policy or priority (a native library
    can switch it to real time: tests/helpers/codec_videos.py), and put it back: every process the suite
    starts later would inherit it, and real-time threads that spin starve the rest, timeouts included."""
    yield
    left = _scheduling()
    if left != _STARTING_SCHEDULING:
        policy, priority = _STARTING_SCHEDULING
        os.sched_setscheduler(0, policy, os.sched_param(priority))
        pytest.fail(f"the test left the test process under scheduling policy {left[0]} at priority "
                    f"{left[1]} (it started under {policy} at {priority}); put back")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (moto_server) on 127.0.0.1; AWS_ENDPOINT_URL points at it."""
    server = S3Server()
    try:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        yield server
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        server.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: S3Server) -> str:
    return s3_server.endpoint


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket per test; returns its ``s3://`` URI."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str) -> Iterator[None]:
    """One local Ray instance for the whole session (ray.init costs seconds).

    Depends on the S3 server so that Ray's workers inherit AWS_ENDPOINT_URL and the test credentials.
    """
    import ray

    ray.init(address="local", num_cpus=4, resources={"decode": 2}, include_dashboard=False)  # as decode nodes
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend; returns its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    # the job-execution feature spawns background workers this project never uses
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_http(uri + "/health", timeout=240)
            yield uri
        finally:
            stop_process(proc)


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated labeled sample dataset (tiny: few videos, small frames), made once per session."""
    from pipeline.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("sample-videos")
    make_dataset(str(root), videos_per_class=3, num_frames=24, size=(48, 64), seed=0)
    return root


def _sched_idle() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: the lowest nice is the next best
        os.nice(19)


def launch(test_file: str) -> tuple[Path, subprocess.Popen]:
    """``test_file``'s background script in a process of its own, its output in ``<work>/output.log``."""
    job = BACKGROUND[test_file]
    # the last run's folder is kept for a failure
    work = Path(tempfile.gettempdir()) / f"{Path(job.script).stem}-{os.getuid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    with open(work / "output.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers" / job.script), str(work)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **job.env},
                                preexec_fn=_sched_idle if job.idle else None)
    return work, proc


def background_results(config: pytest.Config, test_file: str, timeout: float) -> tuple[list[dict], str]:
    """The ``RESULT`` lines and whole output of ``test_file``'s script: the one started at collection, else
    one started now (kept with the others, so that the session's end stops it too); fails the test if
    the script failed."""
    started = config.stash.setdefault(_STARTED, {})
    if test_file not in started:
        started[test_file] = launch(test_file)
    work, proc = started[test_file]
    code = proc.wait(timeout=timeout)
    log = (work / "output.log").read_text(errors="replace")
    assert code == 0, log[-6000:]
    return [json.loads(line[len("RESULT "):]) for line in log.splitlines() if line.startswith("RESULT ")], log


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start each background script as soon as its tests are selected."""
    started = session.config.stash.setdefault(_STARTED, {})
    for test_file in BACKGROUND:
        if any(test_file in item.nodeid for item in session.items):
            started[test_file] = launch(test_file)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for _, proc in session.config.stash.get(_STARTED, {}).values():
        if proc.poll() is None:  # its test did not run (deselected, or the session stopped early)
            stop_process(proc)
