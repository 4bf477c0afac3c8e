"""S3 calls through an outage: retried with backoff for the window, then ``StorageUnavailable``; what is
not an outage (a missing object or bucket) fails at once; the upload filesystem Ray Train is given retries
the same way and pickles without credentials (a real moto_server of its own, stopped and started)."""

from __future__ import annotations

import pickle
import threading
import time

import boto3
import pytest
from conftest import S3Server

from pipeline import storage


@pytest.fixture
def own_server(monkeypatch):
    """A second moto_server this test may stop, with AWS_ENDPOINT_URL pointing at it meanwhile."""
    server = S3Server()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="outage")
    try:
        yield server
    finally:
        server.shutdown()


def test_a_read_waits_out_a_short_outage(own_server, monkeypatch):
    storage.write_bytes("s3://outage/a.bin", b"x" * 100)
    own_server.stop()
    monkeypatch.setenv(storage.RETRY_ENV, "60")

    def come_back() -> None:
        time.sleep(4)
        own_server.start()

    threading.Thread(target=come_back).start()
    started = time.monotonic()
    assert storage.read_bytes("s3://outage/a.bin") == b"x" * 100
    assert time.monotonic() - started >= 3.5


def test_an_outage_longer_than_the_window_is_named_and_not_a_missing_object(own_server, monkeypatch):
    with pytest.raises(storage.ObjectNotFound):  # not an outage: at once, no retries
        storage.read_bytes("s3://outage/missing.bin")
    own_server.stop()
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=r"cannot read 's3://outage/a.bin': storage "
                                                         r"unreachable for 2 s .*VIDEOMAE_STORAGE_RETRY_S"):
        storage.read_bytes("s3://outage/a.bin")
    assert 2 <= time.monotonic() - started < 20
    with pytest.raises(storage.StorageUnavailable, match="cannot write"):
        storage.write_bytes("s3://outage/b.bin", b"y")
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(storage.StorageError, match="VIDEOMAE_STORAGE_RETRY_S must be a number"):
        storage.read_bytes("s3://outage/a.bin")


def test_the_upload_filesystem_retries_and_carries_no_secret(own_server, monkeypatch):
    fs = storage.s3_filesystem_for_uploads()
    assert b"testing" not in pickle.dumps(fs)  # the credentials stay in each process's environment
    fs = pickle.loads(pickle.dumps(fs))
    with fs.open_output_stream("outage/ckpt/model.bin") as out:  # spooled, uploaded whole on close
        out.write(b"w" * 5000)
    assert storage.read_bytes("s3://outage/ckpt/model.bin") == b"w" * 5000
    own_server.stop()
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    with pytest.raises(storage.StorageUnavailable, match="cannot reach"):
        fs.get_file_info("outage/ckpt/model.bin")
