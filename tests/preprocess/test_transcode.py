"""Per-video probing, transcoding and the time limit (no Ray): real files written with PyAV."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import av
import decord
import pytest
from helpers.preprocess_videos import HUGE_MAX_PIXELS, ODD_CODECS, write_broken_set, write_video

from pipeline.preprocess.transcode import VideoSettings, output_size, process_video
from pipeline.preprocess.worker import IsolatedVideoWorker

SMALL = VideoSettings(short_side=64, max_pixels=HUGE_MAX_PIXELS)


@pytest.fixture(scope="module")
def broken_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("broken-set")
    return root, write_broken_set(root)


@pytest.fixture(scope="module")
def slow_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 s to transcode at preset "medium" here (120 frames took 0.2 s): long enough to kill mid-way."""
    return write_video(tmp_path_factory.mktemp("slow") / "slow.mp4", frames=1500, size=(480, 640))


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_output_size_keeps_aspect_even_and_never_upscales():
    assert output_size(1280, 720, 320) == (568, 320)
    assert output_size(720, 1280, 320) == (320, 568)
    assert output_size(640, 480, 320) == (426, 320)
    assert output_size(160, 120, 320) == (160, 120)  # already small: not upscaled
    assert output_size(161, 121, 320) == (160, 120)  # odd sizes become even (yuv420p), never larger
    w, h = output_size(1920, 1080, 224)
    assert h == 224 and abs(w / h - 16 / 9) < 0.01 and w % 2 == 0


def test_transcode_keeps_frames_fps_aspect_and_puts_a_keyframe_every_second(tmp_path: Path):
    src = write_video(tmp_path / "in/clip.mp4", frames=75, size=(180, 320), fps=30)
    dst = tmp_path / "out/clip.mp4"
    row = process_video(str(src), str(dst), str(tmp_path / "out/.clip.tmp"), SMALL)

    assert row["status"] == "ok", row
    assert (row["codec"], row["width"], row["height"], row["frames"], row["fps"]) == (
        "h264",
        320,
        180,
        75,
        30.0,
    )
    assert row["duration"] == pytest.approx(2.5)
    assert (row["out_width"], row["out_height"], row["out_frames"]) == (114, 64, 75)
    assert row["out_bytes"] == dst.stat().st_size
    assert leftovers(tmp_path / "out") == ["clip.mp4"]
    with av.open(str(dst)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == 30.0
        keyframes = [i for i, p in enumerate(p for p in c.demux(stream) if p.size) if p.is_keyframe]
    assert keyframes[0] == 0 and max(b - a for a, b in itertools.pairwise([*keyframes, 75])) <= 30
    reader = decord.VideoReader(str(dst))  # what training reads it with
    assert len(reader) == 75 and reader[74].shape == (64, 114, 3)


def test_small_video_is_not_upscaled(tmp_path: Path):
    src = write_video(tmp_path / "small.mp4", frames=10, size=(48, 64))
    row = process_video(
        str(src), str(tmp_path / "o.mp4"), str(tmp_path / ".o.tmp"), VideoSettings(short_side=320)
    )
    assert (row["status"], row["out_width"], row["out_height"]) == ("ok", 64, 48)


@pytest.mark.parametrize("transcode", [True, False], ids=["transcode", "probe-only"])
def test_every_broken_kind_becomes_a_reason_and_leaves_no_file(broken_set, tmp_path: Path, transcode: bool):
    root, expected = broken_set
    settings = VideoSettings(transcode=transcode, short_side=64, max_pixels=HUGE_MAX_PIXELS)
    out = tmp_path / "out"
    for rel, status in expected.items():
        dst = out / (os.path.splitext(rel)[0] + ".mp4")
        row = process_video(str(root / rel), str(dst), str(dst.parent / f".{dst.name}.tmp"), settings)
        assert row["status"] == status, (rel, row)
        if status != "ok":
            assert row["error"], rel  # the reason comes with a detail
        if rel in ODD_CODECS:
            assert row["codec"] == ODD_CODECS[rel] and row["frames"] == 20
    made = [os.path.splitext(p)[0] for p in leftovers(out)] if out.exists() else []
    assert made == (sorted(os.path.splitext(k)[0] for k in ODD_CODECS) if transcode else [])


def test_missing_file_and_missing_object(tmp_path: Path, s3_bucket: str):
    local = process_video(str(tmp_path / "gone.mp4"), None, None, VideoSettings(transcode=False))
    remote = process_video(f"{s3_bucket}/gone.mp4", None, None, VideoSettings(transcode=False))
    assert (local["status"], remote["status"]) == ("not_found", "not_found")


def test_transcode_from_and_to_s3(tmp_path: Path, s3_bucket: str):
    from pipeline import storage

    src = write_video(tmp_path / "a.mp4", frames=12)
    storage.upload_file(str(src), f"{s3_bucket}/raw/a.mp4")
    row = process_video(
        f"{s3_bucket}/raw/a.mp4", f"{s3_bucket}/out/a.mp4", str(tmp_path / "tmp/x.mp4"), SMALL
    )
    assert row["status"] == "ok", row
    assert storage.list_files(f"{s3_bucket}/out") == [(f"{s3_bucket}/out/a.mp4", row["out_bytes"])]
    assert not (tmp_path / "tmp/x.mp4").exists()


def test_time_limit_kills_the_worker_removes_the_partial_file_and_recovers(tmp_path: Path, slow_video: Path):
    slow = slow_video
    quick = write_video(tmp_path / "in/quick.mp4", frames=10)
    out = tmp_path / "out"
    worker = IsolatedVideoWorker(VideoSettings(short_side=320, preset="medium"), timeout_s=0.5)
    try:
        row = worker.process(str(slow), str(out / "slow.mp4"), str(out / ".slow.mp4.tmp"))
        assert row["status"] == "timeout" and "0.5s" in row["error"]
        assert not out.exists() or leftovers(out) == []
        worker.timeout_s = 60
        row = worker.process(str(quick), str(out / "quick.mp4"), str(out / ".quick.mp4.tmp"))
        assert row["status"] == "ok", row
        assert leftovers(out) == ["quick.mp4"]
    finally:
        worker.close()


def test_worker_reports_a_crashed_child_and_starts_a_new_one(tmp_path: Path, slow_video: Path):
    slow = slow_video
    worker = IsolatedVideoWorker(VideoSettings(preset="medium"), timeout_s=60)
    try:
        worker._child.start()
        killer = threading.Timer(0.3, worker._child._proc.kill)  # dies mid-video, as on a segfault
        killer.start()
        row = worker.process(str(slow), str(tmp_path / "o/slow.mp4"), str(tmp_path / "o/.slow.tmp"))
        killer.join()
        assert row["status"] == "decoder_crash" and "exit code -9" in row["error"]
        assert not (tmp_path / "o").exists() or leftovers(tmp_path / "o") == []
        worker.settings = VideoSettings(transcode=False)
        assert worker.process(str(slow), None, None)["status"] == "ok"
    finally:
        worker.close()


def test_rerun_plan_redoes_transient_failures_and_changed_inputs(tmp_path: Path):
    from pipeline.preprocess.job import PreprocessConfig, _plan, _write_parquet

    for name in ("timed_out", "broken", "changed", "done"):
        write_video(tmp_path / f"in/{name}.mp4", frames=4)
    cfg = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), transcode=False)
    fingerprint = cfg.settings().fingerprint()

    def row(name: str, status: str, size: int | None = None) -> dict:
        src = str(tmp_path / f"in/{name}.mp4")
        return {"original_path": src, "path": src, "status": status, "settings": fingerprint,
                "bytes": size if size is not None else os.path.getsize(src)}  # fmt: skip

    previous = [row("timed_out", "timeout"), row("broken", "not_a_video"), row("changed", "ok", size=1),
                row("done", "ok")]  # fmt: skip
    previous[-1]["label"] = 5
    _write_parquet(str(tmp_path / "out/manifest.parquet"), previous)
    plan = _plan(cfg, str(tmp_path / "in"), str(tmp_path / "out"))
    assert [os.path.basename(t["src"]) for t in plan.tasks] == ["changed.mp4", "timed_out.mp4"]
    assert plan.rows[str(tmp_path / "in/done.mp4")]["label"] == 5  # kept when no annotations are given
    cfg.retry_failed = True
    todo = [os.path.basename(t["src"]) for t in _plan(cfg, str(tmp_path / "in"), str(tmp_path / "out")).tasks]
    assert todo == ["broken.mp4", "changed.mp4", "timed_out.mp4"]
    cfg.min_frames = 3  # other settings: every row is redone
    assert len(_plan(cfg, str(tmp_path / "in"), str(tmp_path / "out")).tasks) == 4
