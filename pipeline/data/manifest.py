"""Manifests: which videos a dataset holds, with labels, from the formats users already have.

``read_manifest(uri, data_root=None, split=None)`` returns rows ``{"path": <uri>, "label": int,
"start": float, "end": float}`` (label -1 = unlabeled; start/end in seconds, -1 = whole video) from:

- a folder or prefix of videos (local or ``s3://``): every video file below it, unlabeled; if the folder
  holds ``<split>.csv`` (as the generated sample dataset does) and ``split`` is given, that manifest;
- VideoMAE CSV (``.csv`` / ``.txt``): ``path label`` per line, space or comma separated, as the
  Kinetics-400 / UCF101 / HMDB51 lists of the original repository; a line with only a path is unlabeled;
  a header line starting with ``path`` switches to named columns ``path,label[,start,end]``;
- Something-Something V2 JSON (``.json``): the ``[{"id", "template", ...}]`` list; labels come from the
  ``labels.json`` (template -> id) next to it or given as ``label_map``; videos are ``<id>.webm``;
- Parquet / JSONL: columns ``path[, label, start, end, status, split]``; with a ``status`` column (written
  by the preprocessing job) only rows with ``status == "ok"`` are kept, and with a ``split`` column only
  the rows of the requested ``split`` (one manifest serves train, val and test).

Relative paths resolve against ``data_root`` (default: the manifest's folder). A path that escapes the
data root (``../..``, or an absolute path outside it when a data root is given) is refused with a
``ManifestError`` naming it; without an explicit data root, absolute paths and URIs are taken as given.
The readers of the text formats (``parse_videomae_csv``, ``parse_ssv2_json``, ``read_label_map``) take
text, so other tools (annotations.py) reuse them.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

from pipeline import storage

MANIFEST_SUFFIXES = (".csv", ".txt", ".json", ".jsonl", ".parquet")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the manifest and the offending entry."""


def _row(path: str, label: int = -1, start: float = -1.0, end: float = -1.0) -> dict[str, Any]:
    return {"path": path, "label": int(label), "start": float(start), "end": float(end)}


def parse_videomae_csv(text: str, source: str = "<text>") -> list[dict[str, Any]]:
    """``path label`` lines (space or comma separated) -> rows with the path as written."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and lines[0].replace(" ", ",").split(",")[0].lower() == "path":
        import csv

        rows = []
        for rec in csv.DictReader(io.StringIO("\n".join(lines))):
            rows.append(
                _row(
                    rec["path"],
                    int(rec.get("label") or -1),
                    float(rec.get("start") or -1),
                    float(rec.get("end") or -1),
                )
            )
        return rows
    rows = []
    for number, line in enumerate(lines, 1):
        sep = "," if "," in line else None  # paths may contain spaces: the label is the last field
        parts = [p.strip() for p in line.rsplit(sep, 1)]
        if len(parts) == 1:
            rows.append(_row(parts[0]))
            continue
        try:
            rows.append(_row(parts[0], int(parts[1])))
        except ValueError:
            raise ManifestError(
                f"{source} line {number}: label {parts[1]!r} is not an integer: {line!r}"
            ) from None
    return rows


def read_label_map(text_or_uri: str) -> dict[str, int]:
    """A label map: JSON ``{"name": id}`` (SSv2 labels.json, our labels.json) or ``id name`` lines."""
    text = text_or_uri
    if not text.lstrip().startswith("{") and "\n" not in text and storage.exists(text):
        text = storage.read_text(text)
    if text.lstrip().startswith("{"):
        return {name: int(i) for name, i in json.loads(text).items()}
    out = {}
    for line in text.splitlines():
        if line.strip():
            a, b = line.split(maxsplit=1)
            out[b.strip()] = int(a) if a.isdigit() else int(b)
    return out


def ssv2_label_key(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def parse_ssv2_json(
    text: str, label_map: dict[str, int] | None, video_ext: str = ".webm", source: str = "<text>"
) -> list[dict[str, Any]]:
    """SSv2 annotation list -> rows ``<id><video_ext>``; labelled from the template when a map is given."""
    rows = []
    for entry in json.loads(text):
        label = -1
        if label_map is not None and "template" in entry:
            key = ssv2_label_key(entry["template"])
            if key not in label_map:
                raise ManifestError(
                    f"{source}: template {entry['template']!r} of video {entry['id']} is not in the label map"
                )
            label = label_map[key]
        rows.append(_row(f"{entry['id']}{video_ext}", label))
    return rows


def _table_rows(table, source: str, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of a Parquet/JSONL table; ``status`` (the preprocess manifest's) keeps only ``ok`` rows and a
    ``split`` column with any value set is filtered to ``split``, so one manifest serves every split."""
    cols = set(table.column_names)
    if "path" not in cols:
        raise ManifestError(f"{source}: no 'path' column (columns: {sorted(cols)})")
    data = table.to_pydict()
    n = table.num_rows
    keep = [s == "ok" for s in data["status"]] if "status" in cols else [True] * n
    splits = data.get("split") or [None] * n
    if split and any(s is not None for s in splits):
        if split not in splits:
            known = sorted({s for s in splits if s is not None})
            raise ManifestError(f"{source}: no rows of split {split!r} (splits: {known})")
        keep = [k and s == split for k, s in zip(keep, splits, strict=True)]

    def col(name, default):
        values = data.get(name) or [default] * n
        return [default if v is None else v for v in values]

    labels, starts, ends = col("label", -1), col("start", -1.0), col("end", -1.0)
    return [_row(data["path"][i], labels[i], starts[i], ends[i]) for i in range(n) if keep[i]]


def resolve_path(path: str, data_root: str, source: str = "<manifest>", allow_absolute: bool = False) -> str:
    """``path`` as a URI below ``data_root``; refuses paths that escape it.

    ``allow_absolute`` keeps absolute paths / URIs as they are (used when no data root was given).
    """
    if allow_absolute and (storage.is_s3(path) or path.startswith(("/", "file://"))):
        return path if storage.is_s3(path) else storage.resolve(path)[1]
    root = data_root.rstrip("/") if data_root != "/" else data_root
    if storage.is_s3(root):
        root_path = root[len("s3://") :]
        joined = path[len("s3://") :] if storage.is_s3(path) else posixpath.join(root_path, path)
        full, base = posixpath.normpath(joined), root_path
        prefix = "s3://"
    else:
        if storage.is_s3(path):
            raise ManifestError(f"{source}: {path!r} is an S3 path but the data root {root!r} is local")
        root_local = storage.resolve(root)[1]
        full = posixpath.normpath(
            posixpath.join(root_local, storage.resolve(path)[1] if "://" in path else path)
        )
        base, prefix = root_local, ""
    if full != base and not full.startswith(base.rstrip("/") + "/"):
        raise ManifestError(f"{source}: path {path!r} escapes the data root {storage.redact(data_root)!r}")
    return prefix + full


def read_manifest(
    uri: str,
    data_root: str | None = None,
    split: str | None = None,
    label_map: dict[str, int] | str | None = None,
    video_ext: str = ".webm",
) -> list[dict[str, Any]]:
    """Rows ``{"path", "label", "start", "end"}`` for a folder/prefix of videos or a manifest file."""
    lower = uri.lower().rstrip("/")
    if not lower.endswith(MANIFEST_SUFFIXES):
        if split and storage.exists(storage.join(uri, f"{split}.csv")):
            return read_manifest(storage.join(uri, f"{split}.csv"), data_root or uri)
        files = storage.list_files(uri, storage.VIDEO_SUFFIXES)
        if not files:
            raise ManifestError(
                f"no video files ({', '.join(storage.VIDEO_SUFFIXES)}) below {storage.redact(uri)!r}"
            )
        root = data_root or uri
        return [_row(resolve_path(path, root, uri)) for path, _ in files]
    source = storage.redact(uri)
    root = data_root or posixpath.dirname(uri.rstrip("/")) or "."
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            fs, path = storage.resolve(uri)
            rows = _table_rows(pq.read_table(path, filesystem=fs), source, split)
        elif lower.endswith(".jsonl"):
            import pyarrow as pa

            records = [json.loads(ln) for ln in storage.read_text(uri).splitlines() if ln.strip()]
            rows = _table_rows(pa.Table.from_pylist(records), source, split)
        elif lower.endswith(".json"):
            if label_map is None:
                candidate = storage.join(posixpath.dirname(uri), "labels.json")
                label_map = read_label_map(candidate) if storage.exists(candidate) else None
            elif isinstance(label_map, str):
                label_map = read_label_map(label_map)
            rows = parse_ssv2_json(storage.read_text(uri), label_map, video_ext, source)
        else:
            rows = parse_videomae_csv(storage.read_text(uri), source)
    except storage.StorageError as e:
        raise ManifestError(f"cannot read manifest {source}: {e}") from e
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise ManifestError(f"malformed manifest {source}: {type(e).__name__}: {e}") from e
    if not rows:
        raise ManifestError(f"manifest {source} lists no videos")
    for row in rows:
        row["path"] = resolve_path(row["path"], root, source, allow_absolute=data_root is None)
    return rows
