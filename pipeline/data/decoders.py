"""Video decoders behind one interface: decord, PyAV and torchcodec, and ``auto``, which falls back per video.

A backend opens the bytes of one video and returns exactly the frames asked for, by index in presentation
order (frame ``i`` is the ``i``-th frame a player shows, for any frame rate, variable included), as uint8
``(N, H, W, 3)`` RGB. Every backend gives the same frames for the same indices (tests compare them frame
by frame on H.264, HEVC, VP9, AV1 and variable-frame-rate files):

- ``decord``: one C++ call per batch of frames (``get_batch``), seeking to the keyframe before each. The
  ``decord`` module comes from the maintained ``decord2`` wheels (FFmpeg 8: AV1 reads; aarch64 wheels),
  see docs/data.md. decord numbers keyframes in decode order, so on an open-GOP stream (a keyframe shown
  after frames decoded later: x265's default, H.264 with ``open-gop``) it returns frames a few positions
  past the ones asked for; it refuses those streams (``InexactSeek``) rather than return wrong frames.
- ``pyav``: PyAV (FFmpeg with dav1d). The demuxer's packet timestamps give each frame its index without
  decoding; decoding starts at the keyframe before a wanted frame, runs forward, and seeks ahead when
  that skips at least one whole GOP (sparse clips of a long video).
- ``torchcodec``: PyTorch's decoder (``seek_mode="exact"``), on the CPU or, with ``decode_device: cuda``,
  NVDEC; its PyPI wheel is a CUDA build, so it imports on GPU nodes only.

``auto`` tries the available backends in order, by frame size: below ``PYAV_FIRST_PIXELS`` decord first
(``AUTO_ORDER``: the faster on small videos, where PyAV's per-video overhead dominates), from there PyAV
first (the faster on larger frames); benchmarks/decoders.py measures both, docs/data.md has the figures.
A video the first cannot open or decode (decord refuses open GOPs) is retried with the next before it
counts as bad, and ``DecodedVideo.backend`` says which one read it.
"""

from __future__ import annotations

import io
from functools import cache
from typing import Any, Protocol

import numpy as np

from pipeline.data import mp4

BACKENDS = ("decord", "pyav", "torchcodec")
AUTO_ORDER = ("decord", "pyav", "torchcodec")  # below PYAV_FIRST_PIXELS
LARGE_ORDER = ("pyav", "decord", "torchcodec")  # from PYAV_FIRST_PIXELS up
PYAV_FIRST_PIXELS = 200_000  # where PyAV overtakes decord (benchmarks/decoders.py; docs/data.md, "Decoders")


class DecoderUnavailable(RuntimeError):
    """A backend that cannot be used on this machine (not installed, no GPU); the message says why."""


class InexactSeek(ValueError):
    """The backend would return other frames than the ones asked for on this video."""


class OpenVideo(Protocol):
    length: int  # frames
    fps: float

    def frames(self, indices: list[int]) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB frames at ``indices`` (sorted, unique), in that order."""


class _Decord:
    name = "decord"

    def __init__(self, data: bytes, num_threads: int, device: str):
        import decord

        if _open_gop(data):
            raise InexactSeek("an open-GOP stream (keyframes shown after frames decoded later), which decord "
                              "seeks to the wrong frames")
        self._reader = decord.VideoReader(io.BytesIO(data), num_threads=num_threads)
        self.length, self.fps = len(self._reader), float(self._reader.get_avg_fps())

    def frames(self, indices: list[int]) -> np.ndarray:
        # DLPack hands decord's buffer over without a copy (asnumpy would copy every frame once more)
        return np.from_dlpack(_DLPack(self._reader.get_batch(indices)))


def _open_gop(data: bytes) -> bool:
    """Whether a keyframe is shown at another position than it is decoded at: from the MP4 sample tables
    (microseconds), else from the packets PyAV demuxes (other containers, fragmented MP4)."""
    answer = mp4.keyframes_out_of_order(data)
    if answer is not None:
        return answer
    import av

    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        if not container.streams.video:
            return False
        packets = [(p.pts, p.is_keyframe) for p in container.demux(container.streams.video[0])
                   if p.pts is not None and p.size]
    rank = np.empty(len(packets), np.int64)
    rank[np.argsort([pts for pts, _ in packets], kind="stable")] = np.arange(len(packets))
    return any(rank[i] != i for i, (_, key) in enumerate(packets) if key)


class _DLPack:
    """Lets numpy take over a decord array's buffer without copying (and without importing torch)."""

    def __init__(self, array) -> None:
        self.array = array

    def __dlpack__(self, stream=None, **kwargs):
        return self.array.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return 1, 0  # kDLCPU, device 0


class _PyAV:
    """Exact frames with PyAV: the packets' presentation timestamps, sorted, number the frames (demuxing
    reads no pixels); decoding seeks to the last keyframe at or before a wanted frame and runs forward."""

    name = "pyav"

    def __init__(self, data: bytes, num_threads: int, device: str):
        import av

        self._container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
        streams = self._container.streams.video
        if not streams:
            raise ValueError("no video stream")
        self._stream = stream = streams[0]
        if stream.codec_context is None:  # FFmpeg knows the container, not the codec
            raise ValueError(f"no decoder for codec tag {getattr(stream, 'codec_tag', '?')!r}")
        stream.thread_type = "AUTO" if num_threads > 1 else "SLICE"
        pts, keyframes = [], []
        for packet in self._container.demux(stream):
            # edit-list pre-roll (AV_PKT_FLAG_DISCARD) is decoded but never shown: not a frame
            if packet.pts is not None and packet.size and not getattr(packet, "is_discard", False):
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
        if not pts:
            raise ValueError("the video stream has no timestamped frames")
        self._pts = np.sort(np.asarray(pts, np.int64))
        self._keyframes = np.sort(np.asarray(keyframes or [self._pts[0]], np.int64))
        self._index = {int(p): i for i, p in enumerate(self._pts)}
        self.length = len(self._pts)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0

    def frames(self, indices: list[int]) -> np.ndarray:
        """Decode forward through the wanted frames, seeking ahead when the next one lies a whole GOP or
        more past the decoder (a seek flushes the decoder, which costs more than a few frames)."""
        wanted, out = set(indices), {}
        position, decoded = -1, None  # presentation index of the last frame decoded; the running decoder
        for target in indices:
            if target in out:
                continue
            keys = self._keyframes
            before = max(int(np.searchsorted(keys, self._pts[target], side="right")) - 1, 0)  # its keyframe
            ahead = int(np.searchsorted(keys, self._pts[position], side="right")) if position >= 0 else 0
            if decoded is None or before > ahead or target <= position:  # seeking skips whole GOPs
                key = int(keys[before])
                self._container.seek(key, stream=self._stream, backward=True, any_frame=False)
                decoded, position = self._container.decode(self._stream), -1
            for frame in decoded:
                i = self._index.get(frame.pts)
                if i is None:
                    continue
                position = i
                if i in wanted and i not in out:  # (a seek's leading pictures may repeat earlier ones)
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= target:
                    break
        missing = [i for i in indices if i not in out]
        if missing:
            raise ValueError(f"frames {missing[:5]} could not be decoded")
        return np.stack([out[i] for i in indices])


class _TorchCodec:
    name = "torchcodec"

    def __init__(self, data: bytes, num_threads: int, device: str):
        import torch
        from torchcodec.decoders import VideoDecoder

        self._decoder = VideoDecoder(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            device=device,
            seek_mode="exact",
            num_ffmpeg_threads=num_threads,
        )
        meta = self._decoder.metadata
        self.length = int(meta.num_frames)
        self.fps = float(meta.average_fps or 0.0)

    def frames(self, indices: list[int]) -> np.ndarray:
        batch = self._decoder.get_frames_at(indices).data  # (N, C, H, W) uint8, on the decode device
        return batch.permute(0, 2, 3, 1).cpu().numpy()


_CLASSES = {"decord": _Decord, "pyav": _PyAV, "torchcodec": _TorchCodec}


@cache
def unavailable_reason(name: str, device: str = "cpu") -> str | None:
    """Why backend ``name`` cannot run here (None: it can). Checked once per process."""
    if name not in _CLASSES:
        return f"unknown decoder {name!r}; choose one of {list(BACKENDS)} or 'auto'"
    module = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}[name]
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - an ImportError, or a library that fails to load (CUDA builds)
        return f"{name} is not usable here ({type(e).__name__}: {str(e)[:200]})"
    if device == "cuda":
        if name != "torchcodec":
            return f"decode_device 'cuda' needs decoder 'torchcodec', not {name!r}"
        import torch

        if not torch.cuda.is_available():
            return "decode_device 'cuda': no CUDA GPU on this node (use decode_device 'cpu')"
    return None


def candidates(decoder: str, device: str = "cpu", pixels: int | None = None) -> list[str]:
    """The backends to try, in order, for the ``data.decoder`` setting and a video of ``pixels`` per frame
    (None: unknown, the small-video order); DecoderUnavailable if none can run here."""
    if decoder != "auto":
        reason = unavailable_reason(decoder, device)
        if reason:
            raise DecoderUnavailable(reason)
        return [decoder]
    order = LARGE_ORDER if pixels and pixels >= PYAV_FIRST_PIXELS else AUTO_ORDER
    names = [n for n in order if unavailable_reason(n, device) is None]
    if not names:
        reasons = "; ".join(unavailable_reason(n, device) for n in order)
        raise DecoderUnavailable(f"no decoder is usable here: {reasons}")
    return names


def open_video(name: str, data: bytes, num_threads: int = 1, device: str = "cpu") -> Any:
    """An ``OpenVideo`` of backend ``name`` on the bytes of one video (raises what the library raises)."""
    return _CLASSES[name](data, num_threads, device)
