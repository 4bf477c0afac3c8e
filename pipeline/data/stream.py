"""The training stream at scale: sources read on the cluster, a seeded epoch plan, weighted mixtures and
exact resume.

``prepare_sources(cfg, mode)`` reads every source of ``data.sources`` (or the one ``data.uri``) *on the
cluster*: a Parquet / JSONL / CSV manifest with Ray Data's readers, the path column checked and resolved
in the read tasks, cut into pieces (``piece_size``: about 1 MiB) and kept in the object store; a folder is
listed once; a shard set (WebDataset tars, pipeline/data/shards.py) is counted from its index. The driver
holds object references and row counts, never the rows, so its memory and start-up do not grow with the
manifest (benchmarks/data_scale.py).

The epoch plan is a pure function of (seed, epoch, source sizes, weights):

- each source is an endless stream of passes; pass ``q`` permutes its pieces (shards) with seed
  (seed, source, q), and every ``group_pieces`` consecutive pieces of it are read by one task, which
  permutes their rows together. A video can thus move anywhere at piece granularity and anywhere within
  the ``group_pieces x piece_rows`` rows it is read with (docs/data.md, "How far a video moves");
- an epoch takes ``epoch_videos x weight / sum(weights)`` rows of each source's stream (a small source
  repeats, a large one is seen in parts that rotate over epochs) and interleaves the sources' tasks in
  those proportions;
- every row gets its *position* in the epoch, carried into its clips.

Exact resume: a rank counts the clips it trained on per position (``Consumption``); a video is done when
all its ``clips_per_video`` clips were. Checkpoints hold the epoch's done positions (a bitmap), gathered
over the ranks. Before each pass rank 0 hands the epoch and its bitmap to the run's cursor actor,
and the read tasks drop done rows before anything is decoded: a resumed epoch continues with the videos
it had not yet trained on. Videos in flight at the checkpoint (decoded, in a prefetch or shuffle buffer,
not trained on) are seen again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data import manifest, storage

log = logging.getLogger(__name__)

COLUMNS = ("path", "label", "start", "end")
CURSOR_PREFIX = "videomae-data-cursor/"
CURSOR_NAMESPACE = "videomae"


@dataclass
class SourceSpec:
    """One dataset of a mixture (``data.sources`` entries: ``{uri, weight, name, data_root, split}``)."""

    uri: str
    weight: float = 1.0
    name: str = ""  # in metrics (data/clips/<name>); default: the last part of the URI
    data_root: str | None = None
    split: str | None = None  # default: data.split

    def label(self) -> str:
        """The source's name in metrics, tags and lines: ``name``, else the URI's last part that is not a
        pattern (a brace pattern's folder), made MLflow-safe."""
        if self.name:
            return safe_name(self.name)
        parts = [p for p in self.uri.rstrip("/").split("/") if p and "{" not in p and "}" not in p]
        last = parts[-1] if parts else ""
        return safe_name(last.split(".")[0] if "." in last.lstrip(".") else last)


def safe_name(text: str) -> str:
    """A name MLflow takes as one part of a metric or tag name: letters, digits and ``_ - .`` kept, any
    other run of characters one ``_``, no dot or ``_`` at the ends (MLflow refuses names that resolve to
    another path, as ``data/clips/..`` would); never empty."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("._") or "source"


def source_specs(cfg) -> list[SourceSpec]:
    """``data.sources`` as specs (checked), or the single ``data.uri`` source."""
    if not cfg.sources:
        return [SourceSpec(cfg.uri, 1.0, "", cfg.data_root, cfg.split)]
    specs = []
    for i, entry in enumerate(cfg.sources):
        if isinstance(entry, str):
            entry = {"uri": entry}
        unknown = set(entry) - {f.name for f in dataclasses.fields(SourceSpec)}
        if unknown or "uri" not in entry:
            raise ValueError(f"data.sources[{i}] needs 'uri' and takes weight, name, data_root, split; got "
                             f"{sorted(entry)}")
        spec = SourceSpec(**{"split": cfg.split, **entry})
        if not spec.weight > 0:
            raise ValueError(f"data.sources[{i}] ({spec.uri!r}): weight must be > 0, got {spec.weight}")
        specs.append(spec)
    names = [s.label() for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names must differ (set 'name'), got {names}")
    return specs


def is_shard_set(uri: str) -> bool:
    """A ``.tar``, a brace pattern, a ``.txt`` list of shards, or a folder / prefix of tars (with our
    ``index.parquet`` or without: WebDataset's and video2dataset's sets)."""
    from pipeline.data import shards

    lower = uri.lower().rstrip("/")
    if lower.endswith(".tar") or ("{" in uri and "}" in uri):
        return True
    if lower.endswith(".txt"):
        return storage.exists(uri) and shards.is_shard_list(uri)
    if lower.endswith(manifest.MANIFEST_SUFFIXES):
        return False
    return storage.exists(storage.join(uri, shards.INDEX)) or shards.is_shard_folder(uri)


# --- reading a manifest on the cluster --------------------------------------------------------------------

def _normalize(table: pa.Table, source: str, root: str, allow_absolute: bool, split: str | None,
               needs_labels: bool) -> pa.Table:
    """A read task's share of a manifest as (path, label, start, end): the ``ok`` rows of ``split``, paths
    resolved below ``root`` and checked (vectorised: a path needs Python only when it could escape)."""
    import pyarrow.compute as pc

    cols = set(table.column_names)
    if "path" not in cols:
        raise manifest.ManifestError(f"{source}: no 'path' column (columns: {sorted(cols)})")
    keep = pc.equal(table["status"], "ok") if "status" in cols else None
    if split and "split" in cols and table["split"].null_count < table.num_rows:
        of_split = pc.equal(table["split"], split)
        keep = of_split if keep is None else pc.and_(keep, of_split)
    if keep is not None:
        table = table.filter(pc.fill_null(keep, False))
    n = table.num_rows

    def column(name: str, kind: pa.DataType, default: float) -> pa.Array:
        if name not in cols:
            return pa.array(np.full(n, default), kind)
        return pc.fill_null(table[name].cast(kind), default).combine_chunks()

    paths = table["path"].cast(pa.string()).combine_chunks()
    base = manifest.resolve_path(".", root, source)  # the root as resolve_path spells it
    risky = pc.or_(pc.match_substring(paths, ".."), pc.match_substring(paths, "//"))
    risky = pc.or_(risky, pc.starts_with(paths, "./"))
    absolute = pc.or_(pc.starts_with(paths, "/"), pc.match_substring(paths, "://"))
    joined = pc.binary_join_element_wise(base.rstrip("/") or "/", paths, "/")
    if allow_absolute:  # no data root: absolute paths and URIs are taken as given
        resolved = pc.if_else(absolute, paths, joined)
    else:
        resolved = joined
        risky = pc.or_(risky, absolute)
    out = resolved.to_pylist() if pc.any(risky).as_py() else None
    if out is not None:
        for i in np.flatnonzero(risky.to_numpy(zero_copy_only=False)):
            out[i] = manifest.resolve_path(paths[i].as_py(), root, source, allow_absolute=allow_absolute)
        resolved = pa.array(out, pa.string())
    labels = column("label", pa.int64(), -1)
    if needs_labels and n and pc.min(labels).as_py() < 0:
        example = resolved[int(np.argmax(labels.to_numpy() < 0))].as_py()
        raise manifest.ManifestError(f"{source}: videos have no label (training on labels), e.g. {example!r}")
    return pa.table({"path": resolved, "label": labels, "start": column("start", pa.float64(), -1.0),
                     "end": column("end", pa.float64(), -1.0)})


def _parse_lines(table: pa.Table, source: str, header: list[str] | None) -> pa.Table:
    """VideoMAE text manifest lines (``path label``) or named CSV lines -> a table with a path column."""
    lines = [t for t in table.column("text").to_pylist() if t.strip()]
    if header:
        import csv

        records = [r for r in csv.DictReader(lines, fieldnames=header) if r[header[0]] != header[0]]
        columns = {name: [r.get(name) or None for r in records] for name in header}
        for name, cast in (("label", int), ("start", float), ("end", float)):
            if name in columns:
                columns[name] = [None if v is None else cast(v) for v in columns[name]]
        return pa.table(columns)
    return pa.Table.from_pylist(manifest.parse_videomae_csv("\n".join(lines), source), schema=ROW_SCHEMA)


ROW_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int64()), ("start", pa.float64()),
                        ("end", pa.float64())])


def _manifest_dataset(spec: SourceSpec, needs_labels: bool, label_map: str | None, video_ext: str,
                      num_cpus: float):
    """A Ray dataset of (path, label, start, end) for one manifest or folder, read by the cluster's tasks
    of ``num_cpus`` each."""
    import ray

    uri, lower = spec.uri, spec.uri.lower().rstrip("/")
    source = storage.redact(uri)
    if not lower.endswith(manifest.MANIFEST_SUFFIXES) or lower.endswith(".json"):
        # a folder (listed here: use the preprocessing manifest for millions of videos) or SSv2's one JSON
        rows = manifest.read_manifest(uri, spec.data_root, spec.split, label_map, video_ext)
        return ray.data.from_arrow(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)).map_batches(
            _normalize, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
            fn_kwargs={"source": source, "root": "/", "allow_absolute": True, "split": None,
                       "needs_labels": needs_labels})
    root = spec.data_root or posixpath.dirname(uri.rstrip("/")) or "."
    fs, path = storage.resolve(uri)
    if storage.is_s3(uri):
        fs = storage.s3_filesystem_for_uploads()  # picklable into read tasks, no secret in it
    if not storage.exists(uri):
        raise manifest.ManifestError(f"manifest {source} does not exist")
    if lower.endswith(".parquet"):
        ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=num_cpus)
    elif lower.endswith(".jsonl"):
        ds = ray.data.read_json(path, filesystem=fs, num_cpus=num_cpus)
    else:  # .csv / .txt: lines, parsed in the read tasks (a header, if any, read here from the first line)
        first = storage.read_bytes_range(uri, 0, 4096).decode("utf-8", "replace").splitlines()[:1]
        fields = first[0].replace(" ", ",").split(",") if first else []
        header = [f.strip() for f in fields] if fields and fields[0].strip().lower() == "path" else None
        ds = ray.data.read_text(path, filesystem=fs, num_cpus=num_cpus).map_batches(
            _parse_lines, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
            fn_kwargs={"source": source, "header": header})
    return ds.map_batches(
        _normalize, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
        fn_kwargs={"source": source, "root": root, "allow_absolute": spec.data_root is None,
                   "split": spec.split, "needs_labels": needs_labels})


def _unwrap(error: BaseException) -> BaseException:
    """The ManifestError inside a Ray task failure, if there is one (else the failure itself). Ray hands
    the driver the task's traceback as text; the error's own message is its last line of that type."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, manifest.ManifestError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) and cause is not seen else seen.__cause__
    found = re.findall(r"ManifestError: (.+)", str(error))
    return manifest.ManifestError(found[-1]) if found else error


@dataclass
class Source:
    """One source on the cluster: its pieces (object references of ``piece_rows``-row tables, or shard
    URIs) and their row counts; picklable into the plan's tasks."""

    spec: SourceSpec
    kind: str  # rows | shards
    sizes: np.ndarray  # rows per piece (per shard)
    refs: list[Any] | None = None  # rows: one ObjectRef per piece
    shard_uris: list[str] | None = None  # shards: one URI per shard
    labels: dict[int, int] | None = None  # label -> videos (rows sources, labelled)
    digest: str = ""  # of the pieces' contents in order (rows: their rows; shards: names and sizes)

    @property
    def num_videos(self) -> int:
        return int(self.sizes.sum())


def _pieces(materialized) -> tuple[list[Any], list[int]]:
    """(block references, rows per block) of a materialized dataset: the source's pieces."""
    refs, sizes = [], []
    for bundle in materialized.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            if entry.metadata.num_rows:
                refs.append(entry.ref)
                sizes.append(entry.metadata.num_rows)
    return refs, sizes


def _label_counts(table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    counts = pc.value_counts(table["label"])
    return pa.table({"label": counts.field("values"), "count": counts.field("counts")})


def _count_labels(ds, num_cpus: float) -> dict[int, int]:
    """Videos per label: counted per block in tasks of ``num_cpus``, summed here (a groupby would
    shuffle)."""
    out: dict[int, int] = {}
    for row in ds.map_batches(_label_counts, batch_format="pyarrow", batch_size=None,
                              num_cpus=num_cpus).take_all():
        out[int(row["label"])] = out.get(int(row["label"]), 0) + int(row["count"])
    return out


PIECE_BYTES = 1 << 20  # a piece's size in the object store (default piece_rows)


def piece_size(num_rows: int, num_bytes: int, piece_rows: int | None) -> int:
    """Rows per piece: ``data.piece_rows``, else the power of two nearest to about ``PIECE_BYTES`` (a
    power of two, so that the in-memory size, which varies a little with how the read tasks chunked the
    rows, gives the same pieces to a resubmitted job). Ray keeps a task's results under 100 KB in its
    owner's memory, the driver's here, and copies them into every task that takes a reference, so a piece
    must be well above that (docs/data.md, "Scale")."""
    if piece_rows:
        return piece_rows
    rows = max(1.0, PIECE_BYTES * num_rows / max(num_bytes, 1))
    return 1 << round(math.log2(rows))


def decode_task_size(num_videos: int, task_videos: int | None) -> int:
    """Videos per decode task: ``data.decode_task_videos``, else about four tasks per CPU of the cluster
    per epoch, from 64 to 2048. Smaller tasks mean a sooner first batch and even load over the cores, but
    each costs about 15 ms of scheduling (64 tiny videos take 0.2 s to decode), and a block of rows under
    100 KB is kept in the driver's memory (see piece_size): 2048 rows are above that, so however large
    the epoch, the driver holds at most a few small blocks."""
    if task_videos:
        return task_videos
    import ray

    tasks = 4 * max(int(ray.cluster_resources().get("CPU", 1)), 8)
    return int(min(2048, max(64, math.ceil(num_videos / tasks))))


def prepare_source(spec: SourceSpec, mode: str, num_cpus: float, piece_rows: int | None = None,
                   limit: int | None = None, label_map: str | None = None,
                   video_ext: str = ".webm") -> Source:
    """Read (rows) or count (shards) one source on the cluster in tasks of ``num_cpus`` each
    (``data.light_num_cpus``);
    ``label_map`` and ``video_ext`` are SSv2's (``data.label_map``, ``data.video_ext``), read as validation
    reads them."""
    needs_labels = mode != "pretrain"
    if is_shard_set(spec.uri):
        uris, sizes, labels = shard_sizes(spec.uri, spec.split, num_cpus)
        if limit:
            cut = np.minimum(np.cumsum(sizes), limit)
            sizes = np.diff(np.concatenate([[0], cut]))
            uris, sizes = [u for u, n in zip(uris, sizes, strict=True) if n], sizes[sizes > 0]
        names = [posixpath.basename(storage.resolve(u)[1]) for u in uris]
        digest = hashlib.sha1(repr(list(zip(names, np.asarray(sizes).tolist(), strict=True))).encode())
        return Source(spec, "shards", np.asarray(sizes, np.int64), shard_uris=uris, labels=labels,
                      digest=digest.hexdigest())
    import ray

    # NOTE: the pieces must be a function of the manifest alone (a checkpoint's done positions index
    # them, and a resubmitted job rebuilds them): Ray Data hands blocks on in the order tasks finish
    # unless preserve_order is set, and a non-strict repartition cuts where the read tasks' blocks end
    context = ray.data.DataContext.get_current()
    kept_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        ds = _manifest_dataset(spec, needs_labels, label_map, video_ext, num_cpus)
        if limit:
            ds = ds.limit(limit)
        ds = ds.materialize()
        rows = piece_size(ds.count(), ds.size_bytes(), piece_rows)
        ds = repartition(ds, rows, num_cpus, strict=True).materialize()
    except (manifest.ManifestError, storage.StorageError):
        raise
    except Exception as e:  # a read task's failure: name the manifest's problem if it is one
        inner = _unwrap(e)
        if isinstance(inner, manifest.ManifestError):
            raise inner from None
        raise
    finally:
        context.execution_options.preserve_order = kept_order
    refs, sizes = _pieces(ds)
    if not sizes:
        raise manifest.ManifestError(f"{storage.redact(spec.uri)} lists no videos")
    labels = _count_labels(ds, num_cpus) if needs_labels else None
    return Source(spec, "rows", np.asarray(sizes, np.int64), refs=refs, labels=labels,
                  digest=_digest_pieces(refs, num_cpus))


def repartition(ds, rows_per_block: int, num_cpus: float, strict: bool = False):
    """``ds.repartition(target_num_rows_per_block=rows_per_block)`` in tasks of ``num_cpus`` CPUs.

    Ray's ``repartition`` takes no remote arguments, and a map task without ``num_cpus`` asks for 1 CPU:
    on a cluster whose training workers hold all but a fraction of each node's CPUs, such a task never
    starts and the stream waits for ever (docs/cluster.md, "The resource plan"). Its logical operator
    keeps the arguments in a dict the planner reads, so they are set there."""
    out = ds.repartition(target_num_rows_per_block=rows_per_block, strict=strict)
    remote_args = getattr(out._logical_plan.dag, "ray_remote_args", None)
    if not isinstance(remote_args, dict):
        raise RuntimeError("this Ray's repartition operator keeps no ray_remote_args: "
                           "pipeline/data/stream.py's repartition needs updating for it")
    remote_args["num_cpus"] = num_cpus
    return out


def _digest_tables(*tables: pa.Table) -> list[str]:
    out = []
    for table in tables:
        h = hashlib.sha1()
        for name in COLUMNS:
            h.update(repr(table.column(name).to_pylist()).encode())
        out.append(h.hexdigest())
    return out


def _digest_pieces(refs: list[Any], num_cpus: float, per_task: int = 32) -> str:
    """One digest of the pieces' rows in order, hashed in Ray tasks (the driver never holds the rows)."""
    import ray

    digest = ray.remote(num_cpus=num_cpus)(_digest_tables)
    chunks = [refs[i : i + per_task] for i in range(0, len(refs), per_task)]
    parts = ray.get([digest.remote(*chunk) for chunk in chunks])
    return hashlib.sha1("".join(d for part in parts for d in part).encode()).hexdigest()


def prepare_sources(cfg, mode: str) -> list[Source]:
    """Every source of ``cfg`` (a DataConfig), read or counted on the cluster; ``""`` = the sample data."""
    specs = source_specs(cfg)
    if len(specs) == 1 and not specs[0].uri:
        from pipeline.data.synthetic import ensure_sample_dataset

        specs[0].uri = ensure_sample_dataset(cfg.sample_cache_dir)
    return [prepare_source(s, mode, cfg.light_num_cpus, cfg.piece_rows, cfg.limit, cfg.label_map,
                           cfg.video_ext) for s in specs]


def epoch_size(sources: list[Source], epoch_videos: int | None) -> int:
    """Videos per epoch: ``data.epoch_videos``, else every source's videos once."""
    return epoch_videos or sum(s.num_videos for s in sources)


def source_quotas(sources: list[Source], epoch_videos: int | None) -> list[int]:
    """Videos each source gives an epoch (``epoch_quotas`` of the sources' sizes and weights)."""
    return epoch_quotas([s.num_videos for s in sources], [s.spec.weight for s in sources], epoch_videos)


def describe(sources: list[Source], epoch_videos: int) -> str:
    """One line per run start: each source's size, kind and share of an epoch."""
    quotas = source_quotas(sources, epoch_videos)
    return ", ".join(f"{s.spec.label()} ({s.num_videos} videos, {s.kind if s.kind == 'shards' else 'rows'}"
                     f"{f' in {len(s.sizes)} shards' if s.kind == 'shards' else ''}, {q} per epoch)"
                     for s, q in zip(sources, quotas, strict=True))


def plan_inputs(sources: list[Source], quotas: list[int], group_pieces: int, seed: int,
                shuffle: bool) -> list[dict[str, Any]]:
    """What the epoch plan (and so a video's position) depends on, one entry per source after one for the
    plan's own settings: a checkpoint keeps it, and a resumed run compares (``describe_change``). No
    secret: URIs are redacted."""
    out: list[dict[str, Any]] = [{"name": "(plan)", "seed": int(seed), "group_pieces": int(group_pieces),
                                  "shuffle": bool(shuffle), "videos_per_epoch": [int(q) for q in quotas]}]
    for source in sources:
        out.append({"name": source.spec.label(), "uri": storage.redact(source.spec.uri), "kind": source.kind,
                    "videos": source.num_videos, "pieces": len(source.sizes), "digest": source.digest})
    return out


def fingerprint(inputs: list[dict[str, Any]]) -> str:
    return hashlib.sha1(repr(inputs).encode()).hexdigest()


def describe_change(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """What differs between two ``plan_inputs``, in words (the first few differences)."""
    if not before:
        return "the checkpoint does not record its data"
    old, new = {e["name"]: e for e in before}, {e["name"]: e for e in after}
    changes = [f"source {name} is new" for name in new if name not in old]
    changes += [f"source {name} is gone" for name in old if name not in new]
    for name in (n for n in new if n in old):
        for key in new[name]:
            if old[name].get(key) != new[name][key]:
                what = "contents" if key == "digest" else f"{key} {old[name].get(key)} -> {new[name][key]}"
                changes.append(f"{name}: {what}")
    return "; ".join(changes[:4]) or "the same inputs in another order"


# --- the epoch plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A read task of an epoch: rows ``[lo, hi)`` of group ``group`` of pass ``pass_`` of a source, at
    ``offset`` in the epoch's positions."""

    source: int
    pass_: int
    group: int
    lo: int
    hi: int
    offset: int


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def pass_groups(sizes: np.ndarray, group_pieces: int, seed: int, source: int, pass_: int,
                shuffle: bool = True) -> list[np.ndarray]:
    """The piece indices read together, in order, by pass ``pass_`` of a source."""
    order = _rng(seed, source, pass_).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    return [order[i : i + group_pieces] for i in range(0, len(order), group_pieces)]


def epoch_quotas(num_videos: list[int], weights: list[float], epoch_videos: int | None) -> list[int]:
    """Rows each source gives an epoch: proportional to its weight, summing to ``epoch_videos`` (default:
    all videos of all sources, each once when the weights are equal to the sizes' shares)."""
    total = epoch_videos or sum(num_videos)
    if len(num_videos) == 1:
        return [total]
    shares = np.asarray(weights, float) / sum(weights) * total
    quotas = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - quotas))[: total - quotas.sum()]:  # largest remainders
        quotas[i] += 1
    return [int(q) for q in quotas]


def plan_epoch(sources: list[Source], quotas: list[int], group_pieces: int, seed: int, epoch: int,
               shuffle: bool = True) -> list[Task]:
    """The epoch's read tasks in order, positions assigned; a function of its arguments only."""
    per_source: list[list[tuple]] = []
    for s, (source, quota) in enumerate(zip(sources, quotas, strict=True)):
        group = 1 if source.kind == "shards" else group_pieces
        n = source.num_videos
        start, tasks = epoch * quota, []
        pass_, skip = divmod(start, n)
        while quota > 0:
            for g, pieces in enumerate(pass_groups(source.sizes, group, seed, s, pass_, shuffle)):
                rows = int(source.sizes[pieces].sum())
                if skip >= rows:
                    skip -= rows
                    continue
                take = min(rows - skip, quota)
                tasks.append((s, pass_, g, skip, skip + take))
                quota -= take
                skip = 0
                if quota == 0:
                    break
            pass_ += 1
        per_source.append(tasks)
    # interleave the sources' tasks in proportion: task k of a source with n tasks sits near (k + u) / n
    rng = _rng(seed, epoch, 1 << 20)
    keyed = [((k + rng.random()) / len(ts), t) for ts in per_source for k, t in enumerate(ts)]
    if shuffle:
        keyed.sort(key=lambda kt: kt[0])
    out, offset = [], 0
    for _, (s, pass_, g, lo, hi) in keyed:
        out.append(Task(s, pass_, g, lo, hi, offset))
        offset += hi - lo
    return out


# --- the cursor: which epoch a pass is, and what of it is done -------------------------------------------

class CursorState:
    """The epoch a pass reads, the bitmap of its done positions and the clip masks of its begun videos
    (set by rank 0 before each pass)."""

    def __init__(self) -> None:
        self.epoch, self.done, self.partial = 0, b"", {}
        self.beats = 0  # the training loop's signs of life, for the driver's watch (watchdog.GroupWatch)

    def set(self, epoch: int, done: bytes, partial: dict[int, int] | None = None) -> None:
        self.epoch, self.done, self.partial = epoch, done, dict(partial or {})
        self.beats += 1

    def beat(self) -> None:
        self.beats += 1

    def count_beats(self) -> int:
        return self.beats

    def get(self) -> tuple[int, bytes, dict[int, int]]:
        return self.epoch, self.done, self.partial


def cursor_name(run_name: str) -> str:
    return CURSOR_PREFIX + run_name


def create_cursor(run_name: str):
    """The run's cursor actor, on the driver's node (see ErrorLedger.get_or_create)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(CursorState).options(
        name=cursor_name(run_name), namespace=CURSOR_NAMESPACE, get_if_exists=True, scheduling_strategy=here
    ).remote()


def get_cursor(run_name: str):
    import ray

    return ray.get_actor(cursor_name(run_name), namespace=CURSOR_NAMESPACE)


def done_mask(done: bytes, lo: int, hi: int) -> np.ndarray:
    """Positions ``[lo, hi)`` of a packed bitmap as booleans (missing bits: not done)."""
    bits = np.unpackbits(np.frombuffer(done, np.uint8), bitorder="little") if done else np.zeros(0, bool)
    out = np.zeros(hi - lo, bool)
    have = bits[lo:hi]
    out[: len(have)] = have.astype(bool)
    return out


# --- the tasks -------------------------------------------------------------------------------------------

@dataclass
class StreamSpec:
    """What the plan's tasks need (picklable; object references travel inside)."""

    sources: list[Source]
    quotas: list[int]
    group_pieces: int
    seed: int
    shuffle: bool
    run_name: str | None  # the cursor's; None: no resume state (every pass reads epoch 0 of the plan)
    slots: int = 0  # blocks of the plan's first op: at least the tasks of any epoch (max_tasks)

    def fingerprint(self) -> str:
        """What the plan depends on, as a key: two streams in one process never share a cached plan."""
        parts = [self.run_name, self.seed, self.group_pieces, self.shuffle, self.quotas,
                 [(s.kind, s.sizes.tolist(), s.digest) for s in self.sources]]
        return hashlib.sha1(repr(parts).encode()).hexdigest()


_PLANS: dict[tuple, list[Task]] = {}  # per process: the epoch plan, computed once per epoch


def _epoch_plan(spec: StreamSpec, epoch: int) -> list[Task]:
    key = (spec.fingerprint(), epoch)
    if key not in _PLANS:
        _PLANS.clear()
        _PLANS[key] = plan_epoch(spec.sources, spec.quotas, spec.group_pieces, spec.seed, epoch, spec.shuffle)
    return _PLANS[key]


def _cursor(spec: StreamSpec) -> tuple[int, bytes, dict[int, int]]:
    if spec.run_name is None:
        return 0, b"", {}
    import ray

    return ray.get(get_cursor(spec.run_name).get.remote())


def _task_pieces(spec: StreamSpec, task: Task) -> np.ndarray:
    """The pieces (indices in the source's listing) a task reads: group ``task.group`` of its pass's order;
    a shard task's group is one shard."""
    source = spec.sources[task.source]
    size = 1 if source.kind == "shards" else spec.group_pieces
    return pass_groups(source.sizes, size, spec.seed, task.source, task.pass_, spec.shuffle)[task.group]


def task_rows(spec: StreamSpec, task: Task, num_rows: int) -> np.ndarray:
    """Which rows of its pieces (concatenated in group order) a rows task reads, in position order: its
    window ``[lo, hi)`` of the group's seeded permutation."""
    order = (_rng(spec.seed, task.source, task.pass_, task.group, 7).permutation(num_rows)
             if spec.shuffle else np.arange(num_rows))
    return order[task.lo : task.hi]


def expand_slots(batch: dict[str, np.ndarray], spec: StreamSpec) -> pa.Table:
    """Plan slots -> rows to decode: the epoch's task at each slot, its done rows dropped. A shard task
    becomes one row (kind ``shard``) that the decode step streams."""
    import ray

    epoch, done, partial = _cursor(spec)
    plan = _epoch_plan(spec, epoch)
    if len(plan) > spec.slots:  # max_tasks bounds every epoch: this would be a bug, never a silent loss
        raise RuntimeError(f"epoch {epoch} has {len(plan)} read tasks, more than the stream's {spec.slots} "
                           "slots: its last tasks would be lost")
    parts = []
    for slot in batch["id"]:
        if slot >= len(plan):
            continue
        task = plan[slot]
        source = spec.sources[task.source]
        end = task.offset + task.hi - task.lo
        skip = done_mask(done, task.offset, end)
        if skip.all():
            continue
        begun = {p - task.offset: m for p, m in partial.items() if task.offset <= p < end}
        if source.kind == "shards":
            parts.append(pa.table({
                "kind": ["shard"], "path": [source.shard_uris[int(_task_pieces(spec, task)[0])]],
                "label": [-1], "start": [-1.0], "end": [-1.0], "epoch": [epoch], "position": [task.offset],
                "source": [task.source], "clips_done": [0],
                "lo": [task.lo], "hi": [task.hi], "skip": [np.packbits(skip, bitorder="little").tobytes()],
                "split": [source.spec.split or ""],
                "begun": [json.dumps(begun)],
            }))
            continue
        table = pa.concat_tables(ray.get([source.refs[p] for p in _task_pieces(spec, task)]))
        keep = task_rows(spec, task, table.num_rows)[~skip]
        offsets = np.arange(task.hi - task.lo)[~skip]
        clips_done = pa.array([begun.get(int(i), 0) for i in offsets], pa.int64())
        rows = table.take(pa.array(keep)).select(list(COLUMNS))
        n = rows.num_rows
        parts.append(rows.append_column("kind", pa.array(["video"] * n))
                     .append_column("epoch", pa.array(np.full(n, epoch)))
                     .append_column("position", pa.array(task.offset + offsets))
                     .append_column("source", pa.array(np.full(n, task.source)))
                     .append_column("clips_done", clips_done)
                     .append_column("lo", pa.array(np.zeros(n, np.int64)))
                     .append_column("hi", pa.array(np.zeros(n, np.int64)))
                     .append_column("skip", pa.array([b""] * n, pa.binary()))
                     .append_column("split", pa.array([""] * n))
                     .append_column("begun", pa.array([""] * n)))
    if not parts:
        return EMPTY_ROWS
    return pa.concat_tables([p.select(EMPTY_ROWS.column_names).cast(EMPTY_ROWS.schema) for p in parts])


EMPTY_ROWS = pa.schema([
    ("kind", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("start", pa.float64()),
    ("end", pa.float64()), ("epoch", pa.int64()), ("position", pa.int64()), ("source", pa.int64()),
    ("clips_done", pa.int64()), ("lo", pa.int64()), ("hi", pa.int64()), ("skip", pa.binary()),
    ("split", pa.string()), ("begun", pa.string()),
]).empty_table()


def max_tasks(sources: list[Source], quotas: list[int], group_pieces: int) -> int:
    """At most how many read tasks any epoch of the plan has, however many epochs the run takes (short
    epochs make it take more than planned). An epoch's rows of a source are a window of ``quota`` rows of
    its endless stream of passes; the window meets at most ``ceil(quota / n) + 1`` passes of ``groups``
    groups each (a task per group met), and every task has at least one row."""
    total = 0
    for source, quota in zip(sources, quotas, strict=True):
        group = 1 if source.kind == "shards" else group_pieces
        groups = math.ceil(len(source.sizes) / group)
        total += min(quota, groups * (math.ceil(quota / source.num_videos) + 1))
    return total


# --- what the trainer saw ---------------------------------------------------------------------------------

class Consumption:
    """Which clips of the current epoch were trained on, per position: a video is done when all of its
    ``clips_per_video`` clips were, on whichever ranks. A rank records its own clips (``add``); ``merge``
    unites every rank's (a checkpoint's gather), so all ranks then hold the same record: a bitmap of done
    positions and the clip masks of the videos begun but not done (``partial``). A resumed pass skips the
    done videos and, of a begun one, the clips already trained: every clip of an epoch once."""

    def __init__(self, clips_per_video: int, audit_dir: str = "") -> None:
        self.clips_per_video, self.audit_dir = clips_per_video, audit_dir
        self.full = (1 << clips_per_video) - 1
        self.epoch = 0
        self.partial: dict[int, int] = {}  # position -> mask of its trained clips (not all of them)
        self.done: set[int] = set()  # since the last merge
        self.bitmap = np.zeros(0, bool)  # done positions of the epoch, every rank's, as of the last merge

    def start_epoch(self, epoch: int, bitmap: np.ndarray | None = None,
                    partial: dict[int, int] | None = None) -> None:
        self.epoch, self.partial, self.done = epoch, dict(partial or {}), set()
        self.bitmap = np.zeros(0, bool) if bitmap is None else bitmap

    def add(self, epochs: np.ndarray, positions: np.ndarray, clips: Any, step: int = 0,
            videos: list[str] | None = None) -> None:
        """The clips of a micro-batch of optimizer step ``step`` were trained on: ``clips`` says which clip
        of its video each is (the stream's ``clip`` column), ``videos`` their URIs (for the audit)."""
        n = len(positions)
        indices = np.asarray(clips).tolist()
        if self.audit_dir:  # what each step trained on, clip by clip (train.audit_dir; read_audit)
            uris = list(videos) if videos is not None else ["-"] * n
            with open(os.path.join(self.audit_dir, f"consumed-{os.getpid()}.txt"), "a") as out:
                out.writelines(f"{step} {e} {p} {c} {u}\n" for e, p, c, u in zip(
                    epochs.tolist(), positions.tolist(), indices, uris, strict=True))
        for e, p, c in zip(epochs.tolist(), positions.tolist(), indices, strict=True):
            if e == self.epoch:
                self._mark(p, 1 << c)

    def _mark(self, position: int, mask: int) -> None:
        seen = self.partial.get(position, 0) | mask
        if seen & self.full == self.full:
            self.partial.pop(position, None)
            self.done.add(position)
        else:
            self.partial[position] = seen

    def local(self) -> tuple[list[int], dict[int, int]]:
        """This rank's news for a merge: positions done since the last one, and its begun videos."""
        return sorted(self.done), dict(self.partial)

    def merge(self, per_rank: list[tuple[list[int], dict[int, int]]]) -> None:
        """Every rank's ``local()`` into the epoch's record (the same on every rank afterwards)."""
        for _, partial in per_rank:
            for position, mask in partial.items():
                self._mark(int(position), int(mask))
        finished = {p for done, _ in per_rank for p in done} | self.done
        self.partial = {p: m for p, m in self.partial.items() if p not in finished}
        positions = sorted(finished)
        if positions:
            size = max(len(self.bitmap), positions[-1] + 1)
            if size > len(self.bitmap):
                self.bitmap = np.concatenate([self.bitmap, np.zeros(size - len(self.bitmap), bool)])
            self.bitmap[positions] = True
        self.done = set()

    def packed(self) -> bytes:
        return np.packbits(self.bitmap, bitorder="little").tobytes()

    @staticmethod
    def unpack(data: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little").astype(bool)


@dataclass(frozen=True)
class AuditRecord:
    """One trained clip, as ``train.audit_dir`` records it: a line ``step epoch position clip uri``."""

    step: int
    epoch: int
    position: int
    clip: int  # which of its video's clips_per_video clips
    uri: str
    attempt: str  # the file (one per worker process: a restart writes a new one)


def read_audit(audit_dir: str) -> list[AuditRecord]:
    """Every clip the workers trained on, from a local ``train.audit_dir``, file by file in line order."""
    out = []
    for name in sorted(os.listdir(audit_dir)):
        if not name.startswith("consumed-"):
            continue
        with open(os.path.join(audit_dir, name)) as f:
            for line in f:
                step, epoch, position, clip, uri = line.rstrip("\n").split(" ", 4)
                out.append(AuditRecord(int(step), int(epoch), int(position), int(clip), uri, name))
    return out


# --- shard sets -------------------------------------------------------------------------------------------

def _scan_shard(uri: str, split: str | None) -> tuple[int, dict[int, int]]:
    """(samples of ``split``, label counts) of one shard without its index: every sample is streamed."""
    from pipeline.data import shards

    n, labels = 0, {}
    for sample in shards.iter_shard(uri):
        if split and sample.meta.get("split") not in (None, split):
            continue
        n += 1
        labels[sample.label] = labels.get(sample.label, 0) + 1
    return n, labels


def shard_sizes(uri: str, split: str | None, num_cpus: float) -> tuple[list[str], np.ndarray, dict[int, int]]:
    """(shard URIs, samples of ``split`` per shard, label counts) from the set's index.parquet when it has
    one, else from a scan of every shard in Ray tasks (a WebDataset set made elsewhere)."""
    import pyarrow.parquet as pq

    from pipeline.data import shards

    listed = [u for u, _ in shards.list_shards(uri)]
    if not listed:
        raise manifest.ManifestError(f"no shards (*.tar) at {storage.redact(uri)!r}")
    one_folder = not uri.lower().endswith((".tar", ".txt")) and "{" not in uri
    folder = uri.rstrip("/") if one_folder else posixpath.dirname(uri)
    index_uri = storage.join(folder, shards.INDEX)
    if storage.exists(index_uri):
        fs, path = storage.resolve(index_uri)
        table = pq.read_table(path, filesystem=fs, columns=["shard", "label", "split"],
                              read_dictionary=["shard", "split"])
        if split and table.column("split").null_count < table.num_rows:
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table.column("split").cast(pa.string()), split))
        per_shard = table.group_by("shard").aggregate([("label", "count")]).to_pydict()
        counts = dict(zip(per_shard["shard"], per_shard["label_count"], strict=True))
        label_table = table.group_by("label").aggregate([("shard", "count")]).to_pydict()
        labels = dict(zip(label_table["label"], label_table["shard_count"], strict=True))
        sizes = [int(counts.get(posixpath.basename(storage.resolve(u)[1]), 0)) for u in listed]
    else:
        import ray

        scan = ray.remote(num_cpus=num_cpus)(_scan_shard)
        results = ray.get([scan.remote(u, split) for u in listed])
        sizes = [n for n, _ in results]
        labels = {}
        for _, counts in results:
            for label, n in counts.items():
                labels[label] = labels.get(label, 0) + n
    keep = [i for i, n in enumerate(sizes) if n]
    if not keep:
        raise manifest.ManifestError(
            f"the shards at {storage.redact(uri)!r} hold no videos of split {split!r}"
        )
    return [listed[i] for i in keep], np.asarray([sizes[i] for i in keep], np.int64), labels


# --- the decode step ----------------------------------------------------------------------------------

def _shard_rows(row: dict[str, Any], buffer_size: int, seed: int, ledger):
    """The videos of one shard task as rows to decode (bytes in ``data``), through a seeded shuffle buffer
    of ``buffer_size`` videos; samples of other splits (the source's ``split``, when a sample names one),
    outside [lo, hi) or done are skipped before anything is decoded."""
    from pipeline.data import shards

    lo, hi, offset, split = int(row["lo"]), int(row["hi"]), int(row["position"]), row["split"]
    done = done_mask(row["skip"], 0, hi - lo)
    begun = {int(k): int(v) for k, v in json.loads(row["begun"] or "{}").items()}
    rng = _rng(seed, int(row["epoch"]), offset, 11)
    buffer: list[dict[str, Any]] = []
    index = -1
    try:
        for sample in shards.iter_shard(row["path"]):
            if split and sample.meta.get("split") not in (None, split):
                continue
            index += 1
            if not lo <= index < hi or done[index - lo]:
                continue
            if sample.video is None or sample.error:
                ledger.record(sample.name, "bad_sample", sample.error or "no video member")
                continue
            buffer.append({"path": sample.name, "data": sample.video, "label": sample.label, "start": -1.0,
                           "end": -1.0, "epoch": row["epoch"], "position": offset + index - lo,
                           "source": row["source"], "clips_done": begun.get(index - lo, 0)})
            if len(buffer) >= buffer_size:
                yield buffer.pop(int(rng.integers(len(buffer))))
    except shards.CorruptShard as e:
        ledger.record(row["path"], "corrupt_shard", str(e))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def clips_of_rows(block: dict[str, np.ndarray], cfg, mode: str, ledger, seed: int):
    """Decode step of the stream: video rows and shard rows -> batches of clips (one per
    ``videos_per_block`` videos, so a shard's clips flow while it is still being read)."""
    from pipeline.data.datasets import clip_maker

    maker = clip_maker(cfg, mode, ledger)
    rows = [dict(zip(block, values, strict=True)) for values in zip(*block.values(), strict=True)]

    def videos():
        for row in rows:
            if row["kind"] == "shard":
                yield from _shard_rows(row, cfg.shard_shuffle_buffer, seed, ledger)
            else:
                yield row

    merged: dict[str, list] = {}
    count, yielded = 0, False
    for row in videos():
        if mode != "pretrain" and row["label"] < 0:
            ledger.record(row["path"], "no_label", "finetuning needs a label")
            continue
        for key, values in (maker.clips(row) or {}).items():
            merged.setdefault(key, []).extend(values)
        count += 1
        if count % cfg.videos_per_block == 0 and merged:
            maker.flush_ok()
            yield maker.to_batch(merged)
            merged, yielded = {}, True
    maker.flush_ok()
    if merged or not yielded:
        yield maker.to_batch(merged) if merged else maker.empty_batch(streamed=True)


def build_stream(cfg, mode: str, sources: list[Source], ledger, seed: int, run_name: str | None):
    """The training stream (a ``ray.data.Dataset`` of clip rows with ``epoch`` / ``position`` / ``source``
    / ``clip``) for the pass whose epoch the run's cursor names."""
    import ray

    quotas = source_quotas(sources, cfg.epoch_videos)
    slots = max_tasks(sources, quotas, cfg.group_pieces)
    spec = StreamSpec(sources, quotas, cfg.group_pieces, seed, cfg.shuffle, run_name, slots)
    # one block per plan slot (45 for 10M manifest rows), expanded into rows by light tasks
    ds = ray.data.from_items([{"id": slot} for slot in range(slots)], override_num_blocks=slots)
    ds = ds.map_batches(expand_slots, batch_format="numpy", batch_size=None, fn_kwargs={"spec": spec},
                        num_cpus=cfg.light_num_cpus, compute=ray.data.TaskPoolStrategy(size=2))
    # a read task's rows in blocks of decode_task_size videos, one decode task per block. The repartition
    # runs as its own light tasks (expand_slots' concurrency cap keeps Ray Data from fusing the three
    # operators, which would decode a whole read task in one task again)
    ds = repartition(ds, decode_task_size(sum(quotas), cfg.decode_task_videos), cfg.light_num_cpus)
    return ds.map_batches(
        clips_of_rows, batch_size=None, batch_format="numpy",
        fn_kwargs={"cfg": cfg, "mode": mode, "ledger": ledger, "seed": seed},
        num_cpus=cfg.decode_num_cpus, resources=cfg.decode_resources or None,
        compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
    )
