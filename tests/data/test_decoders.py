"""The decoders behind data.decoder: every backend returns exactly the frames asked for (or refuses the
video), on every codec, an open GOP and a variable frame rate; ``auto`` falls back per video and the run
says which decoder read it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.codec_videos import CODECS, OPEN_GOP, reference_frames, write_codec_video

from pipeline.data import decoders, mp4
from pipeline.data.clips import ClipMaker
from pipeline.data.decode import DecodeSettings, decode_bytes, read_and_decode
from pipeline.data.errors import ErrorLedger, VideoError
from pipeline.data.sampling import DenseSampler
from pipeline.data.section import DataSection

CASES = [*CODECS, "vfr"]
INDICES = [0, 5, 6, 13, 24, 25, 39]  # across GOPs of 12: mid-GOP, adjacent, keyframes, the last


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("codecs")
    out = {}
    for case in CASES:
        codec = "h264" if case == "vfr" else case
        path = write_codec_video(root / f"{case}.{CODECS[codec][0]}", codec, vfr=case == "vfr")
        out[case] = (path, reference_frames(path))
    return out


def _backends() -> list:
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                bool(decoders.unavailable_reason(name)), reason=decoders.unavailable_reason(name) or ""
            ),
        )
        for name in decoders.BACKENDS
    ]


def _closest(frame: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    diffs = np.abs(reference.astype(np.int16) - frame.astype(np.int16)).mean(axis=(1, 2, 3))
    return int(diffs.argmin()), float(diffs.min())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES)
def test_every_backend_returns_exactly_the_frames_asked_for(videos, case, backend):
    path, reference = videos[case]
    if backend == "decord" and case in OPEN_GOP:  # decord would seek a few frames past the ones asked for
        with pytest.raises(decoders.InexactSeek, match="open-GOP"):
            decoders.open_video(backend, path.read_bytes())
        return
    try:
        video = decoders.open_video(backend, path.read_bytes())
    except Exception as e:  # noqa: BLE001
        if backend == "decord" and case == "av1" and "cannot find video stream" in str(e):
            pytest.skip(f"decord 0.6 cannot read AV1 ({e}); data.decoder auto falls back")
        raise
    assert video.length == len(reference) == 40
    frames = video.frames(INDICES)
    assert frames.shape == (len(INDICES), *reference.shape[1:]) and frames.dtype == np.uint8
    for i, got in zip(INDICES, frames, strict=True):
        nearest, diff = _closest(got, reference)
        assert nearest == i, f"{backend} on {case}: asked frame {i}, got frame {nearest}"
        assert diff < 2.0, f"{backend} on {case}, frame {i}: mean difference {diff:.2f} levels"
    again = video.frames(INDICES[:3])  # a second read on the same open video seeks back correctly
    np.testing.assert_array_equal(again, frames[:3])


def test_open_gop_is_found_in_the_mp4_tables_as_in_the_demuxed_packets(videos):
    for case, (path, _) in videos.items():
        data = path.read_bytes()
        from_tables = mp4.keyframes_out_of_order(data)
        assert from_tables is (None if CODECS.get(case, ("mp4",))[0] == "webm" else case in OPEN_GOP), case
        with monkeypatch_tables_unknown():
            assert decoders._open_gop(data) is (case in OPEN_GOP), case


@contextlib.contextmanager
def monkeypatch_tables_unknown():
    """The demuxing path of the open-GOP check, as for a container without MP4 sample tables."""
    original = mp4.keyframes_out_of_order
    mp4.keyframes_out_of_order = lambda data: None
    try:
        yield
    finally:
        mp4.keyframes_out_of_order = original


def test_pyav_seeks_ahead_between_sparse_frames_instead_of_decoding_all_of_them(tmp_path):
    path = write_codec_video(tmp_path / "long.mp4", "h264", frames=120)  # a keyframe every 12 frames
    reference = reference_frames(path)
    video = decoders.open_video("pyav", path.read_bytes())
    decoded = []

    class Counting:  # the container, counting the frames it decodes
        def __init__(self, container):
            self.container = container

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

        def __getattr__(self, name):
            return getattr(self.container, name)

    video._container = Counting(video._container)
    frames = video.frames([2, 3, 61, 110])
    assert [_closest(f, reference)[0] for f in frames] == [2, 3, 61, 110]
    assert len(decoded) <= 3 * 12, f"decoded {len(decoded)} frames for 4 (a GOP is 12)"


def _frames_asked(sampler, length: int) -> list[int]:
    return sorted({int(i) for clip in sampler(length, np.random.default_rng(0)) for i in clip})


@pytest.mark.parametrize("case", ["hevc", "h264-open-gop", "av1", "small"])
@pytest.mark.parametrize("order", [("decord", "pyav"), ("pyav", "decord")])
def test_auto_reads_what_decord_refuses_or_mishandles_with_exact_frames(videos, tmp_path, monkeypatch,
                                                                        case, order):
    """Open GOPs (decord misnumbers them), a 48x48 H.264 (decord copies 4 channels into 3) and AV1 (decord
    0.6 finds no stream): ``auto`` reads each exactly. With decord first (the default at these sizes) the
    video falls back to PyAV and the run learns why decord could not; with PyAV first it needs none."""
    if case == "small":
        path = write_codec_video(tmp_path / "small.mp4", "h264", size=(48, 48))
        reference = reference_frames(path)
    else:
        path, reference = videos[case]
    monkeypatch.setattr(decoders, "AUTO_ORDER", order)
    sampler = DenseSampler(8, 4)
    video = decode_bytes(str(path), path.read_bytes(), sampler, 0, DecodeSettings(decoder="auto"))
    assert [_closest(f, reference)[0] for f in video.frames] == _frames_asked(sampler, len(reference))
    if order[0] == "pyav":
        assert video.backend == "pyav" and video.fallback_from == ()
    elif case == "av1" and not video.fallback_from:
        assert video.backend == "decord"  # decord2 reads AV1
    else:
        assert video.backend == "pyav" and video.fallback_from[0].startswith("decord: "), video.fallback_from


def test_an_unusable_decoder_is_named_before_any_video(monkeypatch):
    with pytest.raises(decoders.DecoderUnavailable, match="unknown decoder 'ffmpeg'"):
        decoders.candidates("ffmpeg")
    assert decoders.candidates("auto")[:2] == ["decord", "pyav"]  # small (or unknown) frames: decord first
    assert decoders.candidates("auto", pixels=640 * 360)[:2] == ["pyav", "decord"]  # larger: PyAV first
    reason = decoders.unavailable_reason("pyav", "cuda")
    assert reason == "decode_device 'cuda' needs decoder 'torchcodec', not 'pyav'"
    with pytest.raises(ValueError, match="decoder must be one of"):
        DataSection(decoder="ffmpeg").validate()


def test_auto_retries_a_video_the_first_decoder_cannot_read_and_says_who_read_it(
    videos, tmp_path, monkeypatch
):
    path, reference = videos["h264"]
    data = path.read_bytes()

    first = decoders.AUTO_ORDER[0]

    class CannotOpen:  # what decord 0.6 does with an AV1 file: no stream found
        def __init__(self, *args):
            raise RuntimeError("cannot find video stream with wanted index: -1")

    monkeypatch.setitem(decoders._CLASSES, first, CannotOpen)
    sampler = DenseSampler(4, 3)
    with pytest.raises(VideoError) as strict:
        decode_bytes(str(path), data, sampler, 0, DecodeSettings(decoder=first))
    assert strict.value.reason == "undecodable" and "cannot find video stream" in strict.value.detail
    video = decode_bytes(str(path), data, sampler, 0, DecodeSettings(decoder="auto"))
    second = decoders.AUTO_ORDER[1]
    assert video.backend == second
    assert video.fallback_from == (f"{first}: RuntimeError: cannot find video stream with wanted index: -1",)
    assert [_closest(f, reference)[0] for f in video.frames] == _frames_asked(sampler, len(reference))

    # the run's ledger counts videos per decoder, and the report names the ones read after a fallback
    ledger = ErrorLedger.local()
    cfg = DataSection(
        decoder="auto", decode_isolation="inline", num_frames=4, sampling_rate=3, image_size=32, patch_size=8
    )
    maker = ClipMaker(cfg, "pretrain", ledger)
    assert maker.clips({"path": str(path), "label": -1}) is not None
    maker.flush_ok()
    assert ledger.snapshot()["by_backend"] == {second: 1}
    ledger.write_report(str(tmp_path / "data_errors.jsonl"))
    fallbacks = [
        json.loads(line) for line in (tmp_path / "data_errors_fallbacks.jsonl").read_text().splitlines()
    ]
    assert fallbacks == [{"uri": str(path), "backend": second, "failed": list(video.fallback_from)}]


def test_isolated_decoding_reports_the_backend(videos):
    from pipeline.data.decode import Decoder

    path, _ = videos["vp9"]
    decoder = Decoder(DecodeSettings(decoder="pyav", timeout_s=60))
    try:
        video = decoder.decode(str(path), DenseSampler(4, 2), 0)
    finally:
        decoder.close()
    assert video.backend == "pyav" and video.frames.shape[0] == 4
    inline = read_and_decode(str(path), DenseSampler(4, 2), 0, DecodeSettings(decoder="pyav"))
    np.testing.assert_array_equal(video.frames, inline.frames)


def test_a_decoder_this_node_lacks_stops_the_run_instead_of_failing_every_video(videos, monkeypatch):
    """decode_device cuda on a CPU node (or torchcodec without its CUDA libraries) is a setup problem: it
    must not be counted as thousands of bad videos."""
    from pipeline.data.decode import Decoder

    path, _ = videos["h264"]
    for isolation in ("inline", "process"):
        decoder = Decoder(DecodeSettings(decoder="decord", device="cuda"), isolation)
        try:
            with pytest.raises(
                decoders.DecoderUnavailable, match="decode_device 'cuda' needs decoder 'torchcodec'"
            ):
                decoder.decode(str(path), DenseSampler(4, 2), 0)
        finally:
            decoder.close()


@pytest.mark.skipif(
    bool(decoders.unavailable_reason("torchcodec", "cuda")),
    reason=decoders.unavailable_reason("torchcodec", "cuda") or "",
)
def test_gpu_decoding_returns_the_same_frames(videos):
    """NVDEC through torchcodec: only where a GPU and torchcodec's CUDA build exist (not on CPU CI)."""
    path, reference = videos["h264"]
    video = decoders.open_video("torchcodec", path.read_bytes(), device="cuda")
    for i, got in zip(INDICES, video.frames(INDICES), strict=True):
        assert _closest(got, reference)[0] == i
