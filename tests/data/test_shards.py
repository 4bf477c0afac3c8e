"""WebDataset tar shards: write, stream, ranged reads through the index, users' WebDataset tars, damaged
shards, one GET per shard on S3 and its resumption (counted and cut by a proxy in front of moto_server), an
S3 outage mid-stream (the real moto_server stopped and started), and the preprocessing job's pack step on
real local Ray."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import random
import re
import tarfile
import threading
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import webdataset
from helpers.s3_proxy import RecordingProxy, Request

from pipeline import storage
from pipeline.data.decode import DecodeSettings, decode_bytes
from pipeline.data.sampling import DenseSampler
from pipeline.data.shards import (
    INDEX,
    CorruptShard,
    ShardWriter,
    iter_shard,
    list_shards,
    parse_size,
    read_index,
    read_sample,
    safe_key,
    write_index,
)
from pipeline.preprocess.job import PreprocessConfig, format_report, run

_spec = importlib.util.spec_from_file_location(
    "preprocess_job", Path(__file__).parents[2] / "jobs/preprocess.py"
)
preprocess_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_job)

def labeled_videos(root: Path) -> list[tuple[str, bytes, dict]]:
    """(relative path without extension, file bytes, meta) of the sample dataset, in label order (as
    manifests often are)."""
    out = []
    for split in ("train", "val", "test"):
        for line in (root / f"{split}.csv").read_text().splitlines():
            rel, label = line.split()
            meta = {"label": int(label), "split": split, "label_name": rel.split("/")[1], "frames": 24}
            out.append((rel.rsplit(".", 1)[0], (root / rel).read_bytes(), meta))
    return sorted(out, key=lambda v: v[2]["label"])


def padded(videos: list[tuple[str, bytes, dict]], mib: int) -> list[tuple[str, bytes, dict]]:
    """``videos`` then ``mib`` samples of 1 MiB of random bytes (the shard reader never decodes): a shard
    of MiBs, where the sample videos make a few hundred KiB."""
    rng = random.Random(mib)
    return videos + [(f"pad_{i:02d}", rng.randbytes(1 << 20), {"pad": i}) for i in range(mib)]


def expected(videos: list[tuple[str, bytes, dict]]) -> list[tuple[str, bytes, dict]]:
    """(key, video, meta) as ``iter_shard`` gives them back: mapped keys keep the original in ``path``."""
    return [(safe_key(k), d, m if safe_key(k) == k else {**m, "path": k}) for k, d, m in videos]


def write_all(root: str, videos: list[tuple[str, bytes, dict]], **kwargs) -> list[dict]:
    with ShardWriter(root, **kwargs) as writer:
        for key, data, meta in videos:
            writer.add(key, data, "mp4", meta)
    return writer.rows


def test_round_trip_on_s3_with_ranged_reads_through_the_index(s3_bucket, sample_videos, tmp_path):
    videos = labeled_videos(sample_videos)
    root = f"{s3_bucket}/shards"
    rows = write_all(root, videos)
    write_index(rows, f"{root}/{INDEX}")
    assert [u for u, _ in list_shards(root)] == [f"{root}/shard-000000.tar"]

    samples = list(iter_shard(f"{root}/shard-000000.tar"))
    assert [s.video for s in samples] == [data for _, data, _ in videos]
    for sample, (key, _, meta) in zip(samples, videos, strict=True):
        assert sample.key == safe_key(key) and sample.ext == "mp4" and sample.error is None
        assert sample.meta == {**meta, "path": key}  # keys with "/" are mapped; the original is kept
        assert sample.label == meta["label"] and sample.name == f"{root}/shard-000000.tar#{sample.key}"

    index = read_index(f"{root}/{INDEX}")
    assert [(r["label"], r["split"], r["frames"], r["path"]) for r in index] == [
        (m["label"], m["split"], 24, k) for k, _, m in videos
    ]
    for row, (_, data, _) in zip(index, videos, strict=True):
        assert read_sample(f"{root}/{row['shard']}", row["offset"], row["bytes"]) == data

    # a plain POSIX tar that WebDataset itself reads as these samples: keys, video bytes, metadata
    local = tmp_path / "shard.tar"
    local.write_bytes(storage.read_bytes(f"{root}/shard-000000.tar"))
    with tarfile.open(local) as tar:
        assert all(m.size < 8 << 20 for m in tar.getmembers())
    samples = list(webdataset.WebDataset(str(local), shardshuffle=False))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        (safe_key(k), ["json", "mp4"]) for k, _, _ in videos]
    assert [s["mp4"] for s in samples] == [data for _, data, _ in videos]
    assert [json.loads(s["json"])["label"] for s in samples] == [m["label"] for _, _, m in videos]
    assert local.read_bytes()[257:263] == b"ustar\x00"  # POSIX ustar magic of the first header


def test_rolls_to_several_shards_by_size_and_lists_them_every_way(tmp_path, sample_videos):
    videos = labeled_videos(sample_videos)
    root = tmp_path / "shards"
    limit = 3 * max(len(d) for _, d, _ in videos) + 8192
    rows = write_all(str(root), videos, shard_bytes=limit, prefix="train")
    tars = sorted(root.glob("*.tar"))
    assert len(tars) >= 4 and [p.name for p in tars] == [f"train-{i:06d}.tar" for i in range(len(tars))]
    assert all(p.stat().st_size <= limit for p in tars) and not list(root.glob(".*"))  # no temp files left
    assert {r["shard"]: r["shard_size"] for r in rows} == {p.name: p.stat().st_size for p in tars}

    listed = [(str(p), p.stat().st_size) for p in tars]
    assert list_shards(str(root)) == listed
    assert list_shards(f"{root}/train-{{000000..{len(tars) - 1:06d}}}.tar") == listed
    (tmp_path / "shards.txt").write_text("".join(f"shards/{p.name}\n" for p in tars))
    assert list_shards(str(tmp_path / "shards.txt")) == listed
    with pytest.raises(storage.ObjectNotFound, match="1 shard"):
        list_shards(f"{root}/train-{{000000..{len(tars):06d}}}.tar")
    with pytest.raises(storage.ObjectNotFound, match="train-999999.tar"):
        next(iter_shard(str(root / "train-999999.tar")))

    streamed = [s for p, _ in listed for s in iter_shard(p)]
    assert [(s.key, s.video) for s in streamed] == [(safe_key(k), d) for k, d, _ in videos]
    for row in rows:
        data = read_sample(str(root / row["shard"]), row["offset"], row["bytes"])
        assert data == next(d for k, d, _ in videos if safe_key(k) == row["key"])


def test_reads_a_users_webdataset_tar(tmp_path, sample_videos):
    """Built by hand as WebDataset users have them: .mp4 + .cls / .json / .txt, folders in keys, directory
    entries, GNU format, a __meta__ member, a group without a video."""
    clip = (sample_videos / labeled_videos(sample_videos)[0][0]).with_suffix(".mp4").read_bytes()
    members = [
        ("a/b", None),
        ("a/b/000123.mp4", clip), ("a/b/000123.cls", b"7\n"), ("a/b/000123.txt", b"a caption"),
        ("__index__", b"ignored"),
        ("000124.webm", clip), ("000124.json", b'{"label": 2, "fps": 25}'),
        ("000125.cls", b"3"),
        ("x/000126.seg.mp4", clip), ("x/000126.cls", b"not a number"),
    ]  # fmt: skip
    path = tmp_path / "users-000000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    got = {s.key: s for s in iter_shard(str(path))}
    assert list(got) == ["a/b/000123", "000124", "000125", "x/000126"]
    a, b, c, d = got.values()
    assert (a.video, a.ext, a.label, a.error) == (clip, "mp4", 7, None)
    assert a.meta == {"label": 7, "txt": "a caption"}
    assert (b.video, b.ext, b.label, b.meta["fps"]) == (clip, "webm", 2, 25)
    assert c.video is None and c.label == 3 and "no video member" in c.error  # for the caller to name
    assert d.video == clip and d.ext == "seg.mp4" and d.label == -1 and "unreadable .cls" in d.error


def test_a_damaged_shard_yields_the_samples_before_the_damage_then_names_it(tmp_path, sample_videos):
    videos = labeled_videos(sample_videos)[:4]
    rows = write_all(str(tmp_path), videos)
    good = (tmp_path / "shard-000000.tar").read_bytes()
    third = rows[2]["offset"]  # the data of the third video
    # The group the damage interrupts is not yielded (a missing .json would go unnoticed): cut inside the
    # third video, the first two come out; cut at the third's header, only the first.
    cases = {
        "mid-video": (good[: third + 100], 2),
        "at a member boundary, without the end marker": (good[: third - 512], 1),
        "garbage header": (good[: third - 512] + b"\x07" * 512 + good[third:], 1),
    }
    for what, (data, complete) in cases.items():
        path = tmp_path / "bad" / "shard-000000.tar"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        seen = []
        with pytest.raises(CorruptShard, match=re.escape(str(path))) as e:
            seen.extend(s.video for s in iter_shard(str(path)))
        assert seen == [v[1] for v in videos[:complete]], what
        assert third - 512 <= e.value.offset <= third + 512, what
    path.write_bytes(b"")
    with pytest.raises(CorruptShard, match="not a tar"):
        list(iter_shard(str(path)))


def test_a_shard_on_s3_is_one_streamed_get(s3_server, s3_bucket, sample_videos, monkeypatch):
    """However small the reads, a shard costs the server one GET and no HEAD: per-video reads cost one
    GET (and a HEAD) each, so shards of hundreds of videos are the >= 100x fewer requests object storage
    needs, whatever the videos' size."""
    videos = padded(labeled_videos(sample_videos), mib=6)
    root = f"{s3_bucket}/one-get"
    rows = write_all(root, videos)
    chunk = 64 << 10
    assert rows[0]["shard_size"] > 90 * chunk  # a hundred reads, where pyarrow's files made one GET each
    proxy = RecordingProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        samples = list(iter_shard(f"{root}/shard-000000.tar", chunk_bytes=chunk))
        assert proxy.requests == [Request("GET", f"/{root[len('s3://') :]}/shard-000000.tar", None)]
        assert [(s.key, s.video, s.meta) for s in samples] == expected(videos)
        for missing in (f"{root}/shard-000001.tar", "s3://no-such-bucket/shard-000000.tar"):
            with pytest.raises(storage.ObjectNotFound, match=re.escape(missing)):
                next(iter_shard(missing))
    finally:
        proxy.close()


def test_a_stream_cut_mid_body_resumes_with_a_range_get_at_the_byte_reached(
    s3_server, s3_bucket, sample_videos, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, "pipeline.data.shards")
    videos = padded(labeled_videos(sample_videos), mib=4)
    bucket, key = s3_bucket[len("s3://") :], "cut/shard-000000.tar"
    uri, path = f"{s3_bucket}/{key}", f"/{bucket}/{key}"
    write_all(f"{s3_bucket}/cut", videos)
    proxy = RecordingProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    cut = 1_500_000  # response bytes (headers included) before the connection is closed: mid-body
    try:
        proxy.cut_once_after(cut)
        samples = list(iter_shard(uri, chunk_bytes=64 << 10))
        assert proxy.cuts == 1
        reached = int(re.search(rf"resuming {re.escape(uri)} at byte (\d+)", caplog.text).group(1))
        assert 0 < reached < cut
        assert proxy.requests == [Request("GET", path, None), Request("GET", path, f"bytes={reached}-")]
        assert [(s.key, s.video, s.meta) for s in samples] == expected(videos)  # each once, byte-equal

        # replaced while the stream was down: an error naming the shard, not the new tail on the old head
        def replace() -> None:
            s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
            s3.put_object(Bucket=bucket, Key=key, Body=b"another shard")

        proxy.cut_once_after(cut, on_cut=replace)
        with pytest.raises(storage.StorageError, match=rf"{re.escape(repr(uri))} .*PreconditionFailed") as e:
            list(iter_shard(uri, chunk_bytes=64 << 10))
        assert not isinstance(e.value, storage.StorageUnavailable)  # at once, not retried
    finally:
        proxy.close()


def test_an_outage_mid_stream_resumes_where_it_stopped(
    s3_server, s3_bucket, sample_videos, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, "pipeline.data.shards")
    # more than a streamed GET has in flight when the server stops (up to ~2 MiB measured on loopback), so
    # the outage cuts the body rather than finding it already delivered
    videos = padded(labeled_videos(sample_videos), mib=12)
    uri = f"{s3_bucket}/outage/shard-000000.tar"
    write_all(f"{s3_bucket}/outage", videos)
    monkeypatch.setenv(storage.RETRY_ENV, "60")
    chunk = 16 << 10
    comeback = threading.Timer(3.0, s3_server.start)
    samples: list = []
    try:
        for sample in iter_shard(uri, chunk_bytes=chunk):
            samples.append(sample)
            if len(samples) == 2:
                s3_server.stop()
                stopped = time.monotonic()
                comeback.start()
        assert time.monotonic() - stopped >= 2.5  # it did wait the outage out
        assert re.search(r"resuming s3://\S+ at byte [1-9]", caplog.text)  # mid-stream, not from the start
    finally:
        if comeback.ident:
            comeback.join()
    assert [(s.key, s.video, s.meta) for s in samples] == expected(videos)

    # longer than the window: StorageUnavailable naming the shard, within seconds
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    stream = iter_shard(uri, chunk_bytes=chunk)
    next(stream)
    s3_server.stop()
    try:
        begun = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match=re.escape(uri)):
            list(stream)
        assert time.monotonic() - begun < 30
    finally:
        s3_server.start()


def test_preprocess_packs_shards_and_a_rerun_keeps_the_complete_ones(tmp_path, sample_videos, ray_session):
    out = tmp_path / "out"
    biggest = max(p.stat().st_size for p in (sample_videos / "videos").rglob("*.mp4"))
    cfg = PreprocessConfig(
        input=str(sample_videos), output=str(out), short_side=32, workers=2, shards=True,
        shard_bytes=2 * biggest,
        annotations=[str(sample_videos / f"{s}.csv") for s in ("train", "val", "test")],
    )  # fmt: skip
    report = run(cfg)
    manifest = {r["relative_path"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert len(manifest) == 24 and all(r["status"] == "ok" for r in manifest.values())

    tars = sorted((out / "shards").glob("*.tar"))
    packed = report["shards"]
    assert packed["count"] == len(tars) >= 6 and packed["sets"].keys() == {"train", "val", "test"}
    assert (packed["videos"], packed["written"], packed["kept"]) == (24, len(tars), 0)
    assert packed["bytes"] == sum(p.stat().st_size for p in tars) and "shards  " in format_report(report)
    index = read_index(str(out / "shards" / INDEX))
    assert sorted(r["path"] for r in index) == sorted(manifest)
    for row in index:
        video = manifest[row["path"]]
        assert row["shard"].startswith(video["split"] + "-") and row["split"] == video["split"]
        assert (row["label"], row["frames"]) == (video["label"], video["out_frames"])
        data = read_sample(str(out / "shards" / row["shard"]), row["offset"], row["bytes"])
        assert data == (out / video["path"]).read_bytes()
        decoded = decode_bytes(row["path"], data, DenseSampler(4, 2), 0, DecodeSettings())
        assert decoded.frames.shape[0] == 4
    train_labels = [r["label"] for r in index if r["split"] == "train"]
    assert train_labels != sorted(train_labels)  # shuffled: a shard is not one class
    for tar in tars:
        for sample in iter_shard(str(tar)):
            video = manifest[sample.meta["path"]]
            assert sample.label == video["label"] and sample.video == (out / video["path"]).read_bytes()

    def stats() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.tar")}

    before = stats()
    again = run(cfg)["shards"]
    assert (again["written"], again["kept"]) == (0, len(tars)) and stats() == before
    tars[1].unlink()
    third = run(cfg)["shards"]
    assert third["written"] == 1 and read_index(str(out / "shards" / INDEX)) == index
    after = stats()
    assert {k: v for k, v in after.items() if k != tars[1].name} == {
        k: v for k, v in before.items() if k != tars[1].name
    }


def test_parse_size_and_the_cli():
    assert [parse_size(s) for s in ("1GiB", "256MiB", "500MB", "4096", "1.5KiB")] == [
        1 << 30, 256 << 20, 500 * 10**6, 4096, 1536
    ]  # fmt: skip
    for bad in ("1 GiX", "", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    cfg, _ = preprocess_job.parse_args(
        ["--input", "in", "--output", "out", "--shards", "--shard-size", "256MiB"]
    )
    assert cfg.shards and cfg.shard_bytes == 256 << 20
    assert preprocess_job.parse_args(["--input", "in", "--output", "out"])[0].shard_bytes == 1 << 30
