"""The training stream: manifests read on the cluster, the seeded epoch plan, mixtures, exact-resume
skipping, shards, all on the session's real Ray with real video files."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from helpers.configs import tiny_data

from pipeline.data import shards, stream
from pipeline.data.errors import ErrorLedger
from pipeline.data.manifest import ManifestError
from pipeline.data.plan import Task, describe, epoch_quotas, pass_groups, plan_epoch
from pipeline.data.resume import Consumption, create_cursor, done_mask, get_cursor
from pipeline.data.section import DataSection
from pipeline.data.sources import Source, SourceSpec, prepare_source, prepare_sources, source_specs
from pipeline.train import resources


def tiny(uri: str, **kw) -> DataSection:
    return tiny_data(uri, **{"piece_rows": 3, "group_pieces": 2, **kw})  # several pieces and groups


def fake(sizes: list[int], kind: str = "rows", weight: float = 1.0) -> Source:
    return Source(SourceSpec(f"/data/{len(sizes)}", weight), kind, np.asarray(sizes))


def positions(plan: list[Task]) -> list[int]:
    return [t.offset + i for t in plan for i in range(t.hi - t.lo)]


def test_an_epoch_plan_is_a_seeded_permutation_and_rotates_over_epochs():
    sources = [fake([1024, 1024, 1024, 500])]
    quotas = epoch_quotas([s.num_videos for s in sources], [1.0], None)
    plan = plan_epoch(sources, quotas, 2, seed=0, epoch=0)
    assert positions(plan) == list(range(3572))  # every position once, in order of the tasks
    assert plan == plan_epoch(sources, quotas, 2, seed=0, epoch=0)  # a function of its inputs
    other = plan_epoch(sources, quotas, 2, seed=0, epoch=1)
    groups = [[int(p) for p in g] for g in pass_groups(sources[0].sizes, 2, 0, 0, 0)]
    assert sorted(p for g in groups for p in g) == [0, 1, 2, 3]
    assert [(t.pass_, t.group) for t in other] == [(1, 0), (1, 1)]  # epoch 1 reads pass 1
    assert groups != [[int(p) for p in g] for g in pass_groups(sources[0].sizes, 2, 0, 0, 1)]


def test_a_mixture_takes_each_source_in_proportion_and_a_small_one_repeats():
    big, small = fake([100] * 30), fake([50, 50], weight=1.0)
    quotas = epoch_quotas([3000, 100], [3.0, 1.0], 800)
    assert quotas == [600, 200]
    plan = plan_epoch([big, small], quotas, 4, seed=1, epoch=0)
    per_source = Counter()
    for t in plan:
        per_source[t.source] += t.hi - t.lo
    assert per_source == {0: 600, 1: 200}  # the small source gives its 100 videos twice
    assert {t.pass_ for t in plan if t.source == 1} == {0, 1}
    assert positions(plan) == list(range(800))
    order = [t.source for t in plan]  # interleaved, not one source after the other
    assert order != sorted(order)
    # the big source's part rotates: epoch 1 continues its stream where epoch 0 stopped
    later = plan_epoch([big, small], quotas, 4, seed=1, epoch=1)
    first_big = next(t for t in later if t.source == 0)
    assert (first_big.pass_, first_big.group, first_big.lo) == (0, 1, 200)  # 600 rows = 1.5 groups of 400


def test_consumption_marks_a_video_done_when_all_its_clips_trained_on_any_ranks():
    a, b = Consumption(clips_per_video=2), Consumption(clips_per_video=2)
    a.start_epoch(3)
    b.start_epoch(3)
    a.add(np.array([3, 3, 3, 2]), np.array([5, 5, 7, 1]), np.array([0, 1, 0, 0]))  # epoch 2's: ignored
    b.add(np.array([3, 3, 3, 3]), np.array([9, 9, 7, 11]), np.array([1, 0, 1, 1]))
    news = [a.local(), b.local()]
    for rank in (a, b):  # a checkpoint's gather: every rank merges every rank's news
        rank.merge(news)
        assert np.flatnonzero(rank.bitmap).tolist() == [5, 7, 9]  # 7: one clip on each rank
        assert rank.partial == {11: 0b10}  # begun: clip 1 trained, clip 0 not
    again = Consumption.unpack(a.packed())
    assert np.flatnonzero(again).tolist() == [5, 7, 9]
    assert np.flatnonzero(done_mask(a.packed(), 4, 12)).tolist() == [1, 3, 5]
    a.add(np.array([3]), np.array([11]), np.array([0]))
    a.merge([a.local()])
    assert a.partial == {} and a.bitmap[11]


@pytest.mark.integration
def test_manifests_are_read_on_the_cluster_and_checked_there(ray_session, sample_videos, tmp_path):
    train = [r for r in csv.reader((sample_videos / "train.csv").read_text().splitlines())]
    rows = [{"path": r[0].split()[0], "label": int(r[0].split()[1]), "split": "train", "status": "ok"}
            for r in train]
    rows += [{"path": rows[0]["path"], "label": 0, "split": "val", "status": "ok"},
             {"path": "missing.mp4", "label": 0, "split": "train", "status": "undecodable"}]
    pq.write_table(pa.Table.from_pylist(rows), sample_videos / "all.parquet")
    source = prepare_source(SourceSpec(str(sample_videos / "all.parquet"), split="train"),
                                   "finetune", 0.25, piece_rows=3)
    assert source.num_videos == 8 and list(source.sizes) == [3, 3, 2]  # ok rows of the split, in pieces
    assert source.labels == {i: 1 for i in range(8)}
    table = pa.concat_tables(ray.get(source.refs))
    assert all(Path(p).is_file() for p in table.column("path").to_pylist())  # resolved against the root

    (tmp_path / "escape.csv").write_text("../../etc/passwd 0\n")
    with pytest.raises(ManifestError, match="escapes the data root"):
        prepare_source(SourceSpec(str(tmp_path / "escape.csv"), data_root=str(tmp_path)),
                              "pretrain", 0.25, piece_rows=3)
    (tmp_path / "unlabelled.csv").write_text(f"{sample_videos / 'videos'}\n")
    with pytest.raises(ManifestError, match="have no label"):
        prepare_source(SourceSpec(str(tmp_path / "unlabelled.csv")), "finetune", 0.25,
                              piece_rows=3)


@pytest.mark.integration
def test_pieces_of_a_large_manifest_live_in_the_object_store(ray_session, sample_videos, tmp_path):
    # Ray keeps task results under 100 KB in the driver's memory and copies them into every task that
    # takes their reference: default pieces are sized (about 1 MiB) to stay out of it
    videos = [str(p.relative_to(sample_videos)) for p in sorted((sample_videos / "videos").rglob("*.mp4"))]
    rows = 40_000
    paths = [videos[i % len(videos)] for i in range(rows)]
    pq.write_table(pa.table({"path": paths}), tmp_path / "big.parquet")
    source = prepare_source(SourceSpec(str(tmp_path / "big.parquet"),
                                                     data_root=str(sample_videos)), "pretrain", 0.25)
    assert source.num_videos == rows and len(source.sizes) >= 2
    assert max(len(ray.cloudpickle.dumps(ref)) for ref in source.refs) < 4096  # a reference, not the rows
    assert min(t.nbytes for t in ray.get(source.refs[:-1])) > 100 << 10


@pytest.mark.integration
def test_an_ssv2_json_takes_the_label_map_and_video_suffix_the_validation_does(ray_session, tmp_path):
    """The training stream reads an SSv2 list with data.label_map and data.video_ext, as validation does
    (without them it looked for labels.json beside the list and for .webm files)."""
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "templates.json").write_text(json.dumps({"Pushing something": "0",
                                                                  "Holding something": "1"}))
    (tmp_path / "train.json").write_text(json.dumps([{"id": "1", "template": "Holding [something]"},
                                                     {"id": "2", "template": "Holding [something]"},
                                                     {"id": "3", "template": "Pushing [something]"}]))
    cfg = tiny(str(tmp_path / "train.json"), label_map=str(tmp_path / "maps" / "templates.json"),
               video_ext=".mp4")
    (source,) = prepare_sources(cfg, "finetune")
    assert source.labels == {1: 2, 0: 1}
    rows = [r for ref in source.refs for r in ray.get(ref).to_pylist()]
    assert sorted(Path(r["path"]).name for r in rows) == ["1.mp4", "2.mp4", "3.mp4"]


@pytest.mark.integration
def test_pieces_of_a_manifest_read_by_several_tasks_are_the_same_when_rebuilt(ray_session, tmp_path):
    """A resubmitted job rebuilds the pieces: they, and so every position, must be a function of the
    manifest, not of which read task finished first; a changed manifest changes the digest."""
    (tmp_path / "m.parquet").mkdir()
    for i in range(4):
        pq.write_table(pa.table({"path": [f"/v/{i}_{j}.mp4" for j in range(50 + 10 * i)]}),
                       tmp_path / "m.parquet" / f"part-{i}.parquet")
    spec = SourceSpec(str(tmp_path / "m.parquet"))
    builds = [prepare_source(spec, "pretrain", 0.25, piece_rows=16) for _ in range(3)]
    rows = [[r["path"] for ref in b.refs for r in ray.get(ref).to_pylist()] for b in builds]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 260
    # a strict repartition: every piece full but the last
    assert [b.sizes.tolist() for b in builds] == [[16] * 16 + [4]] * 3
    assert len({b.digest for b in builds}) == 1
    pq.write_table(pa.table({"path": ["/v/other.mp4"]}), tmp_path / "m.parquet" / "part-9.parquet")
    assert prepare_source(spec, "pretrain", 0.25, piece_rows=16).digest != builds[0].digest


@pytest.mark.integration
def test_decode_tasks_take_at_most_decode_task_videos(ray_session, sample_videos):
    run = "test-task-size"
    cursor = create_cursor(run)  # noqa: F841 - held: the actor lives as long as its handle
    ray.get(cursor.set.remote(0, b""))
    per_block = {}
    for task_videos in (2, 8):
        cfg = tiny(str(sample_videos), videos_per_block=100, decode_task_videos=task_videos,
                   light_num_cpus=0.3, decode_num_cpus=0.7, decode_resources={"decode": 0.5})
        sources = prepare_sources(cfg, "pretrain")
        ds = stream.build_stream(cfg, "pretrain", sources, ErrorLedger.get_or_create(run), 0, run)
        # every stage asks for what the config says, none for Ray's default of a whole CPU
        asked = [stage.request for stage in resources.stages("train", ds)]
        assert asked == [{"CPU": 0.3}, {"CPU": 0.3}, {"CPU": 0.7, "decode": 0.5}]
        # a decode task yields its clips as one block here (videos_per_block > its videos)
        per_block[task_videos] = [len(set(b["position"].tolist())) for b in ds.iter_batches(batch_size=None)]
    assert sum(per_block[2]) == sum(per_block[8]) == 8
    assert max(per_block[2]) == 2 and max(per_block[8]) > 2  # read tasks hold 6 and 2 videos


def read_stream(cfg: DataSection, sources, run_name: str, epoch: int = 0, done: bytes = b"",
                begun: dict[int, int] | None = None) -> dict:
    ray.get(get_cursor(run_name).set.remote(epoch, done, begun))
    ds = stream.build_stream(cfg, "pretrain", sources, ErrorLedger.get_or_create(run_name), 0, run_name)
    seen: dict = {"position": [], "source": [], "epoch": set(), "video": [], "clip": []}
    for batch in ds.iter_batches(batch_size=8):
        seen["video"] += batch["video"].tolist()
        seen["clip"] += batch["clip"].tolist()
        seen["position"] += batch["position"].tolist()
        seen["source"] += batch["source"].tolist()
        seen["epoch"] |= set(batch["epoch"].tolist())
    return seen


@pytest.mark.integration
def test_the_stream_reads_each_video_of_an_epoch_once_and_skips_done_ones(ray_session, sample_videos):
    cfg = tiny(str(sample_videos), clips_per_video=2)
    sources = prepare_sources(cfg, "pretrain")
    cursor = create_cursor("test-stream")  # noqa: F841 - held: the actor lives as long as its handle
    seen = read_stream(cfg, sources, "test-stream", epoch=1)
    assert sorted(seen["position"]) == sorted(list(range(8)) * 2) and seen["epoch"] == {1}

    done = np.zeros(8, bool)
    done[[0, 3, 4]] = True  # a resumed epoch: these were trained on before the interruption
    ledger_before = ErrorLedger.get_or_create("test-stream").snapshot()["videos"]
    packed = np.packbits(done, bitorder="little").tobytes()
    seen = read_stream(cfg, sources, "test-stream", epoch=1, done=packed)
    assert sorted(set(seen["position"])) == [1, 2, 5, 6, 7]
    decoded = ErrorLedger.get_or_create("test-stream").snapshot()["videos"] - ledger_before
    assert decoded == 5  # the done ones were dropped before decoding

    # begun videos: of video 1 clip 0 was trained, of video 2 clip 1: only the other clip of each comes
    seen = read_stream(cfg, sources, "test-stream", epoch=1, done=packed, begun={1: 0b01, 2: 0b10})
    clips = Counter(zip(seen["position"], seen["clip"], strict=True))
    assert clips == {(1, 1): 1, (2, 0): 1, (5, 0): 1, (5, 1): 1, (6, 0): 1, (6, 1): 1, (7, 0): 1, (7, 1): 1}


@pytest.mark.integration
def test_a_weighted_mixture_of_a_folder_and_shards(ray_session, sample_videos, tmp_path):
    # the test split packed as WebDataset shards (3 per shard), next to the train split as a folder
    test_rows = [line.split() for line in (sample_videos / "test.csv").read_text().splitlines()]
    writer = shards.ShardWriter(str(tmp_path / "shards"), shard_bytes=None, prefix="test")
    index = []
    for i, (path, label) in enumerate(test_rows):
        if i % 3 == 0 and i:
            index += writer.close()
            writer = shards.ShardWriter(str(tmp_path / "shards"), None, prefix="test", first=i // 3)
        writer.add(f"v{i:03d}", (sample_videos / path).read_bytes(), "mp4", {"label": int(label)})
    index += writer.close()
    shards.write_index(index, str(tmp_path / "shards" / shards.INDEX))
    folder = tmp_path / "train"
    shutil.copytree(sample_videos / "videos", folder)
    for video in folder.rglob("*.mp4"):
        if not any(video.name in line for line in (sample_videos / "train.csv").read_text().splitlines()):
            video.unlink()

    mix = [{"uri": str(folder), "weight": 3, "name": "folder"},
           {"uri": str(tmp_path / "shards"), "weight": 1, "name": "shards"}]
    cfg = tiny("", sources=mix, epoch_videos=12, shard_shuffle_buffer=2)
    sources = prepare_sources(cfg, "pretrain")
    assert [s.kind for s in sources] == ["rows", "shards"] and [s.num_videos for s in sources] == [8, 8]
    assert "shards (8 videos, shards in 3 shards, 3 per epoch)" in describe(sources, 12)
    cursor = create_cursor("test-mixture")  # noqa: F841
    seen = read_stream(cfg, sources, "test-mixture")
    assert Counter(seen["source"]) == {0: 9, 1: 3}  # 3:1 of 12 videos, one clip each
    assert sorted(seen["position"]) == list(range(12))
    assert ErrorLedger.get_or_create("test-mixture").snapshot()["errors"] == 0

    # the shards alone, of 3, 3 and 2 videos: one epoch reads every video once, whatever the shard order
    only = tiny(str(tmp_path / "shards"), shard_shuffle_buffer=2)
    (shard_source,) = prepare_sources(only, "pretrain")
    cursor = create_cursor("test-shards")  # noqa: F841
    for epoch in (0, 1):
        seen = read_stream(only, [shard_source], "test-shards", epoch=epoch)
        assert sorted(seen["position"]) == list(range(8)), epoch
        assert len(set(seen["video"])) == 8, seen["video"]  # each shard's videos, none lost or repeated
    orders = [[g[0] for g in pass_groups(shard_source.sizes, 1, 0, 0, q)] for q in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # the shard order changes between passes


def test_sources_are_checked(sample_videos):
    with pytest.raises(ValueError, match="weight must be > 0"):
        source_specs(tiny("", sources=[{"uri": "a", "weight": 0}]))
    with pytest.raises(ValueError, match="names must differ"):
        source_specs(tiny("", sources=["s3://b/x/videos", "s3://c/y/videos"]))
    with pytest.raises(ValueError, match="needs 'uri'"):
        source_specs(tiny("", sources=[{"path": "a"}]))
    specs = source_specs(dataclasses.replace(tiny(str(sample_videos)), split="val"))
    assert [(s.uri, s.weight, s.split) for s in specs] == [(str(sample_videos), 1.0, "val")]
