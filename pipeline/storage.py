"""One URI scheme for data, checkpoints and exports: ``/local/path``, ``file://...`` or ``s3://bucket/key``.

The S3 endpoint, region and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``), so MinIO, Ceph,
moto and AWS all work without code changes. Credentials are never part of a URI we log.

Outages: an S3 call that fails for a reason of the connection or the service (refused, timed out, 5xx,
throttled) is retried with exponential backoff and jitter for ``VIDEOMAE_STORAGE_RETRY_S`` seconds
(default 300) before it raises ``StorageUnavailable``; a missing object or a refused permission raises at
once. Ray Train's checkpoint uploads go through ``s3_filesystem_for_uploads()``, a pyarrow filesystem
whose every call retries the same way. ``s3_client()`` is a boto3 client for what pyarrow cannot do (a GET
streamed whole: ``shards.iter_shard``); ``s3_os_error`` turns its errors into the ones retried here.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import urllib3.exceptions
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

RETRY_ENV = "VIDEOMAE_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
# what the AWS SDK (through pyarrow) says when the connection or the service failed, not the request; a
# ConnectionError or TimeoutError (what s3_os_error makes of boto3's) is transient whatever it says
TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|INTERNAL_FAILURE|REQUEST_TIMEOUT|"
    r"RequestTimeout|Connection refused|timed out|HTTP (?:status|response code:?) 5\d\d"
)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp")


class StorageError(RuntimeError):
    """A URI that cannot be reached, listed, read or written; the message names the URI."""


class ObjectNotFound(StorageError):
    """The URI names nothing (a subclass, so callers can tell "missing" from "unreachable")."""


class StorageUnavailable(StorageError):
    """Storage did not answer for the whole retry window: an outage, not a problem of the object."""


def retry_window_s() -> float:
    """Seconds a failing S3 call is retried (``VIDEOMAE_STORAGE_RETRY_S``, default 300)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        value = os.environ[RETRY_ENV]
        raise StorageError(f"{RETRY_ENV} must be a number of seconds, got {value!r}") from None


def retrying(what: str, uri: str, call: Callable, window_s: float | None = None):
    """``call()``, retried while S3 fails transiently, for ``window_s`` (default: the retry window)."""
    if not is_s3(uri):
        return call()
    window = retry_window_s() if window_s is None else window_s
    deadline, delay, attempt = time.monotonic() + window, 0.5, 0
    while True:
        try:
            return call()
        except OSError as e:
            transient = isinstance(e, (ConnectionError, TimeoutError)) or TRANSIENT.search(str(e))
            if isinstance(e, FileNotFoundError) or not transient:
                raise
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(
                    f"cannot {what} {redact(uri)!r}: storage unreachable for {window:.0f} s ({attempt} "
                    f"attempts; {RETRY_ENV} sets the window): {e}"
                ) from e
            if attempt == 1 or attempt % 10 == 0:
                log.warning("storage unreachable (%s %s), retrying for up to %.0f s more: %s", what,
                            redact(uri), left, str(e)[:200])
            time.sleep(min(delay * random.uniform(0.5, 1.5), left))
            delay = min(delay * 2, 15.0)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def redact(text: str) -> str:
    """Strip ``user:secret@`` credentials embedded in a URI so it is safe to log."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    # a dead endpoint fails within seconds, and retrying (not the SDK) paces the retries and logs them
    kwargs: dict = {"region": region, "connect_timeout": 10, "request_timeout": 60,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow S3 filesystem configured from the environment (credentials are read by the AWS SDK)."""
    return _s3_filesystem(s3_endpoint(), _region())


@lru_cache(maxsize=8)
def _s3_client(pid: int, endpoint: str | None, region: str) -> BaseClient:
    import boto3
    from botocore.config import Config

    # as _s3_filesystem: timeouts that fail a dead endpoint in seconds, the SDK's retries few (retrying
    # paces them), path-style addressing with an endpoint (MinIO / Ceph hostnames have no bucket subdomains)
    retries = {"mode": "standard", "total_max_attempts": 3}
    config = Config(connect_timeout=10, read_timeout=60, retries=retries,
                    s3={"addressing_style": "path"} if endpoint else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client() -> BaseClient:
    """A boto3 S3 client configured from the environment like ``s3_filesystem()``: one per process and
    endpoint (clients are thread-safe and slow to make, so they are shared; a forked child makes its own)."""
    return _s3_client(os.getpid(), s3_endpoint(), _region())


# urllib3's errors of a connection cut or stalled mid-body, should one come through a response unwrapped
_CUT = (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError)
S3_ERRORS = (BotoCoreError, ClientError, *_CUT)  # what a boto3 call may raise
_BOTO_TRANSIENT = (BotoConnectionError, HTTPClientError, IncompleteReadError, *_CUT)
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
               "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable"}


def s3_os_error(e: Exception) -> OSError:
    """A boto3 error (one of ``S3_ERRORS``) as the OSError this module's callers handle: a missing object
    or bucket -> FileNotFoundError; the connection or the service failing (refused, reset, timed out, cut
    mid-body, 5xx, throttled) -> ConnectionError, which ``retrying`` retries; anything else (a refused
    permission, no credentials) -> a plain OSError, raised at once."""
    text = redact(f"{type(e).__name__}: {e}")
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_CODES or status == 404:
            return FileNotFoundError(text)
        if code in _BUSY_CODES or status >= 500 or status == 429:
            return ConnectionError(text)
        return OSError(text)
    return ConnectionError(text) if isinstance(e, _BOTO_TRANSIENT) else OSError(text)


def s3_filesystem_for_uploads() -> pafs.FileSystem:
    """The S3 filesystem for writers outside this module (Ray Train's checkpoint uploads and its run
    state): every call retried through outages like this module's own (``RetryingS3``)."""
    return pafs.PyFileSystem(RetryingS3())


class RetryingS3(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over ``s3_filesystem()`` whose calls retry through outages.

    Writes are spooled (memory, then a temporary file) and uploaded whole on close, so an upload cut off
    by an outage is retried as a whole object, never left half-written. It pickles without credentials:
    each process builds its S3 client from its own environment (Ray pickles the filesystem it is given,
    and a pickled ``pyarrow.fs.S3FileSystem`` keeps neither its retry strategy nor its secrets private).
    """

    def __reduce__(self):
        return RetryingS3, ()

    @property
    def fs(self) -> pafs.S3FileSystem:
        return s3_filesystem()

    def _call(self, what: str, path: str, fn: Callable):
        return retrying(what, "s3://" + path, fn)

    def get_type_name(self) -> str:
        return "retrying-s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other) -> bool:
        return isinstance(other, RetryingS3)

    def get_file_info(self, paths):
        return self._call("reach", paths[0] if paths else "", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._call("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._call("create", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._call("delete", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call("delete", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise StorageError("refusing to delete the contents of every bucket")

    def delete_file(self, path):
        self._call("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._call("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._call("copy", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._call("read", path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path):
        return self._call("read", path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_SpooledUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise StorageError(f"S3 cannot append to {path!r}")


class _SpooledUpload(io.RawIOBase):
    """The file object behind ``RetryingS3.open_output_stream``: collects the bytes, uploads on close."""

    def __init__(self, handler: RetryingS3, path: str, metadata) -> None:
        self.handler, self.path, self.metadata = handler, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 - closed in close()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.spool.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            def put() -> None:
                self.spool.seek(0)
                with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as out:
                    while chunk := self.spool.read(8 << 20):
                        out.write(chunk)

            self.handler._call("write", self.path, put)
        finally:
            self.spool.close()
            super().close()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it)."""
    if not uri:
        raise StorageError("empty storage URI")
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"S3 URI has no bucket: {redact(uri)!r}")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {redact(uri)!r} (use a local path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """``s3://`` URIs as they are, local paths made absolute: every Ray worker must read them the same."""
    return uri if is_s3(uri) else str(Path(resolve(uri)[1]))


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def relative_to(uri: str, root: str) -> str:
    """Path of ``uri`` below ``root`` (both URIs of the same kind)."""
    _, path = resolve(uri)
    _, root_path = resolve(root)
    rel = posixpath.relpath(path, root_path)
    if rel == ".." or rel.startswith("../"):
        raise StorageError(f"{redact(uri)!r} is not below {redact(root)!r}")
    return rel


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return retrying("reach", uri, lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"cannot reach {redact(uri)!r}: {e}") from e


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return retrying("reach", uri, lambda: fs.get_file_info(path)).type == pafs.FileType.Directory
    except OSError as e:
        raise StorageError(f"cannot reach {redact(uri)!r}: {e}") from e


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Every file below ``uri`` (recursively) as sorted ``(uri, size_bytes)``, filtered by suffix."""
    fs, path = resolve(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=False)
    try:
        infos = retrying("list", uri, lambda: fs.get_file_info(selector))
    except FileNotFoundError as e:
        raise StorageError(f"nothing to list at {redact(uri)!r}: not found") from e
    except OSError as e:
        raise StorageError(f"cannot list {redact(uri)!r}: {e}") from e
    prefix = "s3://" if is_s3(uri) else ""
    out = [
        (prefix + info.path, info.size or 0)
        for info in infos
        if info.type == pafs.FileType.File and (wanted is None or info.path.lower().endswith(wanted))
    ]
    return sorted(out)


def _read(uri: str, read: Callable[[pafs.FileSystem, str], bytes]) -> bytes:
    """``read(fs, path)`` retried through outages; a missing object is ObjectNotFound."""
    fs, path = resolve(uri)
    try:
        return retrying("read", uri, lambda: read(fs, path))
    except FileNotFoundError as e:
        raise ObjectNotFound(f"not found: {redact(uri)!r}") from e
    except OSError as e:
        raise StorageError(f"cannot read {redact(uri)!r}: {e}") from e


def read_bytes(uri: str) -> bytes:
    def whole(fs: pafs.FileSystem, path: str) -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _read(uri, whole)


def read_bytes_range(uri: str, start: int, length: int) -> bytes:
    """At most ``length`` bytes of ``uri`` from ``start`` (one ranged GET): a header, a shard's member."""

    def ranged(fs: pafs.FileSystem, path: str) -> bytes:
        with fs.open_input_file(path) as f:
            return f.read_at(length, start) if start < f.size() else b""

    return _read(uri, ranged)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        retrying("create", uri, lambda: fs.create_dir(path, recursive=True))
    except OSError as e:
        raise StorageError(f"cannot create {redact(uri)!r}: {e}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a half-written file.

    S3 PUTs are atomic already; locally we write a temporary sibling and rename it into place.
    """
    fs, path = resolve(uri)

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    try:
        if is_s3(uri):
            retrying("write", uri, put)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        raise StorageError(f"cannot write {redact(uri)!r}: {e}") from e


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` atomically."""
    with open(local_path, "rb") as f:
        write_bytes(uri, f.read())


def delete(uri: str, recursive: bool = False) -> None:
    fs, path = resolve(uri)
    info = retrying("reach", uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory:
        if not recursive:
            raise StorageError(f"{redact(uri)!r} is a directory; pass recursive=True")
        retrying("delete", uri, lambda: fs.delete_dir(path))
    elif info.type == pafs.FileType.File:
        retrying("delete", uri, lambda: fs.delete_file(path))


def check_reachable(uri: str) -> None:
    """Fail early with a clear message when the bucket (or local parent) of ``uri`` does not exist."""
    fs, path = resolve(uri)
    root = path.split("/", 1)[0] if is_s3(uri) else os.path.dirname(path.rstrip("/")) or "/"
    try:  # a start-up check: a short retry, so a wrong endpoint fails in seconds, not minutes
        info = retrying("reach", uri, lambda: fs.get_file_info(root), window_s=min(10.0, retry_window_s()))
    except OSError as e:
        raise StorageError(f"cannot reach {redact(uri)!r}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        what = "bucket" if is_s3(uri) else "parent folder"
        raise StorageError(f"{what} {root!r} of {redact(uri)!r} does not exist")
