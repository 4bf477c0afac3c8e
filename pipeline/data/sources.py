"""Where the training stream's videos come from: sources read on the cluster.

``prepare_sources(cfg, mode)`` reads every source of ``data.sources`` (or the one ``data.uri``) *on the
cluster*: a Parquet / JSONL / CSV manifest with Ray Data's readers, the path column checked and resolved
in the read tasks, cut into pieces (``piece_size``: about 1 MiB) and kept in the object store; a folder is
listed once; a shard set (WebDataset tars, pipeline/data/shards.py) is counted from its index, or by a
scan of its shards where it has none. The driver holds object references and row counts, never the rows,
so its memory and start-up do not grow with the manifest (benchmarks/data_scale.py). Each source's
``digest`` names its contents in order, so a resumed run can tell that its data changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.data import manifest, shards
from pipeline.data.synthetic import ensure_sample_dataset

log = logging.getLogger(__name__)

COLUMNS = ("path", "label", "start", "end")


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
    lower = uri.lower().rstrip("/")
    if lower.endswith(".tar") or ("{" in uri and "}" in uri):
        return True
    if lower.endswith(".txt"):
        return storage.exists(uri) and shards.is_shard_list(uri)
    if lower.endswith(manifest.MANIFEST_SUFFIXES):
        return False
    return storage.exists(storage.join(uri, shards.INDEX)) or shards.is_shard_folder(uri)


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
    rows, gives the same pieces to a resubmitted job). Ray keeps a task's results under its inline limit
    (``max_direct_call_object_size``, 100 KB by default) in its owner's memory, the driver's here, and
    copies them into every task that takes a reference, so a piece must be well above that (docs/data.md,
    "Scale")."""
    if piece_rows:
        return piece_rows
    rows = max(1.0, PIECE_BYTES * num_rows / max(num_bytes, 1))
    return 1 << round(math.log2(rows))


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
                           "pipeline/data/sources.py's repartition needs updating for it")
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
    """Every source of ``cfg`` (a DataSection), read or counted on the cluster; ``""`` = the sample data."""
    specs = source_specs(cfg)
    if len(specs) == 1 and not specs[0].uri:
        specs[0].uri = ensure_sample_dataset(cfg.sample_cache_dir)
    return [prepare_source(s, mode, cfg.light_num_cpus, cfg.piece_rows, cfg.limit, cfg.label_map,
                           cfg.video_ext) for s in specs]


def _scan_shard(uri: str, split: str | None) -> tuple[int, dict[int, int]]:
    """(samples of ``split``, label counts) of one shard without its index: every sample is streamed."""
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

