"""Videos packed into WebDataset tar shards: a few hundred videos per object, read with one GET each.

Object storage bills and rate-limits per request, and one GET per clip is a request rate that grows with
the training cluster (docs/preprocessing.md, "Shards"; benchmarks/data_scale.py counts them). A shard is
a plain POSIX (ustar) tar whose members come in consecutive groups per sample, ``<key>.<ext>`` (the video)
then ``<key>.json`` (its metadata): the layout WebDataset reads, so shards written here feed WebDataset
pipelines, and the datasets WebDataset users already have (``<key>.mp4`` + ``<key>.cls`` / ``.json`` /
``.txt``, keys with folders) read here.

- :class:`ShardWriter` builds each shard in a local temporary file and publishes it whole when it is full
  (rename locally, one upload to S3), so a reader never sees half a shard.
- :func:`write_index` / :func:`read_index`: one Parquet row per video with the byte offset of its data in
  its shard, so one ranged GET (:func:`read_sample`) fetches one video without reading the shard.
- :func:`iter_shard` streams a shard sequentially (on S3 one streamed GET), resuming at the byte reached
  after a transient storage failure; a damaged tar yields the samples before the damage, then raises
  :class:`CorruptShard`.
- :func:`list_shards`: a folder / prefix, a brace pattern ``train-{000000..000099}.tar``, or a ``.txt``
  list of shard URIs.

pyarrow's S3 input files issue one ranged GET per read call (64 for a 1 GiB shard read 16 MiB at a time),
so the stream is a boto3 GET of the whole object instead, its body read ``chunk_bytes`` at a time: one GET
per shard where per-video reads cost one per video (plus pyarrow's HEAD). A failure mid-body costs one more
GET, of ``bytes=<byte reached>-``, and re-fetches at most the read in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import ObjectNotFound, StorageError, redact

if TYPE_CHECKING:
    from botocore.response import StreamingBody

log = logging.getLogger(__name__)

INDEX = "index.parquet"
READ_CHUNK = 16 << 20  # bytes per read of a streamed shard (its buffer): a resume re-fetches at most that
# what a shard's video member may be called: the storage's video suffixes without the dot
VIDEO_EXTS = tuple(s[1:] for s in storage.VIDEO_SUFFIXES)
MAX_KEY = 80  # key + "." + ext stays within ustar's 100-byte name field
_BLOCK = tarfile.BLOCKSIZE
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PREFIX = re.compile(r"[A-Za-z0-9_]+")
_WDS_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's own members (e.g. __index__), not samples
_BRACE = re.compile(r"\{([^{}]*)\}")

INDEX_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # shard file name relative to the index's folder
        ("key", pa.string()),  # the sample key in the tar
        ("ext", pa.string()),  # the video member's extension (mp4, webm, ...)
        ("offset", pa.int64()),  # byte offset of the video member's data in the shard
        ("bytes", pa.int64()),  # its length: [offset, offset + bytes) is the video file
        ("frames", pa.int64()),
        ("label", pa.int64()),  # -1 unlabeled
        ("split", pa.string()),
        ("path", pa.string()),  # the video's original path (meta "path"), where given
        ("shard_size", pa.int64()),  # bytes of the whole shard: a resumed job checks it
    ]
)


class CorruptShard(Exception):
    """A shard that is not a readable tar from ``offset`` on (truncated or damaged): the samples before it
    were yielded, the rest of the shard is one bad entry. Not a ``StorageError``: retrying cannot help."""

    def __init__(self, uri: str, offset: int, detail: str) -> None:
        super().__init__(f"corrupt shard {redact(uri)!r} at byte {offset}: {detail}")
        self.uri, self.offset = uri, offset


@dataclass
class ShardSample:
    """One sample of a shard. ``video`` is None when the group has no video member; ``error`` says what is
    wrong with the sample (no video, unreadable ``.json`` / ``.cls``), None when nothing is."""

    key: str
    video: bytes | None
    ext: str | None
    meta: dict[str, Any]
    name: str  # "<shard uri>#<key>", for error reports
    label: int = -1
    error: str | None = None


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def safe_key(key: str) -> str:
    """A WebDataset key (no dots, no slashes) for ``key``: itself when already safe, else the unsafe runs
    replaced by ``_`` plus a hash of the original, so distinct inputs stay distinct and reruns agree."""
    if _SAFE_KEY.fullmatch(key) and len(key) <= MAX_KEY:
        return key
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
    mapped = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")[: MAX_KEY - 9]
    return f"{mapped}_{digest}" if mapped else digest


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def _closed_size(offset: int) -> int:
    """The size of a tar whose members end at ``offset`` once closed: the end marker (two zero blocks),
    padded to tarfile's 10 KiB records."""
    return -(-(offset + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes samples into ``<root>/<prefix>-NNNNNN.tar`` shards of about ``shard_bytes`` each (a video
    larger than that gets a shard of its own; ``None``: everything into one shard, number ``first``)."""

    def __init__(
        self, root_uri: str, shard_bytes: int | None = 1 << 30, prefix: str = "shard", first: int = 0
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"shard prefix must be letters, digits or '_', got {prefix!r}")
        if shard_bytes is not None and shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.root, self.shard_bytes, self.prefix, self.number = root_uri, shard_bytes, prefix, first
        self.rows: list[dict] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp = ""
        self._open_rows: list[dict] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed job publishes nothing of the shard in progress
            self._discard()

    def add(self, key: str, video: bytes, ext: str, meta: dict) -> None:
        """Append one video and its metadata (label, split, frames, ...): ``<key>.<ext>``, ``<key>.json``."""
        ext = ext.lower().lstrip(".")
        if ext not in VIDEO_EXTS:
            raise ValueError(f"{key!r}: video extension {ext!r} is not one of {', '.join(VIDEO_EXTS)}")
        safe = safe_key(key)
        if safe in self._keys:
            raise ValueError(f"duplicate sample key {key!r} (as {safe!r})")
        meta = dict(meta)
        if safe != key:
            meta.setdefault("path", key)
        data = json.dumps(meta, sort_keys=True, default=str).encode("utf-8")
        need = 2 * _BLOCK + _padded(len(video)) + _padded(len(data))
        limit = self.shard_bytes
        if self._tar is not None and limit is not None and _closed_size(self._tar.offset + need) > limit:
            self._finish()
        if self._tar is None:
            self._start()
        offset = self._member(f"{safe}.{ext}", video)
        self._member(f"{safe}.json", data)
        self._keys.add(safe)
        label = meta.get("label")
        self._open_rows.append({
            "shard": shard_name(self.prefix, self.number), "key": safe, "ext": ext, "offset": offset,
            "bytes": len(video), "frames": meta.get("frames"), "label": -1 if label is None else int(label),
            "split": meta.get("split"), "path": meta.get("path"),
        })  # fmt: skip

    def close(self) -> list[dict]:
        """Publish the shard in progress; returns the index rows of every video written."""
        if self._tar is not None:
            self._finish()
        return self.rows

    def _start(self) -> None:
        dst = storage.join(self.root, shard_name(self.prefix, self.number))
        tag = uuid.uuid4().hex[:12]
        if storage.is_s3(dst):
            os.makedirs(os.path.join(tempfile.gettempdir(), "videomae-shards"), exist_ok=True)
            self._tmp = os.path.join(tempfile.gettempdir(), "videomae-shards", f"{tag}.tar")
        else:  # a hidden sibling: the rename that publishes it stays on one filesystem
            head, name = os.path.split(storage.resolve(dst)[1])
            os.makedirs(head, exist_ok=True)
            self._tmp = os.path.join(head, f".{name}.tmp-{tag}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in _finish

    def _member(self, name: str, data: bytes) -> int:
        """Add one member; returns the byte offset of its data."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed: the same input gives the same shard
        self._tar.addfile(info, io.BytesIO(data))
        return self._tar.offset - _padded(len(data))

    def _finish(self) -> None:
        self._tar.close()
        self._tar = None
        dst = storage.join(self.root, shard_name(self.prefix, self.number))
        size = os.path.getsize(self._tmp)
        try:
            _publish(self._tmp, dst)
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
        self.rows += [{**row, "shard_size": size} for row in self._open_rows]
        self._open_rows = []
        self.number += 1

    def _discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.remove(self._tmp)
        self._open_rows = []


def _publish(local: str, uri: str) -> None:
    """Move a finished shard into place: a rename locally, one streamed upload (retried whole) to S3 —
    ``storage.upload_file`` would hold the whole shard in memory."""
    if not storage.is_s3(uri):
        os.replace(local, storage.resolve(uri)[1])
        return
    fs, path = storage.resolve(uri)

    def put() -> None:
        with open(local, "rb") as src, fs.open_output_stream(path) as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)

    try:
        storage.retrying("write", uri, put)
    except OSError as e:
        raise StorageError(f"cannot write {redact(uri)!r}: {e}") from e


def write_index(rows: list[dict], uri: str) -> None:
    """The shards' index as Parquet (``<shards>/index.parquet`` by convention), sorted by shard and offset."""
    rows = sorted(rows, key=lambda r: (r["shard"], r["offset"]))
    table = pa.Table.from_pylist([{c: r.get(c) for c in INDEX_SCHEMA.names} for r in rows], INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_index(uri: str) -> list[dict]:
    """The index rows (``INDEX_SCHEMA``): where each video's bytes are, for ranged reads and resuming."""
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def read_sample(shard_uri: str, offset: int, nbytes: int) -> bytes:
    """One video through the index: a ranged read of ``[offset, offset + nbytes)`` of its shard (on S3 one
    ranged GET, after the HEAD pyarrow makes on open), retried through outages."""
    data = storage.read_bytes_range(shard_uri, offset, nbytes)
    if len(data) != nbytes:
        raise CorruptShard(shard_uri, offset, f"{len(data)} bytes where the index promises {nbytes}")
    return data


class _Resuming(io.RawIOBase):
    """The bytes of one object from its start, read sequentially; after a transient failure (within the
    storage retry window) it reopens the object and continues at the byte reached.

    On S3 that is one streamed GET of the whole object (boto3: pyarrow's S3 files make a ranged GET per
    read call), its body read as the caller asks; a reopen GETs ``bytes=<pos>-`` of the same version (If-Match
    its ETag: a shard replaced meanwhile is an error, not the old one's head spliced onto the new one's tail).
    Local files are pyarrow input streams (not retried, so never reopened).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = storage.resolve(uri)
        self.pos = 0
        self.size: int | None = None  # S3: the object's, from the first GET
        self.etag: str | None = None
        self.file: pa.NativeFile | StreamingBody | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = storage.retrying("read", self.uri, lambda: self._attempt(len(b)))
        except FileNotFoundError as e:
            raise ObjectNotFound(f"not found: {redact(self.uri)!r}") from e
        except OSError as e:
            raise StorageError(f"cannot read {redact(self.uri)!r} at byte {self.pos}: {e}") from e
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _attempt(self, n: int) -> bytes:
        try:
            if self.file is None:
                if self.size is not None and self.pos >= self.size:
                    return b""  # the connection failed after the last byte: nothing left to GET
                if not storage.is_s3(self.uri):
                    self.file = self.fs.open_input_stream(self.path, compression=None)
                else:
                    self.file = self._get()
            return self.file.read(n)  # on S3 the body's checksum (when it has one) is checked at its end
        except storage.S3_ERRORS as e:  # before OSError: some botocore errors are OSErrors too
            self._drop()
            raise storage.s3_os_error(e) from e
        except OSError:
            self._drop()
            raise

    def _get(self) -> StreamingBody:
        """The object's body from ``pos`` on: one GET whose body the reads then stream."""
        bucket, _, key = self.path.partition("/")
        client = storage.s3_client()
        if self.pos == 0:
            response = client.get_object(Bucket=bucket, Key=key)
            self.size, self.etag = response["ContentLength"], response.get("ETag")
        else:  # reopened after a failure
            log.info("resuming %s at byte %d", redact(self.uri), self.pos)
            same = {"IfMatch": self.etag} if self.etag else {}
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={self.pos}-", **same)
        return response["Body"]

    def _drop(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError, *storage.S3_ERRORS):  # a connection that already failed
                self.file.close()
            self.file = None

    def close(self) -> None:
        self._drop()
        super().close()


class _TarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading headers: it ends silently at a truncated or garbage header past
    the first member, where only a zero block (``EOFHeaderError``) is a proper end of the archive."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.stopped_by = e  # type: ignore[attr-defined]
            raise


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's key and extension: the path up to the first dot of the file name, and the rest."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _sample(uri: str, key: str, members: dict[str, bytes]) -> ShardSample:
    meta: dict[str, Any] = {}
    problems = []
    video_ext = next((e for e in members if e.rsplit(".", 1)[-1] in VIDEO_EXTS), None)
    if video_ext is None:
        problems.append(f"no video member (members: {', '.join(members) or 'none'})")
    if "json" in members:
        try:
            loaded = json.loads(members["json"])
            if not isinstance(loaded, dict):
                raise ValueError("not an object")
            meta.update(loaded)
        except ValueError as e:
            problems.append(f"unreadable .json: {e}")
    if "txt" in members:
        meta.setdefault("txt", members["txt"].decode("utf-8", "replace"))
    label = meta.get("label")
    if label is None and "cls" in members:
        try:
            label = int(members["cls"].decode("ascii").strip())
            meta["label"] = label
        except ValueError:
            problems.append(f"unreadable .cls {members['cls'][:20]!r}")
    try:
        label = -1 if label is None else int(label)
    except (TypeError, ValueError):
        problems.append(f"label {label!r} is not an integer")
        label = -1
    return ShardSample(
        key=key, video=members.get(video_ext) if video_ext else None, ext=video_ext, meta=meta,
        name=f"{redact(uri)}#{key}", label=label, error="; ".join(problems) or None,
    )  # fmt: skip


def iter_shard(uri: str, chunk_bytes: int = READ_CHUNK) -> Iterator[ShardSample]:
    """The samples of one shard in tar order, each as soon as its member group is complete.

    Streams the shard once (on S3 one GET, its body read ``chunk_bytes`` at a time); a transient storage
    failure reopens it at the byte reached (a ranged GET of the rest), for the storage retry window, then
    ``StorageUnavailable``. A truncated or damaged tar yields
    the complete samples before the damage (not the group it interrupts), then raises ``CorruptShard``.
    """
    raw = _Resuming(uri)
    with io.BufferedReader(raw, buffer_size=chunk_bytes) as stream:
        where = 0
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_TarInfo)  # noqa: SIM115 - closed below
        except tarfile.ReadError as e:
            raise CorruptShard(uri, 0, f"not a tar: {e}") from None
        key: str | None = None
        members: dict[str, bytes] = {}
        try:
            for info in tar:
                where = info.offset
                if not info.isfile() or _WDS_META.match(info.name):
                    continue
                split = _split_name(info.name)
                if split is None:
                    continue  # WebDataset skips members without an extension too
                if split[0] != key:
                    if key is not None:
                        yield _sample(uri, key, members)
                    key, members = split[0], {}
                where = info.offset_data
                members[split[1]] = tar.extractfile(info).read()
        except tarfile.TarError as e:
            raise CorruptShard(uri, where, str(e)) from None
        finally:
            tar.close()
        stopped = getattr(tar, "stopped_by", None)
        if stopped is not None and not isinstance(stopped, tarfile.EOFHeaderError):
            raise CorruptShard(uri, tar.offset, f"{stopped} (the archive ends without its end marker)")
        if key is not None:
            yield _sample(uri, key, members)


def _expand(pattern: str) -> list[str]:
    """Brace expansion as WebDataset users write shard sets: ``{000000..000099}`` and ``{a,b}``."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise StorageError(f"brace range {{{body}}} in {redact(pattern)!r} is not numeric")
        width = len(lo) if len(lo) == len(hi) or lo.startswith("0") else 0
        choices = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [head + c + rest for c in choices for rest in _expand(tail)]


def _sizes(uris: list[str]) -> list[tuple[str, int]]:
    """``(uri, size)`` of named objects with one listing per folder (not one HEAD per object)."""
    by_folder: dict[str, dict[str, int]] = {}
    for uri in dict.fromkeys(uris):
        fs, path = storage.resolve(uri)
        folder = posixpath.dirname(path)
        if folder not in by_folder:
            selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
            try:
                infos = storage.retrying("list", uri, lambda fs=fs, s=selector: fs.get_file_info(s))
            except OSError as e:
                raise StorageError(f"cannot list the folder of {redact(uri)!r}: {e}") from e
            by_folder[folder] = {i.path: i.size or 0 for i in infos if i.type == pafs.FileType.File}
    out, missing = [], []
    for uri in uris:
        path = storage.resolve(uri)[1]
        size = by_folder[posixpath.dirname(path)].get(path)
        if size is None:
            missing.append(uri)
        else:
            out.append((uri, size))
    if missing:
        raise ObjectNotFound(
            f"{len(missing)} shard(s) not found, e.g. {', '.join(redact(u) for u in missing[:3])}"
        )
    return out


def is_shard_list(uri: str) -> bool:
    """Whether a ``.txt`` file lists shards (its first entry names a ``.tar``), not videos (a VideoMAE
    ``path label`` manifest)."""
    for line in storage.read_bytes_range(uri, 0, 4096).decode("utf-8", "replace").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            return entry.split()[0].lower().endswith(".tar")
    return False


def is_shard_folder(uri: str) -> bool:
    """Whether a folder / prefix holds WebDataset tars and no loose videos: a set made by our
    preprocessing job, WebDataset's ShardWriter, or video2dataset (whose per-shard ``.parquet`` and
    ``_stats.json`` bookkeeping sits beside the tars and is not a manifest)."""
    try:
        files = storage.list_files(uri, (".tar", *storage.VIDEO_SUFFIXES))
    except StorageError:
        return False
    tars = sum(1 for path, _ in files if path.lower().endswith(".tar"))
    return tars > 0 and tars == len(files)


def list_shards(uri: str) -> list[tuple[str, int]]:
    """The shards of a shard set as ``(uri, size)``: every ``*.tar`` below a folder or prefix (sorted), a
    brace pattern (``s3://b/train-{000000..000099}.tar``, in its order), or a ``.txt`` list (one URI per
    line; relative lines resolve against the list's folder)."""
    if _BRACE.search(uri):
        return _sizes(_expand(uri))
    if uri.endswith(".txt"):
        base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(storage.resolve(uri)[1])
        lines = [ln.strip() for ln in storage.read_text(uri).splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        return _sizes([e if storage.is_s3(e) or os.path.isabs(e) else storage.join(base, e) for e in entries])
    if uri.endswith(".tar"):
        return _sizes([uri])
    return storage.list_files(uri, (".tar",))


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"256MiB"``, ``"500MB"``, ``"4096"`` -> bytes (``--shard-size``)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in units:
        raise ValueError(f"not a size: {text!r} (e.g. 1GiB, 256MiB, 500MB or a number of bytes)")
    size = int(float(m.group(1)) * units[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size
