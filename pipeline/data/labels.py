"""Class names and label checks shared by finetuning and evaluation, run on the driver before any worker
starts.

A label the model has no output for, an unlabeled video in a labeled split or an empty split would
otherwise surface as an index error deep in a worker after minutes of decoding.
"""

from __future__ import annotations

import dataclasses
import posixpath
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline import storage
from pipeline.data.datasets import resolve_rows
from pipeline.data.manifest import ManifestError, read_label_map
from pipeline.data.section import DataSection
from pipeline.data.synthetic import ensure_sample_dataset


class LabelError(ValueError):
    """Labels and label map (or model) disagree; the message names the split and examples."""


def dataset_root(cfg: DataSection) -> str:
    """The dataset's URI, generating the sample dataset when ``cfg.uri`` is empty (as resolve_rows does)."""
    if cfg.uri:
        return cfg.uri

    return ensure_sample_dataset(cfg.sample_cache_dir)


def dataset_label_names(cfg: DataSection) -> dict[int, str] | None:
    """``{id: name}`` from ``cfg.label_map`` or a ``labels.json`` beside the manifest; None if neither."""
    if cfg.label_map:
        candidate = cfg.label_map
    else:
        root = dataset_root(cfg)
        folder = root if storage.is_dir(root) else posixpath.dirname(root.rstrip("/"))
        candidate = storage.join(folder, "labels.json")
        if not storage.exists(candidate):
            return None
    try:
        mapping = read_label_map(candidate)
    except (storage.StorageError, ValueError) as e:
        raise LabelError(f"cannot read the label map {storage.redact(candidate)}: {e}") from e
    names = {int(i): str(n) for n, i in mapping.items()}
    if len(names) != len(mapping):
        raise LabelError(f"label map {storage.redact(candidate)} gives several classes the same id")
    return names


def default_names(num_classes: int) -> dict[int, str]:
    return {i: f"class_{i}" for i in range(num_classes)}


def check_labels(rows: list[dict[str, Any]], id2label: dict[int, str], split: str) -> Counter:
    """Every row labeled and known to ``id2label``; returns the count of videos per label id."""
    if not rows:
        raise LabelError(f"the {split} split holds no videos")
    unlabeled = [r["path"] for r in rows if r["label"] < 0]
    if unlabeled:
        raise LabelError(
            f"{len(unlabeled)} videos of the {split} split have no label, e.g. {storage.redact(unlabeled[0])}"
        )
    unknown = [r for r in rows if r["label"] not in id2label]
    if unknown:
        ids = sorted({r["label"] for r in unknown})
        example = storage.redact(unknown[0]["path"])
        raise LabelError(
            f"{len(unknown)} videos of the {split} split have labels not in the label map of "
            f"{len(id2label)} classes (ids {min(id2label, default=0)}..{max(id2label, default=-1)}): "
            f"label ids {ids[:10]}{' ...' if len(ids) > 10 else ''}, e.g. {example}"
        )
    return Counter(r["label"] for r in rows)


def check_label_counts(counts: Counter, id2label: dict[int, str], split: str) -> None:
    """``check_labels`` for label counts made on the cluster: every video labeled and known."""
    if not sum(counts.values()):
        raise LabelError(f"the {split} split holds no videos")
    if counts.get(-1):
        raise LabelError(f"{counts[-1]} videos of the {split} split have no label")
    unknown = sorted(label for label in counts if label not in id2label)
    if unknown:
        known = f"ids {min(id2label, default=0)}..{max(id2label, default=-1)}"
        raise LabelError(
            f"{sum(counts[label] for label in unknown)} videos of the {split} split have labels not in the "
            f"label map of {len(id2label)} classes ({known}): label ids {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}"
        )


def missing_classes(counts: Counter, id2label: dict[int, str]) -> list[str]:
    return [id2label[i] for i in sorted(id2label) if counts.get(i, 0) == 0]


def read_rows(cfg: DataSection) -> list[dict[str, Any]]:
    """Manifest rows of ``cfg``'s split, with an empty or unreadable split as a LabelError naming it."""
    try:
        rows = resolve_rows(cfg)
    except ManifestError as e:
        raise LabelError(f"{cfg.split} split: {e}") from e
    if not rows:
        raise LabelError(
            f"the {cfg.split} split of {storage.redact(cfg.uri or 'the sample dataset')} holds no videos"
        )
    return rows


def labeled_splits(cfg: DataSection, splits: Sequence[str], limit: int | None = None,
                   prefix: str = "") -> tuple[list[list[dict[str, Any]]], dict[int, str]]:
    """The rows of each of ``splits`` of ``cfg``'s dataset (a seeded subset of at most ``limit`` each) and
    the class names (the label map, else ``class_<i>`` for every label seen), every row checked labeled and
    known; ``prefix`` names the splits in errors ("probe train split")."""
    per_split = []
    for split in splits:
        rows = read_rows(dataclasses.replace(cfg, split=split))
        per_split.append(random.Random(0).sample(rows, limit) if limit and len(rows) > limit else rows)
    names = dataset_label_names(cfg)
    if names is None:
        names = default_names(1 + max(r["label"] for rows in per_split for r in rows))
    for split, rows in zip(splits, per_split, strict=True):
        check_labels(rows, names, f"{prefix}{split}")
    return per_split, names
