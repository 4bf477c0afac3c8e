"""Session fixtures that start real components once: an S3-compatible server, local Ray, an MLflow server.

Each server binds 127.0.0.1 on a free port and is stopped when the session ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Fake credentials for the local S3 server; set before anything (Ray workers included) starts.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class S3Server:
    """moto_server on a fixed 127.0.0.1 port that a test can stop and start again (an outage); moto keeps
    its objects in memory, so ``snapshot`` / ``restore`` carry them over a restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_http(self.endpoint + "/moto-api/")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def _client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def snapshot(self) -> dict[str, dict[str, bytes]]:
        client, out = self._client(), {}
        for bucket in client.list_buckets()["Buckets"]:
            name, out[bucket["Name"]] = bucket["Name"], {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    out[name][obj["Key"]] = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
        return out

    def restore(self, snapshot: dict[str, dict[str, bytes]]) -> None:
        client = self._client()
        for name, objects in snapshot.items():
            client.create_bucket(Bucket=name)
            for key, body in objects.items():
                client.put_object(Bucket=name, Key=key, Body=body)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (moto_server) on 127.0.0.1; AWS_ENDPOINT_URL points at it."""
    server = S3Server()
    server.start()
    try:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        yield server
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        server.stop()


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
