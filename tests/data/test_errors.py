"""Bad input: every kind of broken video is skipped, counted by reason and named; the run fails only
past max_error_fraction. Real files (PyAV-written), real helper processes, a real hang (a FIFO)."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline import storage
from pipeline.data.decode import Decoder, DecodeSettings, read_and_decode
from pipeline.data.errors import REASONS, ErrorBudgetExceeded, ErrorLedger, VideoError
from pipeline.data.sampling import DenseSampler


def h264_bytes(width: int = 64, height: int = 48, frames: int = 12, codec="libx264", fmt="mp4") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(25))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast"}
        for i in range(frames):
            img = np.full((height, width, 3), (i * 20) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def audio_only_bytes() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        for _ in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected reason)."""
    good = h264_bytes()
    return {
        "zero.mp4": (b"", "empty"),
        "truncated.mp4": (good[: len(good) // 2], "undecodable"),
        "random.mp4": (np.random.default_rng(0).bytes(4000), "undecodable"),
        "text.mp4": (b"this is not a video, just text\n" * 20, "undecodable"),
        "audio.mp4": (audio_only_bytes(), "no_video_stream"),
        # the codec tag of the H.264 stream renamed to one no decoder knows
        "codec.mp4": (good.replace(b"avc1", b"zzz9"), "unsupported_codec"),
        "oneframe.mp4": (h264_bytes(frames=1), "too_short"),
    }


@pytest.fixture(scope="module")
def huge_video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("huge") / "huge.mp4"
    path.write_bytes(h264_bytes(4352, 2176, frames=2))  # 9.5 Mpx > the default max_pixels (4096 x 2160)
    return str(path)


@pytest.mark.parametrize("name", list(bad_files()))
def test_each_bad_file_has_its_reason(tmp_path, name):
    data, reason = bad_files()[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(VideoError) as e:
        read_and_decode(str(path), DenseSampler(4, 2), seed=0)
    assert e.value.reason == reason and e.value.reason in REASONS
    assert str(path) in str(e.value)


def test_huge_resolution_refused_before_decoding(huge_video):
    start = time.monotonic()
    with pytest.raises(VideoError) as e:
        read_and_decode(huge_video, DenseSampler(2, 1), seed=0)
    assert e.value.reason == "too_large" and "4352x2176" in e.value.detail
    assert time.monotonic() - start < 5


def test_other_containers_are_size_checked_by_probing(tmp_path):
    path = tmp_path / "clip.webm"
    path.write_bytes(h264_bytes(64, 48, frames=6, codec="libvpx-vp9", fmt="webm"))
    video = read_and_decode(str(path), DenseSampler(4, 1), 0)
    assert video.frames[video.clips[0]].shape == (4, 48, 64, 3)
    with pytest.raises(VideoError) as e:
        read_and_decode(str(path), DenseSampler(4, 1), 0, DecodeSettings(max_pixels=1000))
    assert e.value.reason == "too_large" and "64x48" in e.value.detail


@pytest.mark.integration
def test_unreachable_storage_is_an_outage_not_a_bad_video(s3_bucket, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    with pytest.raises(storage.StorageUnavailable, match=f"cannot read '{s3_bucket}/videos/a.mp4'"):
        read_and_decode(f"{s3_bucket}/videos/a.mp4", DenseSampler(4, 2), seed=0)


def test_missing_object_is_not_found(tmp_path):
    with pytest.raises(VideoError) as e:
        read_and_decode(str(tmp_path / "gone.mp4"), DenseSampler(4, 2), seed=0)
    assert e.value.reason == "not_found"


def test_isolated_decoder_stops_a_hanging_read_and_recovers(tmp_path):
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)  # opening a FIFO without a writer blocks forever inside C (pyarrow's open)
    good = tmp_path / "good.mp4"
    good.write_bytes(h264_bytes())
    decoder = Decoder(DecodeSettings(timeout_s=1.5))
    try:
        start = time.monotonic()
        with pytest.raises(VideoError) as e:
            decoder.decode(str(fifo), DenseSampler(4, 2), 0)
        assert e.value.reason == "timeout"
        assert 1.4 < time.monotonic() - start < 10
        video = decoder.decode(str(good), DenseSampler(4, 2), 0)  # a fresh helper takes over
        assert video.frames[video.clips[0]].shape == (4, 48, 64, 3)
    finally:
        decoder.close()


def test_isolated_decoder_survives_a_dying_helper(tmp_path):
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)
    good = tmp_path / "good.mp4"
    good.write_bytes(h264_bytes())
    decoder = Decoder(DecodeSettings(timeout_s=30))
    decoder.decode(str(good), DenseSampler(2, 1), 0)  # the helper is up
    pid = decoder._child._proc.pid
    killer = threading.Timer(0.5, os.kill, (pid, 9))  # as a segfault would end it
    killer.start()
    try:
        with pytest.raises(VideoError) as e:
            decoder.decode(str(fifo), DenseSampler(4, 2), 0)
        assert e.value.reason == "decoder_crash" and "-9" in e.value.detail
    finally:
        killer.cancel()
        decoder.close()


class Interrupted(Exception):
    pass


def test_an_interrupted_decode_leaves_no_stale_answer(tmp_path):
    """A Ray task cancelled mid-decode must not leave the helper's late answer for the next video."""
    fifo = tmp_path / "slow.mp4"
    os.mkfifo(fifo)
    good = tmp_path / "good.mp4"
    good.write_bytes(h264_bytes(frames=12))
    decoder = Decoder(DecodeSettings(timeout_s=30))

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        decoder.decode(str(good), DenseSampler(2, 1), 0)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            decoder.decode(str(fifo), DenseSampler(4, 2), 0)
        with pytest.raises(OSError):  # the helper that was reading the FIFO is gone: no reader left
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        video = decoder.decode(str(good), DenseSampler(12, 1), 0)
        assert video.length == 12 and video.frames[video.clips[0]].shape == (12, 48, 64, 3)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        decoder.close()


def test_isolated_and_inline_decode_agree(sample_videos):
    path = str(next((sample_videos / "videos").rglob("*.mp4")))
    sampler = DenseSampler(8, 2, clips=3)
    inline = read_and_decode(path, sampler, seed=5)
    decoder = Decoder()
    try:
        isolated = decoder.decode(path, sampler, 5)
        assert isolated.length == inline.length
        for i in range(3):
            np.testing.assert_array_equal(isolated.frames[isolated.clips[i]], inline.frames[inline.clips[i]])
    finally:
        decoder.close()


def test_ledger_counts_and_budget():
    ledger = ErrorLedger.local()
    for _ in range(18):
        ledger.record_ok()
    ledger.record("s3://b/x.mp4", "empty", "0 bytes")
    ledger.check(max_error_fraction=0.01, min_videos=20)  # 19 videos: too few to judge
    snap = ledger.record("s3://b/y.mp4", "timeout", "slow")
    assert snap == {
        "videos": 20,
        "ok": 18,
        "errors": 2,
        "error_fraction": 0.1,
        "by_reason": {"empty": 1, "timeout": 1},
        "by_backend": {},  # record_ok() without backends, as a caller that does not say
    }
    ledger.check(max_error_fraction=0.1, min_videos=20)  # at the bound is fine
    with pytest.raises(ErrorBudgetExceeded, match=r"2 of 20 videos.*s3://b/x.mp4 \(empty"):
        ledger.check(max_error_fraction=0.05, min_videos=20)
    ledger.check(max_error_fraction=0.05, min_videos=20, z=3)  # 2 of 20 could be bad luck at 5%


def test_streaming_check_fails_fast_on_broken_data_only():
    broken = ErrorLedger.local()
    for i in range(20):
        broken.record(f"/v/{i}.mp4", "unsupported_codec")
    with pytest.raises(ErrorBudgetExceeded, match="20 of 20"):
        broken.check(max_error_fraction=0.05, min_videos=20, z=3)
    unlucky = ErrorLedger.local()  # 3% bad overall, but the first 40 videos hold 4 of them
    for i in range(400):
        if i in (1, 5, 9, 30) or i % 50 == 49:
            unlucky.record(f"/v/{i}.mp4", "undecodable")
        else:
            unlucky.record_ok()
        unlucky.check(max_error_fraction=0.05, min_videos=20, z=3)
    assert unlucky.snapshot()["errors"] == 12


@pytest.mark.integration
def test_bad_videos_in_s3_are_skipped_counted_and_reported(ray_session, s3_bucket, sample_videos, huge_video):
    """A bucket of good and bad videos through the Ray Data pretrain builder: every good video yields
    its clips, every bad one is named in the report with its reason; then the budget stops a run."""
    from pipeline.data.clips import torch_collate
    from pipeline.data.datasets import build_dataset
    from pipeline.data.section import DataSection

    good = sorted((sample_videos / "videos").rglob("*.mp4"))[:14]
    for p in good:
        storage.upload_file(str(p), f"{s3_bucket}/videos/good/{p.parent.name}-{p.name}")
    expected = {}
    for name, (data, reason) in bad_files().items():
        storage.write_bytes(f"{s3_bucket}/videos/bad/{name}", data)
        expected[f"{s3_bucket}/videos/bad/{name}"] = reason
    storage.upload_file(huge_video, f"{s3_bucket}/videos/bad/huge.mp4")
    expected[f"{s3_bucket}/videos/bad/huge.mp4"] = "too_large"
    storage.write_bytes(f"{s3_bucket}/videos/bad/deleted.mp4", h264_bytes())
    expected[f"{s3_bucket}/videos/bad/deleted.mp4"] = "not_found"

    from pipeline.data.datasets import resolve_rows

    cfg = DataSection(  # a 60% bound: 9 bad of 23 videos pass however they are ordered
        uri=f"{s3_bucket}/videos",
        num_frames=4,
        sampling_rate=2,
        image_size=32,
        patch_size=8,
        clips_per_video=2,
        max_error_fraction=0.6,
        min_videos_for_error_check=5,
        seed=0,
    )
    rows = resolve_rows(cfg)  # listed now; one object disappears before it is read
    storage.delete(f"{s3_bucket}/videos/bad/deleted.mp4")
    ledger = ErrorLedger.get_or_create("test-bad-s3")

    ds = build_dataset(cfg, "pretrain", ledger, rows=rows)
    batches = ds.iter_torch_batches(batch_size=8, collate_fn=torch_collate)
    clips = sum(len(b["pixel_values"]) for b in batches)
    assert clips == 2 * len(good)
    snap = ledger.snapshot()
    assert snap["ok"] == len(good) and snap["errors"] == len(expected)
    report_uri = f"{s3_bucket}/runs/r1/data_errors.jsonl"
    assert ledger.write_report(report_uri) == len(expected)
    report = [json.loads(line) for line in storage.read_text(report_uri).splitlines()]
    assert {r["uri"]: r["reason"] for r in report} == expected

    strict = DataSection(**{**cfg.__dict__, "max_error_fraction": 0.05})
    ds = build_dataset(strict, "pretrain", run_name="test-bad-s3-strict")
    with pytest.raises(Exception, match="max_error_fraction") as e:
        for _ in ds.iter_torch_batches(batch_size=8, collate_fn=torch_collate):
            pass
    assert "by reason" in str(e.value)
