"""Small real video files for the preprocessing tests and benchmark: odd codecs and every broken kind."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(
    path: str | Path,
    frames: int = 30,
    size: tuple[int, int] = (120, 160),
    fps: int | Fraction = 25,
    codec: str = "libx264",
    container: str | None = None,
    faststart: bool = False,
    preset: str = "ultrafast",
) -> Path:
    """A moving bar over a gradient; ``size`` is (H, W)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    base = np.broadcast_to(np.linspace(0, 200, w, dtype=np.uint8)[None, :, None], (h, w, 3)).copy()
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": preset}
        for i in range(frames):
            img = base.copy()
            x = (i * 7) % max(1, w - 8)
            img[:, x : x + 8] = 255
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def write_audio_only(path: str | Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for _ in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path)


# name -> expected manifest status, for every broken kind of the data issue's list (plus odd codecs
# that must work). "huge.mp4" is too large only under HUGE_MAX_PIXELS.
BROKEN = {
    "broken/empty.mp4": "empty",
    "broken/truncated.mp4": "truncated",
    "broken/truncated_faststart.mp4": "truncated",
    "broken/random.mp4": "not_a_video",
    "broken/text.mp4": "not_a_video",
    "broken/audio_only.mp4": "no_video_stream",
    "broken/unsupported_codec.mp4": "unsupported_codec",
    "broken/one_frame.mp4": "too_short",
    "broken/huge.mp4": "too_large",
}
ODD_CODECS = {"odd/vp9.webm": "vp9", "odd/mpeg4.avi": "mpeg4", "odd/odd_size.mp4": "h264"}
HUGE_MAX_PIXELS = 640 * 480


def write_broken_set(root: str | Path) -> dict[str, str]:
    """Write BROKEN and ODD_CODECS below ``root``; returns relative path -> expected status."""
    root = Path(root)
    (root / "broken").mkdir(parents=True, exist_ok=True)
    (root / "broken/empty.mp4").write_bytes(b"")
    whole = write_video(root / "tmp_whole.mp4", frames=40).read_bytes()
    (root / "broken/truncated.mp4").write_bytes(whole[: len(whole) // 2])
    fast = write_video(root / "tmp_fast.mp4", frames=40, faststart=True).read_bytes()
    (root / "broken/truncated_faststart.mp4").write_bytes(fast[: len(fast) * 2 // 3])
    # A valid MP4 whose codec tag names no codec FFmpeg knows.
    (root / "broken/unsupported_codec.mp4").write_bytes(whole.replace(b"avc1", b"zzzz"))
    os.remove(root / "tmp_whole.mp4")
    os.remove(root / "tmp_fast.mp4")
    (root / "broken/random.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes()
    )
    (root / "broken/text.mp4").write_text("this is not a video\n" * 50)
    write_audio_only(root / "broken/audio_only.mp4")
    write_video(root / "broken/one_frame.mp4", frames=1)
    write_video(root / "broken/huge.mp4", frames=3, size=(720, 1280))
    write_video(root / "odd/vp9.webm", frames=20, codec="libvpx-vp9", container="webm")
    write_video(root / "odd/mpeg4.avi", frames=20, codec="mpeg4")
    write_video(root / "odd/odd_size.mp4", frames=20, size=(98, 130))
    return {**BROKEN, **{k: "ok" for k in ODD_CODECS}}
