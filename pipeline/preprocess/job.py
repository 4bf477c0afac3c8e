"""The dataset preprocessing job: inspect every video, transcode it to a short side, write a manifest.

Decoding dominates the cost of video training, and it grows with the frame size (docs/preprocessing.md,
"Figures", measures what the resize saves), so the VideoMAE recipe resizes every video once, up front.
:func:`run` does that as a Ray Data job over a local folder or an S3 prefix:

1. list the input videos, join annotations (labels, splits) to them, and read what a previous run
   already finished (``manifest.parquet`` plus the partial manifests an interrupted run left);
2. send the rest through Ray Data tasks (``--workers`` at a time), each Ray worker process driving
   one isolated child (:mod:`pipeline.preprocess.worker`) that inspects, checks decoding and
   transcodes with a time limit per video;
3. stream the result rows back to the driver, which appends them to partial manifests every few
   seconds (so an interruption loses nothing already written), prints progress, and finally writes
   ``manifest.parquet``, ``report.json`` and the MLflow summary;
4. with ``--shards``, pack the ok videos into WebDataset tar shards (:mod:`pipeline.data.shards`), one
   Ray task per shard, and write their index: streaming training then reads a few hundred videos per
   object instead of paying one GET per clip.

Output layout under ``--output``::

    <same relative paths as the input, extension .mp4>   transcoded videos (transcode mode)
    manifest.parquet                                      one row per input video (MANIFEST_SCHEMA)
    report.json                                           counts, hours, bytes, throughput
    unmatched_annotations.csv                             annotation rows that name no video
    _preprocess/parts/*.parquet                           partial manifests of an unfinished run
    shards/<split>-NNNNNN.tar, shards/index.parquet       with --shards (``shard-`` for rows without split)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
import random
import re
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import runtime, storage, tracking
from pipeline.cache import ProcessCache
from pipeline.data import decoders, shards
from pipeline.data.decode import DecodeSettings
from pipeline.preprocess.annotations import Matched, load_annotations, match
from pipeline.preprocess.transcode import TRANSIENT_REASONS, VideoSettings
from pipeline.preprocess.worker import IsolatedVideoWorker

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
REPORT = "report.json"
UNMATCHED = "unmatched_annotations.csv"
PARTS_DIR = "_preprocess/parts"
SHARDS_DIR = "shards"
PACK_SEED = 0  # the order that mixes classes into shards: fixed, so a rerun plans the same shards
TAR_OVERHEAD = 2048  # per video in a shard: two headers, the .json, padding (the plan's size estimate)

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # what training reads: relative to the output root, or the input URI
        ("original_path", pa.string()),  # input URI
        ("relative_path", pa.string()),  # input path below the input root
        ("status", pa.string()),  # "ok" or a reason from transcode.REASONS
        ("error", pa.string()),  # detail of a failure
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("container", pa.string()),  # input metadata
        ("codec", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("frames", pa.int64()),
        ("duration", pa.float64()),  # seconds
        ("bytes", pa.int64()),
        ("out_width", pa.int32()),  # output metadata (transcode mode)
        ("out_height", pa.int32()),
        ("out_frames", pa.int64()),
        ("out_bytes", pa.int64()),
        ("transcoded", pa.bool_()),  # inspect-only mode: the training decoder could not read the original
        ("settings", pa.string()),  # VideoSettings.fingerprint(): a change redoes the row
        ("seconds", pa.float64()),  # processing time of this video
        ("processed_at", pa.timestamp("s", tz="UTC")),
    ]
)
# What process_batch (the Ray Data tasks) returns per video: the manifest columns a worker can know.
_RESULT_COLUMNS = [
    "original_path", "status", "error", "container", "codec", "width", "height", "fps", "frames",
    "duration", "bytes", "out_width", "out_height", "out_frames", "out_bytes", "transcoded", "seconds",
]  # fmt: skip
_RESULT_SCHEMA = pa.schema([MANIFEST_SCHEMA.field(c) for c in _RESULT_COLUMNS])


@dataclass
class PreprocessConfig:
    input: str
    output: str
    transcode: bool = True
    short_side: int = 320
    crf: int = 23
    preset: str = "veryfast"
    gop_seconds: float = 1.0
    # Frames above this are refused. Default: 8K when transcoding (it shrinks them); the training
    # decoder's own limit with --no-transcode, so "ok" means training will read it.
    max_pixels: int | None = None
    min_frames: int = 2
    decoder: str = "auto"  # the training data's data.decoder: every "ok" video opens with it
    timeout_s: float = 600.0  # per video
    workers: int | None = None  # Ray Data tasks at once, one CPU each; default: every CPU of the cluster
    annotations: list[str] = field(default_factory=list)
    annotation_format: str = "auto"
    labels: str | None = None  # SSv2 labels.json
    split_index: int = 1  # UCF101 / HMDB51 split
    retry_failed: bool = False  # also redo rows that failed for a reason of the file itself
    limit: int | None = None  # only the first N input videos (a trial run)
    progress_s: float = 10.0  # seconds between progress lines
    flush_s: float = 10.0  # seconds between partial manifests
    mlflow: str | None = None  # tracking URI; default MLFLOW_TRACKING_URI if set, else no tracking
    experiment: str = "preprocess"
    shards: bool = False  # also pack the ok videos into WebDataset tar shards below <output>/shards
    shard_bytes: int = 1 << 30  # target size of one shard

    def settings(self) -> VideoSettings:
        default_pixels = 7680 * 4320 if self.transcode else DecodeSettings().max_pixels
        return VideoSettings(
            transcode=self.transcode, short_side=self.short_side, crf=self.crf, preset=self.preset,
            gop_seconds=self.gop_seconds, max_pixels=self.max_pixels or default_pixels,
            min_frames=self.min_frames, decoder=self.decoder,
        )  # fmt: skip

    def validate(self) -> None:
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"short_side must be an even number >= 16, got {self.short_side}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {self.crf}")
        if self.gop_seconds <= 0 or self.timeout_s <= 0:
            raise ValueError("gop_seconds and timeout_s must be positive")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {self.shard_bytes}")
        try:
            decoders.candidates(self.decoder)
        except decoders.DecoderUnavailable as e:
            raise ValueError(f"decoder: {e}") from None


def _normalize(uri: str) -> str:
    """One spelling per location, so previous manifests and listings compare equal."""
    if storage.is_s3(uri):
        return "s3://" + uri[len("s3://") :].strip("/")
    return storage.resolve(uri)[1]


def _output_relpath(rel: str, transcode: bool) -> str:
    return posixpath.splitext(rel)[0] + ".mp4" if transcode else rel


def _temp_path(dst: str) -> str:
    """Where a worker writes before publishing: a hidden sibling locally, a local temp file for S3."""
    tag = uuid.uuid4().hex[:12]
    if storage.is_s3(dst):
        return os.path.join(tempfile.gettempdir(), "videomae-preprocess", f"{tag}.mp4")
    head, name = os.path.split(dst)
    return os.path.join(head, f".{name}.tmp-{tag}")


# One isolated child per Ray worker process, kept between tasks (Ray reuses worker processes), so the
# child's start-up is paid once per process rather than once per block of videos.
_WORKERS: ProcessCache[IsolatedVideoWorker] = ProcessCache(1)


def process_batch(batch: pa.Table, settings: dict, timeout_s: float) -> pa.Table:
    """Ray Data map step: inspect / transcode each video of the block in this process's isolated child."""
    worker = _WORKERS.get(json.dumps([settings, timeout_s], sort_keys=True),
                          lambda: IsolatedVideoWorker(VideoSettings(**settings), timeout_s))
    rows = []
    for task in batch.to_pylist():
        dst = task["dst"] or None
        row = worker.process(task["src"], dst, _temp_path(dst) if dst else None)
        rows.append({c: row.get(c) for c in _RESULT_COLUMNS})
    return pa.Table.from_pylist(rows, schema=_RESULT_SCHEMA)


def read_manifest_rows(output: str) -> dict[str, dict]:
    """Rows of previous runs by original path: the final manifest, then partial ones (newer win)."""
    files = []
    manifest = storage.join(output, MANIFEST)
    if storage.exists(manifest):
        files.append(manifest)
    parts = storage.join(output, PARTS_DIR)
    if storage.exists(parts):
        files += [u for u, _ in storage.list_files(parts, (".parquet",))]
    rows: dict[str, dict] = {}
    for uri in files:
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        except (pa.ArrowInvalid, OSError) as e:
            log.warning("ignoring unreadable manifest %s: %s", storage.redact(uri), e)
            continue
        rows.update({r["original_path"]: r for r in table.to_pylist()})
    return rows


def _reusable(
    prev: dict | None, size: int, fingerprint: str, out_size: int | None, cfg: PreprocessConfig
) -> bool:
    if prev is None or prev.get("settings") != fingerprint or prev.get("bytes") != size:
        return False
    if prev["status"] == "ok":  # a copy (transcode mode, or an unreadable codec) must still be there
        copied = cfg.transcode or prev.get("transcoded")
        return not copied or (out_size is not None and out_size == prev.get("out_bytes"))
    return prev["status"] not in TRANSIENT_REASONS and not cfg.retry_failed


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{c: r.get(c) for c in MANIFEST_SCHEMA.names} for r in rows], schema=MANIFEST_SCHEMA
    )


def _write_parquet(uri: str, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pq.write_table(_table(rows), buf)
    storage.write_bytes(uri, buf.getvalue())


@dataclass
class _Plan:
    """Every input video: reused rows from earlier runs, and tasks for the workers."""

    rows: dict[str, dict]  # original_path -> row, in input order (completed as results arrive)
    tasks: list[dict]
    annotations: Matched | None
    annotation_rows: int


def _plan(cfg: PreprocessConfig, input_root: str, output_root: str) -> _Plan:
    listed = storage.list_files(input_root, storage.VIDEO_SUFFIXES)
    listed = [(u, s) for u, s in listed if not _normalize(u).startswith(output_root + "/")]
    if cfg.limit:
        listed = listed[: cfg.limit]
    if not listed:
        raise storage.StorageError(
            f"no video files ({', '.join(storage.VIDEO_SUFFIXES)}) under {storage.redact(cfg.input)!r}"
        )
    rels = [storage.relative_to(u, input_root) for u, _ in listed]

    matched, annotation_rows = None, 0
    if cfg.annotations:
        anns = load_annotations(cfg.annotations, cfg.annotation_format, cfg.labels, cfg.split_index)
        annotation_rows = len(anns)
        matched = match(rels, anns)

    fingerprint = cfg.settings().fingerprint()
    previous = read_manifest_rows(output_root)
    outputs = dict(storage.list_files(output_root, (".mp4",))) if storage.exists(output_root) else {}
    rows: dict[str, dict] = {}
    tasks: list[dict] = []
    claimed: dict[str, str] = {}
    for (uri, size), rel in zip(listed, rels, strict=True):
        out_rel = _output_relpath(rel, cfg.transcode)
        # inspect-only: where a copy goes if the training decoder cannot read the original
        dst = storage.join(output_root, out_rel if cfg.transcode else _output_relpath(rel, True))
        base = {
            "original_path": uri, "relative_path": rel, "bytes": size, "settings": fingerprint,
            "path": out_rel if cfg.transcode else uri,
        }  # fmt: skip
        if matched is not None:  # without --annotations, labels of earlier runs are kept
            ann = matched.by_video.get(rel)
            base.update(label=ann and ann.label, label_name=ann and ann.label_name, split=ann and ann.split)
        if cfg.transcode and out_rel in claimed:
            rows[uri] = {**base, "path": uri, "status": "output_collision",
                         "error": f"{claimed[out_rel]} already maps to {out_rel}"}  # fmt: skip
            continue
        claimed[out_rel] = rel
        prev = previous.get(uri)
        if _reusable(prev, size, fingerprint, outputs.get(dst), cfg):
            rows[uri] = {**prev, **base, "path": prev["path"]}  # annotations may have changed
        else:
            rows[uri] = base
            tasks.append({"src": uri, "dst": dst or ""})
    return _Plan(rows, tasks, matched, annotation_rows)


def _process(cfg: PreprocessConfig, plan: _Plan, output_root: str, run_id: str) -> tuple[int, float]:
    """Run the tasks on Ray Data; rows land in ``plan.rows`` and in partial manifests as they come.

    Returns the number of workers and the seconds spent (for the throughput figures)."""
    import ray

    runtime.init_ray()
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(workers, len(plan.tasks))
    # Blocks are the unit in which results stream back: small enough for steady progress and partial
    # manifests, large enough that the number of blocks stays modest on big datasets.
    per_block = max(1, min(64, len(plan.tasks) // (workers * 8)))
    ds = ray.data.from_items(plan.tasks, override_num_blocks=math.ceil(len(plan.tasks) / per_block))
    ds = ds.map_batches(
        process_batch,
        fn_kwargs={"settings": asdict(cfg.settings()), "timeout_s": cfg.timeout_s},
        batch_size=None, batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1,
    )  # fmt: skip
    log.info("processing %d videos with %d workers (%s)", len(plan.tasks), workers,
             "inspect + transcode" if cfg.transcode else "inspect only")  # fmt: skip
    pending: list[dict] = []
    done = failed = part = 0
    start = last_flush = last_progress = time.monotonic()

    def flush() -> None:
        nonlocal part, pending, last_flush
        if pending:
            _write_parquet(storage.join(output_root, PARTS_DIR, f"{run_id}-{part:05d}.parquet"), pending)
            part, pending = part + 1, []
        last_flush = time.monotonic()

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        now = datetime.now(timezone.utc)
        for result in batch.to_pylist():
            row = plan.rows[result["original_path"]]
            row.update({k: v for k, v in result.items() if v is not None or k in ("error",)})
            row["processed_at"] = now
            if row["status"] != "ok":
                row["path"] = row["original_path"]
                failed += 1
            elif row.get("transcoded"):  # inspect-only, an unreadable codec: training reads the H.264 copy
                row["path"] = _output_relpath(row["relative_path"], True)
            pending.append(row)
            done += 1
        t = time.monotonic()
        if t - last_flush >= cfg.flush_s:
            flush()
        if t - last_progress >= cfg.progress_s:
            rate = done / (t - start)
            eta = (len(plan.tasks) - done) / rate if rate else float("inf")
            log.info(
                "%d/%d videos (%d failed), %.2f videos/s, ETA %.0fs", done, len(plan.tasks), failed, rate, eta
            )
            last_progress = t
    flush()
    return workers, time.monotonic() - start


def _plan_shards(rows: list[dict], shard_bytes: int, output_root: str) -> list[dict]:
    """The ok videos assigned to shards by cumulative size: one shard set per split (``train-NNNNNN.tar``,
    ...; ``shard-`` without a split), so a job reads only its split's shards; within a set a seeded
    shuffle, so a shard is not one class when the input is sorted by label."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["original_path"])
    random.Random(PACK_SEED).shuffle(ok)
    plans: list[dict] = []
    for prefix in sorted({_shard_prefix(r) for r in ok}):
        current, size, number = None, 0, 0
        for r in (r for r in ok if _shard_prefix(r) == prefix):
            item = _shard_item(r, output_root)
            if current is not None and size + item["bytes"] + TAR_OVERHEAD > shard_bytes:
                current = None
            if current is None:
                current = {"name": shards.shard_name(prefix, number), "prefix": prefix, "number": number,
                           "items": []}  # fmt: skip
                plans.append(current)
                size, number = 0, number + 1
            current["items"].append(item)
            size += item["bytes"] + TAR_OVERHEAD
    return plans


def _shard_item(row: dict, output_root: str) -> dict:
    """What a pack task needs of one video: where to read it, its key, and the metadata for its .json."""
    path = row["path"]
    meta = {
        "label": row.get("label"), "label_name": row.get("label_name"), "split": row.get("split"),
        "frames": row.get("out_frames") or row.get("frames"), "fps": row.get("fps"),
        "duration": row.get("duration"), "width": row.get("out_width") or row.get("width"),
        "height": row.get("out_height") or row.get("height"), "path": row["relative_path"],
    }  # fmt: skip
    return {
        "uri": path if storage.is_s3(path) or os.path.isabs(path) else storage.join(output_root, path),
        "key": row["relative_path"],  # unique per input; shards.safe_key maps it to a WebDataset key
        "ext": posixpath.splitext(path)[1],
        "bytes": row.get("out_bytes") or row["bytes"],  # the file read: the output, or the original
        "meta": {k: v for k, v in meta.items() if v is not None},
    }


def _shard_prefix(row: dict) -> str:
    split = row.get("split")
    return re.sub(r"[^A-Za-z0-9_]+", "_", split) if split else "shard"


def _write_shard(root: str, prefix: str, number: int, items: list[dict]) -> list[dict]:
    """One pack task (a Ray task): read the shard's videos in order, publish them as one tar, return its
    index rows."""
    with shards.ShardWriter(root, shard_bytes=None, prefix=prefix, first=number) as writer:
        for item in items:
            writer.add(item["key"], storage.read_bytes(item["uri"]), item["ext"], item["meta"])
    return writer.rows


def _pack(cfg: PreprocessConfig, rows: list[dict], output_root: str) -> dict:
    """Write the planned shards below ``<output>/shards`` in parallel Ray tasks, then their index.

    Resumable: a shard the existing index lists with the same videos, and whose file has the size the
    index recorded, is kept. Shards of an earlier plan that this one has no more are removed."""
    import ray

    start = time.monotonic()
    root = storage.join(output_root, SHARDS_DIR)
    index_uri = storage.join(root, shards.INDEX)
    plans = _plan_shards(rows, cfg.shard_bytes, output_root)
    previous: dict[str, list[dict]] = {}
    if storage.exists(index_uri):
        for r in sorted(shards.read_index(index_uri), key=lambda r: r["offset"]):
            previous.setdefault(r["shard"], []).append(r)
    present = {}
    if storage.exists(root):
        present = {storage.relative_to(u, root): size for u, size in storage.list_files(root, (".tar",))}
    done: dict[str, list[dict]] = {}
    todo = []
    for plan in plans:
        old = previous.get(plan["name"])
        wanted = [(shards.safe_key(i["key"]), i["bytes"]) for i in plan["items"]]
        complete = old and present.get(plan["name"]) == old[0]["shard_size"]
        if complete and [(r["key"], r["bytes"]) for r in old] == wanted:
            done[plan["name"]] = old
        else:
            todo.append(plan)
    kept = len(done)
    videos = sum(len(p["items"]) for p in plans)
    log.info("packing %d videos into %d shards below %s: %d to write, %d complete from an earlier run",
             videos, len(plans), storage.redact(root), len(todo), kept)  # fmt: skip
    errors: list[Exception] = []
    if todo:
        runtime.init_ray()
        task = ray.remote(num_cpus=1)(_write_shard)
        refs = {task.remote(root, p["prefix"], p["number"], p["items"]): p for p in todo}
        pending = list(refs)
        total = sum(i["bytes"] for p in todo for i in p["items"])
        packed = 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=cfg.progress_s)
            for ref in ready:
                plan = refs[ref]
                try:
                    done[plan["name"]] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    log.error("shard %s failed: %s", plan["name"], e)
                    errors.append(e)
                packed += sum(i["bytes"] for i in plan["items"])
            rate = packed / 2**20 / max(time.monotonic() - start, 1e-9)
            log.info("%d/%d shards written (%d failed), %.2f/%.2f GiB, %.1f MiB/s", len(done) - kept,
                     len(todo), len(errors), packed / 1024**3, total / 1024**3, rate)  # fmt: skip
    index = [r for name in sorted(done) for r in done[name]]
    shards.write_index(index, index_uri)  # also after a failure: a rerun keeps the shards that were written
    if errors:
        raise errors[0]
    for stale in sorted(set(present) - {p["name"] for p in plans}):
        storage.delete(storage.join(root, stale))
    sizes = {r["shard"]: r["shard_size"] for r in index}
    return {
        "count": len(plans), "videos": len(index), "bytes": sum(sizes.values()), "written": len(todo),
        "kept": kept, "sets": dict(Counter(p["prefix"] for p in plans)),
        "index": f"{SHARDS_DIR}/{shards.INDEX}", "seconds": time.monotonic() - start,
    }  # fmt: skip


def summarize(rows: list[dict], seconds: float, processed: int, workers: int, cfg: PreprocessConfig,
              plan: _Plan) -> dict:  # fmt: skip
    """The run report: counts by status and codec, hours, bytes, throughput, annotation coverage."""
    ok = [r for r in rows if r["status"] == "ok"]
    report = {
        "input": storage.redact(cfg.input),
        "output": storage.redact(cfg.output),
        # "probe": the report's old word for inspect-only mode, kept for tools that read report.json
        "mode": "transcode" if cfg.transcode else "probe",
        "settings": cfg.settings().fingerprint(),
        "videos": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "processed": processed,
        "skipped_done": len(rows) - processed,
        "status_counts": dict(Counter(r["status"] for r in rows).most_common()),
        "codec_counts": dict(Counter(r.get("codec") or "unknown" for r in rows).most_common()),
        "hours": sum(r.get("duration") or 0.0 for r in ok) / 3600,
        "bytes_in": sum(r.get("bytes") or 0 for r in rows),
        "bytes_out": sum(r.get("out_bytes") or 0 for r in ok),
        "seconds": seconds,  # processing phase (the throughput's denominator)
        "workers": workers,
        "videos_per_s": processed / seconds if seconds > 0 else 0.0,
        "videos_per_s_per_worker": processed / seconds / workers if seconds > 0 and workers else 0.0,
        "failures": [
            {"path": r["original_path"], "status": r["status"], "error": r.get("error")}
            for r in rows
            if r["status"] != "ok"
        ][:100],
    }
    if plan.annotations is not None:
        m = plan.annotations
        report["annotations"] = {
            "rows": plan.annotation_rows,
            "matched": len(m.by_video),
            "unmatched_rows": len(m.unmatched),
            "duplicate_rows": m.duplicates,
            "videos_without_annotation": len(m.videos_without),
            "unmatched_examples": [a.key for a in m.unmatched[:20]],
            "videos_without_examples": m.videos_without[:20],
        }
    return report


def format_report(report: dict) -> str:
    gib = 1024**3
    lines = [
        f"videos            {report['videos']} ({report['ok']} ok, {report['failed']} failed; "
        f"{report['processed']} processed now, {report['skipped_done']} done before)",
        f"hours of video    {report['hours']:.2f} (ok videos)",
        f"bytes in / out    {report['bytes_in'] / gib:.3f} GiB / {report['bytes_out'] / gib:.3f} GiB",
        f"throughput        {report['videos_per_s']:.2f} videos/s over {report['workers']} workers "
        f"({report['videos_per_s_per_worker']:.2f} per worker), {report['seconds']:.1f}s",
        "by status         " + ", ".join(f"{k}: {v}" for k, v in report["status_counts"].items()),
        "by codec          " + ", ".join(f"{k}: {v}" for k, v in report["codec_counts"].items()),
    ]
    if "annotations" in report:
        a = report["annotations"]
        lines.append(
            f"annotations       {a['rows']} rows, {a['matched']} matched, "
            f"{a['unmatched_rows']} name no video, "
            f"{a['duplicate_rows']} duplicates, {a['videos_without_annotation']} videos without annotation"
        )
    if "shards" in report:
        sh = report["shards"]
        lines.append(
            f"shards            {sh['count']} ({', '.join(f'{k}: {v}' for k, v in sh['sets'].items())}), "
            f"{sh['videos']} videos, {sh['bytes'] / gib:.3f} GiB; {sh['written']} written now, "
            f"{sh['kept']} kept; index {sh['index']}"
        )
    return "\n".join(lines)


def _log_mlflow(cfg: PreprocessConfig, report: dict) -> None:
    """One MLflow run per preprocessing run: settings as params, the report's figures as metrics."""
    tracking_uri = cfg.mlflow or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        return

    name = f"preprocess-{posixpath.basename(_normalize(cfg.output))}"
    mlrun = tracking.start_run(name, cfg.experiment, tracking_uri, job="preprocess", resume=False)
    params = {k: v for k, v in asdict(cfg).items() if k not in ("mlflow", "annotations")}
    params.update(input=storage.redact(cfg.input), output=storage.redact(cfg.output),
                  annotations=",".join(storage.redact(a) for a in cfg.annotations))  # fmt: skip
    mlrun.log_params(params)
    keys = ("videos", "ok", "failed", "processed", "hours", "bytes_in", "bytes_out", "seconds",
            "videos_per_s", "videos_per_s_per_worker")  # fmt: skip
    metrics = {k: float(report[k]) for k in keys}
    metrics.update({f"status_{k}": float(v) for k, v in report["status_counts"].items()})
    if "shards" in report:
        metrics.update(shards=float(report["shards"]["count"]), shard_bytes=float(report["shards"]["bytes"]))
    if "annotations" in report:
        metrics.update(
            {f"annotations_{k}": float(v) for k, v in report["annotations"].items() if isinstance(v, int)}
        )
    mlrun.log_metrics(metrics, step=0)
    mlrun.log_text(json.dumps(report, indent=2, default=str), REPORT)
    mlrun.end()


def run(cfg: PreprocessConfig) -> dict:
    """Preprocess ``cfg.input`` into ``cfg.output``; returns the report (also written as report.json)."""
    cfg.validate()
    input_root, output_root = _normalize(cfg.input), _normalize(cfg.output)
    if input_root == output_root:
        raise ValueError("--output must differ from --input (outputs would overwrite the originals)")
    storage.check_reachable(cfg.input)
    storage.check_reachable(cfg.output)
    start = time.monotonic()
    plan = _plan(cfg, input_root, output_root)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    log.info("%d input videos: %d to process, %d done in an earlier run", len(plan.rows), len(plan.tasks),
             len(plan.rows) - len(plan.tasks))  # fmt: skip
    workers, seconds = _process(cfg, plan, output_root, run_id) if plan.tasks else (0, 0.0)
    rows = list(plan.rows.values())
    _write_parquet(storage.join(output_root, MANIFEST), rows)
    parts = storage.join(output_root, PARTS_DIR)
    if storage.exists(parts):
        storage.delete(parts, recursive=True)  # the manifest now holds every row they held
    packed = _pack(cfg, rows, output_root) if cfg.shards else None
    report = summarize(rows, seconds, len(plan.tasks), workers, cfg, plan)
    if packed is not None:
        report["shards"] = packed
    report["total_seconds"] = time.monotonic() - start
    storage.write_text(storage.join(output_root, REPORT), json.dumps(report, indent=2, default=str))
    if plan.annotations is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["key", "label", "label_name", "split"])
        writer.writerows((a.key, a.label, a.label_name, a.split) for a in plan.annotations.unmatched)
        storage.write_text(storage.join(output_root, UNMATCHED), buf.getvalue())
    log.info("report\n%s", format_report(report))
    _log_mlflow(cfg, report)
    return report
