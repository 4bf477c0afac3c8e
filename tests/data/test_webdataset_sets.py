"""Shard sets as other tools write them, with the ``webdataset`` package as the reference: a folder in
video2dataset's layout (``00000.tar`` + ``00000.parquet`` + ``00000_stats.json``, 9-digit keys with
``.mp4`` / ``.txt`` / ``.json`` members), a folder written by ``webdataset.ShardWriter`` (``.cls`` labels),
a brace pattern and a ``.txt`` list of shards; our own shards read by ``webdataset.WebDataset``; source
names that are valid MLflow names whatever the URI; every kind of ``data.uri`` through a job with MLflow."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from helpers.configs import tiny_data
from helpers.runs import tiny_config
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name

from pipeline.data import shards, stream
from pipeline.data.errors import ErrorLedger
from pipeline.data.resume import create_cursor
from pipeline.data.section import DataSection
from pipeline.data.sources import SourceSpec, is_shard_set, prepare_sources
from pipeline.train import pretrain as pretrain_job


def videos(sample_videos: Path) -> list[Path]:
    return sorted(sample_videos.glob("videos/*/train_*.mp4"))  # 8 real H.264 files, one per class


def write_video2dataset(folder: Path, good: list[Path]) -> list[str]:
    """video2dataset's output: per shard a tar, a parquet and a stats file; the last sample of each shard
    broken on purpose (an empty video, random bytes). Returns the broken samples' ``shard#key`` names."""
    folder.mkdir(parents=True)
    broken = []
    for shard, part in enumerate((good[:4], good[4:])):
        keys, members = [], []
        for i, path in enumerate(part):
            keys.append(f"{shard:05d}{i:04d}")
            members.append(path.read_bytes())
        keys.append(f"{shard:05d}{len(part):04d}")
        members.append(b"" if shard == 0 else os.urandom(3000))
        tar = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(tar)) as sink:
            for key, data in zip(keys, members, strict=True):
                sink.write({"__key__": key, "mp4": data, "txt": f"a caption of {key}",
                            "json": {"key": key, "status": "success", "url": f"https://example.org/{key}"}})
        pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}),
                       folder / f"{shard:05d}.parquet")
        stats = {"count": len(keys), "successes": len(keys)}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        broken.append(f"{tar}#{keys[-1]}")
    return broken


def write_shardwriter(folder: Path, good: list[Path]) -> None:
    """A labelled set as WebDataset users write it: ShardWriter, ``.cls`` labels, 3 samples a shard."""
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=3, verbose=0) as sink:
        for i, path in enumerate(good):
            sink.write({"__key__": f"clip{i:03d}", "mp4": path.read_bytes(), "cls": i % 4})


def tiny(uri: str, **kw) -> DataSection:
    return tiny_data(uri, **{"max_error_fraction": 0.5, **kw})  # the sets hold broken samples on purpose


def read_epoch(cfg: DataSection, run: str) -> tuple[Counter, dict]:
    sources = prepare_sources(cfg, "pretrain")
    cursor = create_cursor(run)  # noqa: F841 - held: the actor lives as long as its handle
    ray.get(cursor.set.remote(0, b""))
    ledger = ErrorLedger.get_or_create(run)
    ds = stream.build_stream(cfg, "pretrain", sources, ledger, 0, run)
    seen = Counter(v for b in ds.iter_batches(batch_size=None) for v in b["video"].tolist())
    return seen, ledger.snapshot()


@pytest.mark.integration
def test_a_video2dataset_folder_is_a_shard_set_and_its_broken_samples_are_named(ray_session, sample_videos,
                                                                                tmp_path):
    good = videos(sample_videos)
    broken = write_video2dataset(tmp_path / "v2d", good)
    assert is_shard_set(str(tmp_path / "v2d"))  # no index.parquet: the bookkeeping is not one
    (source,) = prepare_sources(tiny(str(tmp_path / "v2d")), "pretrain")
    assert source.kind == "shards" and source.sizes.tolist() == [5, 5] and source.spec.label() == "v2d"
    seen, snap = read_epoch(tiny(str(tmp_path / "v2d")), "test-v2d")
    assert sorted(seen) == sorted(f"{tmp_path / 'v2d'}/{s:05d}.tar#{s:05d}{i:04d}" for s in (0, 1)
                                  for i in range(4))
    errors = {e["uri"] for e in ErrorLedger.get_or_create("test-v2d").errors()}
    assert errors == set(broken) and snap["errors"] == 2
    # the sample's .txt and .json are its metadata
    sample = next(shards.iter_shard(str(tmp_path / "v2d" / "00000.tar")))
    assert sample.meta["txt"] == "a caption of 000000000" and sample.meta["status"] == "success"


@pytest.mark.integration
def test_shardwriter_sets_brace_patterns_and_shard_lists_are_shard_sets(ray_session, sample_videos, tmp_path):
    good = videos(sample_videos)
    write_shardwriter(tmp_path / "wds", good)
    names = sorted(p.name for p in (tmp_path / "wds").glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    (tmp_path / "shards.txt").write_text("# the training shards\n" + "\n".join(f"wds/{n}" for n in names))
    (tmp_path / "videos.txt").write_text("videos/a.mp4 0\n")  # a VideoMAE manifest, not a shard list
    for uri in (tmp_path / "wds", f"{tmp_path}/wds/train-{{000000..000002}}.tar", tmp_path / "shards.txt"):
        assert is_shard_set(str(uri)), uri
        (source,) = prepare_sources(tiny(str(uri)), "finetune")
        assert source.sizes.tolist() == [3, 3, 2] and source.labels == {0: 2, 1: 2, 2: 2, 3: 2}
    assert not is_shard_set(str(tmp_path / "videos.txt"))
    seen, snap = read_epoch(tiny(str(tmp_path / "shards.txt")), "test-shard-list")
    assert len(seen) == 8 and snap["errors"] == 0


def test_our_shards_read_with_webdataset(sample_videos, tmp_path):
    good = videos(sample_videos)
    writer = shards.ShardWriter(str(tmp_path / "ours"), shard_bytes=None, prefix="train")
    for i, path in enumerate(good):
        writer.add(f"v{i:03d}", path.read_bytes(), "mp4", {"label": i, "split": "train"})
    writer.close()
    (tar,) = sorted((tmp_path / "ours").glob("*.tar"))
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"v{i:03d}" for i in range(8)]
    assert all(s["mp4"] == p.read_bytes() for s, p in zip(samples, good, strict=True))
    assert [json.loads(s["json"])["label"] for s in samples] == list(range(8))


@given(st.text(max_size=40), st.text(max_size=20))
def test_every_source_name_is_a_valid_mlflow_metric_name(uri, name):
    for spec in (SourceSpec(uri), SourceSpec(uri, name=name),
                 SourceSpec(f"s3://bucket/{uri}/{{00000..00009}}.tar")):
        label = spec.label()
        assert label
        _validate_metric_name(f"data/clips/{label}")  # raises MlflowException on a bad one


def test_a_brace_pattern_is_named_after_its_folder():
    # it was "{000000", and MLflow refused the metric name
    assert SourceSpec("/data/wds/train-{000000..000002}.tar").label() == "wds"
    assert SourceSpec("s3://bucket/wds/{00000..00009}.tar").label() == "wds"


@pytest.mark.integration
def test_every_kind_of_source_pretrains_with_mlflow(ray_session, sample_videos, tmp_path):
    """A folder, a manifest, a brace pattern, a video2dataset folder and a shard list, mixed in one job:
    each source's clips are logged under its name, and no name fails the run."""
    good = videos(sample_videos)
    broken = write_video2dataset(tmp_path / "v2d", good)
    write_shardwriter(tmp_path / "wds", good)
    (tmp_path / "lists").mkdir()
    tars = sorted((tmp_path / "v2d").glob("*.tar"))
    (tmp_path / "lists" / "shards.txt").write_text("\n".join(str(p) for p in tars))
    (tmp_path / "folder").mkdir()
    for path in good:
        (tmp_path / "folder" / path.name.replace("train", path.parent.name)).write_bytes(path.read_bytes())
    (tmp_path / "manifest.csv").write_text("".join(f"{p} {i}\n" for i, p in enumerate(good)))
    mix = [{"uri": str(tmp_path / "folder")}, {"uri": str(tmp_path / "manifest.csv")},
           {"uri": f"{tmp_path}/wds/train-{{000000..000002}}.tar"}, {"uri": str(tmp_path / "v2d")},
           {"uri": str(tmp_path / "lists" / "shards.txt"), "name": "v2d list (txt)"}]
    cfg = tiny_config(tmp_path, "", run_name="every-kind", **{
        "data.sources": json.dumps(mix), "data.epoch_videos": "20", "train.max_steps": "4",
        "train.log_every_steps": "2", "scaling.num_workers": "1", "data.max_error_fraction": "0.5"})
    result = pretrain_job.run_pretrain(cfg)
    assert result.final_step == 4
    metrics = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    names = {k.removeprefix("data/clips/") for k in metrics if k.startswith("data/clips/")}
    assert names == {"folder", "manifest", "wds", "v2d", "v2d_list_txt"}
    assert np.isfinite(metrics["loss"])
    report = [json.loads(line) for line in Path(result.error_report_uri).read_text().splitlines()]
    assert {e["uri"] for e in report} <= set(broken)  # 4 steps read part of the epoch: no good one named

