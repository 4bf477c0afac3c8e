"""Datasets whose videos are listed on the driver: evaluation, validation and the kNN probe's sets.

``build_dataset`` returns a *streaming* ``ray.data.Dataset`` (nothing is materialised) of clip rows
(columns: pipeline/data/clips.py). Decoding runs in Ray tasks (``decode_num_cpus`` each, at most
``decode_concurrency`` at once); each reads one video per GET, decodes only the sampled frames once and
makes its clips. Bad videos are skipped and recorded in the run's ``ErrorLedger`` (errors.py); the dataset
fails with ``ErrorBudgetExceeded`` only past ``max_error_fraction``. Training reads the stream instead
(pipeline/data/stream.py), over sources read on the cluster (pipeline/data/sources.py).
"""

from __future__ import annotations

import math
import random
from typing import Any

from pipeline.data import manifest
from pipeline.data.clips import clips_of_block
from pipeline.data.errors import ErrorLedger
from pipeline.data.section import MODES, DataSection
from pipeline.data.synthetic import ensure_sample_dataset


def resolve_rows(cfg: DataSection) -> list[dict[str, Any]]:
    """The manifest rows of ``cfg`` (generating the sample dataset when ``uri`` is empty)."""
    uri = cfg.uri
    if not uri:
        uri = ensure_sample_dataset(cfg.sample_cache_dir)
    rows = manifest.read_manifest(uri, cfg.data_root, cfg.split, cfg.label_map, cfg.video_ext)
    return rows[: cfg.limit] if cfg.limit else rows


def build_dataset(
    cfg: DataSection,
    mode: str,
    ledger: ErrorLedger | None = None,
    run_name: str | None = None,
    rows: list[dict[str, Any]] | None = None,
):
    """A streaming ``ray.data.Dataset`` of clip rows for ``mode`` (pretrain | finetune | eval)."""
    import ray

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if rows is None:
        rows = resolve_rows(cfg)
    if mode != "pretrain" and any(r["label"] < 0 for r in rows):
        missing = next(r["path"] for r in rows if r["label"] < 0)
        raise manifest.ManifestError(f"{mode} needs labels, but e.g. {missing} has none (uri={cfg.uri!r})")
    if ledger is None:
        ledger = ErrorLedger.get_or_create(run_name) if run_name else ErrorLedger.create("data")
    keys = ("path", "label", "start", "end")
    items = [{**{k: r.get(k, -1.0) for k in keys}, "row": i} for i, r in enumerate(rows)]
    shuffle = cfg.shuffle and mode != "eval"
    if shuffle:  # shuffle videos once here, and the order of the small blocks every epoch below
        random.Random(cfg.seed).shuffle(items)
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.videos_per_block)))
    if shuffle:
        ds = ds.randomize_block_order(seed=cfg.seed)
    return ds.map_batches(
        clips_of_block,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"cfg": cfg, "mode": mode, "ledger": ledger},
        num_cpus=cfg.decode_num_cpus,
        resources=cfg.decode_resources or None,
        compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
    )

