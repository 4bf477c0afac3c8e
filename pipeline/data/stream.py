"""The training stream: the epoch plan's tasks as a Ray Data pipeline of clip rows.

Three operators, each its own Ray tasks with its own CPU request (docs/cluster.md, "The resource plan"):

1. ``expand_slots`` (``data.light_num_cpus``): one block per plan slot; it asks the run's cursor
   (pipeline/data/resume.py) which epoch this pass is and what of it is done, and turns its slot's task
   into the rows still to decode (a shard task into one row naming the shard);
2. ``repartition`` (light): those rows in blocks of ``decode_task_size`` videos;
3. ``clips_of_rows`` (``data.decode_num_cpus``, ``data.decode_resources``): decode, sample, augment and
   mask each video (pipeline/data/clips.py), streaming a shard's videos through a seeded shuffle buffer.

Every clip row carries ``epoch``, ``position``, ``source`` and ``clip``, which the trainer counts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.cache import ProcessCache
from pipeline.data import shards
from pipeline.data.plan import Task, max_tasks, pass_groups, plan_epoch, seeded_rng, source_quotas
from pipeline.data.resume import done_mask, get_cursor
from pipeline.data.sources import COLUMNS, Source, repartition


def decode_task_size(num_videos: int, task_videos: int | None) -> int:
    """Videos per decode task: ``data.decode_task_videos``, else about four tasks per CPU of the cluster
    per epoch, from 64 to 2048. Smaller tasks mean a sooner first batch and even load over the cores, but
    each task has a fixed scheduling cost that a few small videos do not pay back (docs/data.md, "Scale",
    measures it), and a block of rows under Ray's inline limit is kept in the driver's memory (see
    piece_size): 2048 rows are above it, so however large the epoch, the driver holds at most a few small
    blocks."""
    if task_videos:
        return task_videos
    import ray

    tasks = 4 * max(int(ray.cluster_resources().get("CPU", 1)), 8)
    return int(min(2048, max(64, math.ceil(num_videos / tasks))))


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


_PLANS: ProcessCache[list[Task]] = ProcessCache(1)  # the current epoch's plan, computed once per process


def _epoch_plan(spec: StreamSpec, epoch: int) -> list[Task]:
    return _PLANS.get((spec.fingerprint(), epoch), lambda: plan_epoch(
        spec.sources, spec.quotas, spec.group_pieces, spec.seed, epoch, spec.shuffle))


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
    order = (seeded_rng(spec.seed, task.source, task.pass_, task.group, 7).permutation(num_rows)
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


def _shard_rows(row: dict[str, Any], buffer_size: int, seed: int, ledger):
    """The videos of one shard task as rows to decode (bytes in ``data``), through a seeded shuffle buffer
    of ``buffer_size`` videos; samples of other splits (the source's ``split``, when a sample names one),
    outside [lo, hi) or done are skipped before anything is decoded."""
    lo, hi, offset, split = int(row["lo"]), int(row["hi"]), int(row["position"]), row["split"]
    done = done_mask(row["skip"], 0, hi - lo)
    begun = {int(k): int(v) for k, v in json.loads(row["begun"] or "{}").items()}
    rng = seeded_rng(seed, int(row["epoch"]), offset, 11)
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
    # the clip path (torch and the decoders) is imported by the decode step alone: the stream's light
    # tasks and its split coordinator unpickle this module's functions, each in a fresh process, and
    # would otherwise import torch before the first video is read
    from pipeline.data.clips import clip_maker

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
    # one block per plan slot (plan.max_tasks: few, as a read task takes a group of pieces), expanded into
    # rows by light tasks
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

