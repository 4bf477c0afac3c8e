"""Small real videos in the codecs users have (H.264, HEVC, VP9, AV1), with an open GOP (x265's default)
and with a variable frame rate, whose frames all differ, so a decoder that returns a neighbouring frame is
caught."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# name -> (container, encoder, encoder options)
CODECS = {
    "h264": ("mp4", "libx264", {"preset": "ultrafast", "g": "12", "bf": "2"}),
    "hevc": ("mp4", "libx265", {"preset": "ultrafast", "x265-params": "keyint=12:log-level=none"}),
    "vp9": ("webm", "libvpx-vp9", {"g": "12", "deadline": "realtime", "cpu-used": "8"}),
    "av1": ("mp4", "libsvtav1", {"preset": "12", "g": "12"}),
    "h264-open-gop": ("mp4", "libx264", {"preset": "ultrafast", "g": "12", "bf": "3",
                                         "x264-params": "open-gop=1"}),
}
OPEN_GOP = {"hevc", "h264-open-gop"}  # keyframes shown after frames decoded later (x265's default)


def frame(i: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """Frame ``i``: a bar that moves 3 px a frame over a gradient, brightness rising with ``i``."""
    h, w = size
    img = np.broadcast_to(np.linspace(20, 140, w, dtype=np.float32)[None, :, None], (h, w, 3)).copy()
    x = (i * 3) % (w - 8)
    img[:, x : x + 8] = 255
    img[: h // 4] = min(250, 30 + 5 * i)
    return img.astype(np.uint8)


@contextlib.contextmanager
def _scheduling_kept() -> Iterator[None]:
    """Put the calling thread's scheduling policy back after encoding. SVT-AV1 (PyAV's ``libsvtav1``), run
    as root, switches the thread that opens the encoder to SCHED_FIFO at priority 99 and leaves it so;
    every process forked from it afterwards (a Ray head, its workers, a job) inherits that, and a few
    spinning real-time threads on a 2-core machine starve everything else, the suite's timeout timers
    included."""
    if not hasattr(os, "sched_getscheduler"):  # not Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


def write_codec_video(path: Path, codec: str, frames: int = 40, vfr: bool = False,
                      size: tuple[int, int] = (120, 160)) -> Path:
    """``frames`` frames of ``frame(i, size)``; with ``vfr`` the gaps between frames alternate 20 / 60 ms."""
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    container, encoder, options = CODECS[codec]
    path.parent.mkdir(parents=True, exist_ok=True)
    with _scheduling_kept(), av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(encoder, rate=Fraction(25))
        h, w = size
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = dict(options)
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(frames):
            picture = av.VideoFrame.from_ndarray(frame(i, size), format="rgb24")
            if vfr:
                picture.pts, picture.time_base = pts, Fraction(1, 1000)
                pts += 20 if i % 2 else 60
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
    return path


def reference_frames(path: Path) -> np.ndarray:
    """Every frame, decoded from the start in order by PyAV: the truth the decoders are held to."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
