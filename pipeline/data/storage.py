"""One URI scheme for data, checkpoints and exports: ``/local/path``, ``file://...`` or ``s3://bucket/key``.

The S3 endpoint, region and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``), so MinIO, Ceph,
moto and AWS all work without code changes. Credentials are never part of a URI we log.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp")


class StorageError(RuntimeError):
    """A URI that cannot be reached, listed, read or written; the message names the URI."""


class ObjectNotFound(StorageError):
    """The URI names nothing (a subclass, so callers can tell "missing" from "unreachable")."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def redact(text: str) -> str:
    """Strip ``user:secret@`` credentials embedded in a URI so it is safe to log."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow S3 filesystem configured from the environment (credentials are read by the AWS SDK)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_filesystem(s3_endpoint(), region)


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
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"cannot reach {redact(uri)!r}: {e}") from e


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError as e:
        raise StorageError(f"cannot reach {redact(uri)!r}: {e}") from e


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Every file below ``uri`` (recursively) as sorted ``(uri, size_bytes)``, filtered by suffix."""
    fs, path = resolve(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=False))
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


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise ObjectNotFound(f"not found: {redact(uri)!r}") from e
    except OSError as e:
        raise StorageError(f"cannot read {redact(uri)!r}: {e}") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise StorageError(f"cannot create {redact(uri)!r}: {e}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a half-written file.

    S3 PUTs are atomic already; locally we write a temporary sibling and rename it into place.
    """
    fs, path = resolve(uri)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
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
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        if not recursive:
            raise StorageError(f"{redact(uri)!r} is a directory; pass recursive=True")
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def check_reachable(uri: str) -> None:
    """Fail early with a clear message when the bucket (or local parent) of ``uri`` does not exist."""
    fs, path = resolve(uri)
    root = path.split("/", 1)[0] if is_s3(uri) else os.path.dirname(path.rstrip("/")) or "/"
    try:
        info = fs.get_file_info(root)
    except OSError as e:
        raise StorageError(f"cannot reach {redact(uri)!r}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        what = "bucket" if is_s3(uri) else "parent folder"
        raise StorageError(f"{what} {root!r} of {redact(uri)!r} does not exist")
