"""The epoch plan: which rows each epoch reads, in which order, at which positions.

A pure function of (seed, epoch, source sizes, weights), so every process that needs it (the read tasks,
the tests, a resubmitted job) computes the same plan without asking anyone:

- each source is an endless stream of passes; pass ``q`` permutes its pieces (shards) with seed
  (seed, source, q), and every ``group_pieces`` consecutive pieces of it are read by one task, which
  permutes their rows together. A video can thus move anywhere at piece granularity and anywhere within
  the ``group_pieces x piece_rows`` rows it is read with (docs/data.md, "How far a video moves");
- an epoch takes ``epoch_videos x weight / sum(weights)`` rows of each source's stream (a small source
  repeats, a large one is seen in parts that rotate over epochs) and interleaves the sources' tasks in
  those proportions;
- every row gets its *position* in the epoch, carried into its clips: what exact resume counts
  (pipeline/data/resume.py).

``plan_inputs`` lists what the plan depends on; a checkpoint keeps it, and a resumed run that finds other
inputs says what changed (``describe_change``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.sources import Source


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


def seeded_rng(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of ints: the same draws in every process that names the same parts."""
    return np.random.default_rng([int(p) for p in parts])


def pass_groups(sizes: np.ndarray, group_pieces: int, seed: int, source: int, pass_: int,
                shuffle: bool = True) -> list[np.ndarray]:
    """The piece indices read together, in order, by pass ``pass_`` of a source."""
    order = seeded_rng(seed, source, pass_).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
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
    rng = seeded_rng(seed, epoch, 1 << 20)
    keyed = [((k + rng.random()) / len(ts), t) for ts in per_source for k, t in enumerate(ts)]
    if shuffle:
        keyed.sort(key=lambda kt: kt[0])
    out, offset = [], 0
    for _, (s, pass_, g, lo, hi) in keyed:
        out.append(Task(s, pass_, g, lo, hi, offset))
        offset += hi - lo
    return out


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

