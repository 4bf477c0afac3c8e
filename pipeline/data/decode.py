"""Read one video (one GET) and decode only the frames its clips need, with decord, from bytes.

``read_and_decode(uri, sampler, seed, limits)`` does the work: read the bytes, probe the container with
PyAV (cheap: headers only) to name what is wrong with bad files, open decord on the bytes, ask the
sampler for the clips' frame indices given the video length, and decode the union of those frames once.
Every failure becomes a ``VideoError`` with a reason from ``errors.REASONS``.

The per-video time limit. decord can hang or crash inside C, and a Python thread cannot interrupt C
code, so ``Decoder(isolation="process")`` (the default) runs ``read_and_decode`` in a long-lived helper
process per decode worker: the parent waits at most ``timeout_s`` for the answer, and on expiry kills
the helper (SIGKILL works on C code), records ``timeout`` and starts a new helper on the next video. A
segfault in the helper becomes ``decoder_crash`` instead of killing the Ray worker. Frames come back
through a shared memory-mapped buffer, not a pipe, so the isolation costs one memcpy of the decoded
frames (a few percent of the decode time; see benchmarks/data_throughput.py).
``isolation="inline"`` decodes in-process: no hard limit (an overrun is only detected after the fact).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from pipeline.data import storage
from pipeline.data.errors import VideoError

HELPER_START_TIMEOUT_S = 120.0
Sampler = Callable[[int, np.random.Generator], list[np.ndarray]]


@dataclass(frozen=True)
class DecodeLimits:
    timeout_s: float = 60.0  # per video: read + probe + decode
    max_pixels: int = 4096 * 2160  # larger frames are refused before decoding (too_large)
    min_frames: int = 2  # fewer frames are refused (too_short); shorter-than-clip videos repeat frames
    num_threads: int = 1  # decord threads per video; parallelism comes from more decode workers


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (U, H, W, C) uint8: the union of all clips' frames, in index order
    clips: list[np.ndarray]  # per clip: positions into ``frames`` (T,)
    length: int  # frames in the video
    fps: float

    def clip(self, i: int) -> np.ndarray:
        """(T, H, W, C) uint8 copy of clip ``i`` (fancy indexing copies, so it outlives the buffer)."""
        return self.frames[self.clips[i]]


def read_video_bytes(uri: str) -> bytes:
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        reason = "not_found" if isinstance(e, storage.ObjectNotFound) else "storage"
        raise VideoError(uri, reason, str(e)) from None
    if not data:
        raise VideoError(uri, "empty", "0 bytes")
    return data


def probe(uri: str, data: bytes, limits: DecodeLimits) -> None:
    """Name what is wrong with a file from its headers before decord sees it."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            streams = container.streams.video
            if not streams:
                raise VideoError(uri, "no_video_stream", f"streams: {[s.type for s in container.streams]}")
            stream = streams[0]
            if stream.codec_context is None:
                tag = getattr(stream, "codec_tag", "?")
                raise VideoError(uri, "unsupported_codec", f"no decoder for codec tag {tag!r}")
            width, height = stream.codec_context.width, stream.codec_context.height
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 - any container error means the same thing here
        raise VideoError(uri, "undecodable", f"{type(e).__name__}: {e}"[:300]) from None
    if width * height > limits.max_pixels:
        raise VideoError(uri, "too_large", f"{width}x{height} > max_pixels {limits.max_pixels}")


def frame_window(length: int, fps: float, window: tuple[float, float]) -> tuple[int, int]:
    """Frames ``[lo, hi)`` of the ``(start, end)`` seconds window; negative bounds mean open."""
    start, end = window
    lo = min(max(int(start * fps), 0), length - 1) if start > 0 else 0
    hi = min(max(int(np.ceil(end * fps)), lo + 1), length) if end > 0 else length
    return lo, hi


def decode_bytes(
    uri: str,
    data: bytes,
    sampler: Sampler,
    seed: int,
    limits: DecodeLimits,
    window: tuple[float, float] = (-1, -1),
) -> DecodedVideo:
    import decord

    probe(uri, data, limits)
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=limits.num_threads)
        length, fps = len(reader), float(reader.get_avg_fps())
    except Exception as e:  # noqa: BLE001 - decord raises RuntimeError / DECORDError / AssertionError
        raise VideoError(uri, "undecodable", f"{type(e).__name__}: {e}"[:300]) from None
    lo, hi = frame_window(length, fps, window)
    if hi - lo < limits.min_frames:
        raise VideoError(uri, "too_short", f"{hi - lo} frame(s) < min_frames {limits.min_frames}")
    clips = [c + lo for c in sampler(hi - lo, np.random.default_rng(seed))]
    wanted, positions = np.unique(np.concatenate(clips), return_inverse=True)
    try:
        frames = reader.get_batch(wanted.tolist()).asnumpy()
    except Exception as e:  # noqa: BLE001
        raise VideoError(uri, "decode_error", f"{type(e).__name__}: {e}"[:300]) from None
    sizes = np.cumsum([len(c) for c in clips])[:-1]
    return DecodedVideo(frames, np.split(positions, sizes), length, fps)


def read_and_decode(
    uri: str,
    sampler: Sampler,
    seed: int,
    limits: DecodeLimits = DecodeLimits(),
    window: tuple[float, float] = (-1, -1),
) -> DecodedVideo:
    """One GET, then decode only the sampled frames (within ``window`` seconds); raises ``VideoError``."""
    return decode_bytes(uri, read_video_bytes(uri), sampler, seed, limits, window)


class _FrameBuffer:
    """A growable memory-mapped file (in /dev/shm when present) shared with the helper process."""

    def __init__(self) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.path = os.path.join(folder, f"videomae-decode-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.size, self.map = 0, None
        with open(self.path, "wb"):
            pass

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        self.size = int(nbytes * 1.25) + 4096
        with open(self.path, "r+b") as f:
            f.truncate(self.size)
            self.map = mmap.mmap(f.fileno(), self.size)

    def close(self) -> None:
        self.map = None  # closed by GC once no frames view it
        if os.path.exists(self.path):
            os.remove(self.path)


class Decoder:
    """Decodes videos with a hard per-video time limit (see the module docstring)."""

    def __init__(self, limits: DecodeLimits = DecodeLimits(), isolation: str = "process"):
        if isolation not in ("process", "inline"):
            raise ValueError(f"isolation must be 'process' or 'inline', got {isolation!r}")
        self.limits, self.isolation = limits, isolation
        self._proc: subprocess.Popen | None = None
        self._buffer: _FrameBuffer | None = None

    def decode(
        self, uri: str, sampler: Sampler, seed: int, window: tuple[float, float] = (-1, -1)
    ) -> DecodedVideo:
        if self.isolation == "inline":
            start = time.monotonic()
            video = read_and_decode(uri, sampler, seed, self.limits, window)
            if time.monotonic() - start > self.limits.timeout_s:
                raise VideoError(
                    uri, "timeout", f"took {time.monotonic() - start:.1f}s (inline, not stopped)"
                )
            return video
        return self._decode_isolated(uri, sampler, seed, window)

    def _start(self) -> None:
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from pipeline.data.decode import serve; serve()",
                str(child_r),
                str(child_w),
            ],
            pass_fds=(child_r, child_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self._recv, self._send = Connection(parent_r), Connection(parent_w, readable=False)
        # the time limit is per video, so wait for the helper's imports separately
        if not self._recv.poll(HELPER_START_TIMEOUT_S) or self._recv.recv() != ("ready",):
            self._kill()
            raise RuntimeError(f"the decode helper process did not start within {HELPER_START_TIMEOUT_S}s")
        if self._buffer is None:
            self._buffer = _FrameBuffer()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._recv.close()
            self._send.close()
            self._proc = None

    def _decode_isolated(
        self, uri: str, sampler: Sampler, seed: int, window: tuple[float, float]
    ) -> DecodedVideo:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        deadline = time.monotonic() + self.limits.timeout_s
        buf = self._buffer
        try:
            self._send.send(("decode", uri, sampler, seed, window, self.limits, buf.path, buf.size))
            while True:
                if not self._recv.poll(max(deadline - time.monotonic(), 0)):
                    self._kill()
                    raise VideoError(
                        uri, "timeout", f"no result within decode_timeout_s={self.limits.timeout_s}"
                    )
                msg = self._recv.recv()
                if msg[0] == "need":
                    buf.ensure(msg[1])
                    self._send.send(("buffer", buf.path, buf.size))
                    continue
                break
        except (EOFError, OSError, BrokenPipeError):
            code = self._proc.wait() if self._proc else None
            self._kill()
            raise VideoError(uri, "decoder_crash", f"decode process exited with code {code}") from None
        if msg[0] == "error":
            raise VideoError(uri, msg[1], msg[2])
        _, shape, clips, length, fps = msg
        frames = np.frombuffer(buf.map, np.uint8, count=int(np.prod(shape))).reshape(shape)
        return DecodedVideo(frames, clips, length, fps)

    def close(self) -> None:
        self._kill()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def serve() -> None:
    """Helper process body: answer decode requests until the parent closes the pipe."""
    import av  # noqa: F401 - imported before "ready" so the first video's time limit excludes imports
    import decord  # noqa: F401

    recv, send = Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    send.send(("ready",))
    mapped: tuple[str, int, mmap.mmap] | None = None
    while True:
        try:
            msg = recv.recv()
        except EOFError:
            return
        _, uri, sampler, seed, window, limits, path, size = msg
        try:
            video = read_and_decode(uri, sampler, seed, limits, window)
        except VideoError as e:
            send.send(("error", e.reason, e.detail))
            continue
        except Exception as e:  # noqa: BLE001 - report, never die on one video
            send.send(("error", "decode_error", f"{type(e).__name__}: {e}"[:300]))
            continue
        nbytes = video.frames.nbytes
        if nbytes > size:
            send.send(("need", nbytes))
            _, path, size = recv.recv()
        if mapped is None or mapped[:2] != (path, size):
            if mapped is not None:
                mapped[2].close()
            with open(path, "r+b") as f:
                mapped = (path, size, mmap.mmap(f.fileno(), size))
        np.frombuffer(mapped[2], np.uint8, count=nbytes)[:] = video.frames.reshape(-1)
        send.send(("ok", video.frames.shape, video.clips, video.length, video.fps))
