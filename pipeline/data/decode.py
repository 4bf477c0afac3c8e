"""Read one video (one GET) and decode only the frames its clips need, from bytes.

``read_and_decode(uri, sampler, seed, limits)`` does the work: read the bytes, check the frame size
against ``max_pixels`` before decoding (from the MP4 track headers, or PyAV's container headers for
other containers), open the video with the configured decoder (pipeline/data/decoders.py: decord, PyAV,
torchcodec, or ``auto``, which tries the next when one fails), ask the sampler for the clips' frame
indices given the video length, and decode the union of those frames once. Every failure becomes a
``VideoError`` with a reason from ``errors.REASONS``; when no decoder can open a file, PyAV names what is
wrong with it.

The per-video time limit. A decoder can hang or crash inside C, and a Python thread cannot interrupt C
code, so ``Decoder(isolation="process")`` (the default) decodes in a long-lived helper process per decode
worker (pipeline/data/child.py, the supervisor preprocessing uses too): the parent waits at most
``timeout_s`` for the answer, and on expiry kills the helper (SIGKILL works on C code), records
``timeout`` and starts a new helper on the next video. A segfault in the helper becomes ``decoder_crash``
instead of killing the Ray worker. S3 bytes are read by the worker before, so retries through an outage
(pipeline/storage.py) are not decode time; local files are read in the helper, so a read that hangs
(a stuck network mount) is stopped too. Frames come back through a shared memory map (an unlinked file
in /dev/shm whose descriptor the helper inherits), not a pipe, so the isolation costs one memcpy of the
decoded frames (see benchmarks/data_throughput.py).
``isolation="inline"`` decodes in-process: no hard limit (an overrun is only detected after the fact).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.data import decoders, mp4
from pipeline.data.child import ChildDied, ChildProcess, ChildTimeout, parent_channel
from pipeline.data.errors import VideoError

Sampler = Callable[[int, np.random.Generator], list[np.ndarray]]


@dataclass(frozen=True)
class DecodeSettings:
    timeout_s: float = 60.0  # per video: header check + decode (an S3 read, retried through outages, is not)
    max_pixels: int = 4096 * 2160  # larger frames are refused before decoding (too_large)
    min_frames: int = 2  # fewer frames are refused (too_short); shorter-than-clip videos repeat frames
    num_threads: int = 1  # decoder threads per video; parallelism comes from more decode workers
    decoder: str = "auto"  # auto | decord | pyav | torchcodec (auto: the next backend when one fails a video)
    device: str = "cpu"  # cpu | cuda (torchcodec's NVDEC)


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (U, H, W, C) uint8: the union of all clips' frames, in index order
    clips: list[np.ndarray]  # per clip: positions into ``frames`` (T,)
    length: int  # frames in the video
    fps: float
    backend: str = "decord"  # the decoder that read it
    fallback_from: tuple[str, ...] = ()  # ``"backend: error"`` of the backends that failed first (auto)


def read_video_bytes(uri: str) -> bytes:
    """The bytes of one video; ``VideoError`` for a missing, empty or refused object. An outage
    (``storage.StorageUnavailable``, after the retry window) is raised as it is: it is not the video's."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageUnavailable:
        raise
    except storage.StorageError as e:
        reason = "not_found" if isinstance(e, storage.ObjectNotFound) else "storage"
        raise VideoError(uri, reason, str(e)) from None
    if not data:
        raise VideoError(uri, "empty", "0 bytes")
    return data


def check_container(uri: str, data: bytes, limits: DecodeSettings) -> tuple[int, int]:
    """Name what is wrong with a file from its headers before a decoder sees it; (width, height)."""
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
    return width, height


def frame_window(length: int, fps: float, window: tuple[float, float]) -> tuple[int, int]:
    """Frames ``[lo, hi)`` of the ``(start, end)`` seconds window; negative bounds mean open."""
    start, end = window
    lo = min(max(int(start * fps), 0), length - 1) if start > 0 else 0
    hi = min(max(int(np.ceil(end * fps)), lo + 1), length) if end > 0 else length
    return lo, hi


def decode_bytes(uri: str, data: bytes, sampler: Sampler, seed: int, limits: DecodeSettings,
                 window: tuple[float, float] = (-1, -1)) -> DecodedVideo:
    """The sampled frames of one video's bytes, by the first of ``limits.decoder``'s backends that reads
    them (pipeline/data/decoders.py); every failure is a ``VideoError``."""
    size = mp4.frame_size(data)  # MP4/MOV headers: parsed directly, cheaper than a PyAV open of the container
    if size is None:
        size = check_container(uri, data, limits)  # other containers / no video track: PyAV reads the size
    elif size[0] * size[1] > limits.max_pixels:
        raise VideoError(uri, "too_large", f"{size[0]}x{size[1]} > max_pixels {limits.max_pixels}")
    # DecoderUnavailable (a backend this node cannot run) is the setup's problem, not the video's
    names = decoders.candidates(limits.decoder, limits.device, size[0] * size[1])
    failed: list[str] = []
    opened = False
    for name in names:
        try:
            video = decoders.open_video(name, data, limits.num_threads, limits.device)
        except Exception as e:  # noqa: BLE001 - each library raises its own types
            failed.append(f"{name}: {type(e).__name__}: {e}"[:200])
            continue
        opened = True
        lo, hi = frame_window(video.length, video.fps, window)
        if hi - lo < limits.min_frames:
            raise VideoError(uri, "too_short", f"{hi - lo} frame(s) < min_frames {limits.min_frames}")
        clips = [c + lo for c in sampler(hi - lo, np.random.default_rng(seed))]
        wanted, positions = np.unique(np.concatenate(clips), return_inverse=True)
        try:
            frames = video.frames(wanted.tolist())
        except Exception as e:  # noqa: BLE001
            failed.append(f"{name}: {type(e).__name__}: {e}"[:200])
            continue
        sizes = np.cumsum([len(c) for c in clips])[:-1]
        return DecodedVideo(frames, np.split(positions, sizes), video.length, video.fps, name, tuple(failed))
    if not opened:
        check_container(uri, data, limits)  # a more specific reason (codec, no video stream) if PyAV has one
        raise VideoError(uri, "undecodable", "; ".join(failed)[:500])
    raise VideoError(uri, "decode_error", "; ".join(failed)[:500])


def read_and_decode(uri: str, sampler: Sampler, seed: int, limits: DecodeSettings = DecodeSettings(),
                    window: tuple[float, float] = (-1, -1)) -> DecodedVideo:
    """One GET, then decode only the sampled frames (within ``window`` seconds); raises ``VideoError``."""
    return decode_bytes(uri, read_video_bytes(uri), sampler, seed, limits, window)


class _FrameBuffer:
    """A growable shared memory map: a file in /dev/shm (when present) unlinked at once, so nothing is
    left behind however the processes end; the helper maps the same descriptor, inherited at start."""

    def __init__(self) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(folder, f"videomae-decode-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        self.size, self.map = 0, None

    def ensure(self, nbytes: int) -> None:
        if nbytes > self.size:  # an old map stays valid for frames still viewing it; GC closes it
            self.size = int(nbytes * 1.25) + 4096
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)

    def close(self) -> None:
        self.map = None
        os.close(self.fd)


class Decoder:
    """Decodes videos with a hard per-video time limit (see the module docstring)."""

    def __init__(self, limits: DecodeSettings = DecodeSettings(), isolation: str = "process"):
        if isolation not in ("process", "inline"):
            raise ValueError(f"isolation must be 'process' or 'inline', got {isolation!r}")
        self.limits, self.isolation = limits, isolation
        self._child: ChildProcess | None = None
        self._buffer: _FrameBuffer | None = None
        self._request = 0  # request ids pair every answer with its question

    def decode(
        self, uri: str, sampler: Sampler, seed: int, window: tuple[float, float] = (-1, -1),
        data: bytes | None = None,
    ) -> DecodedVideo:
        """The sampled frames of ``uri``, or of ``data`` when the bytes are at hand (a shard's member, named
        ``uri``)."""
        # S3 bytes are read here, not in the helper: retries through an outage are not decode time (each
        # attempt is bounded by the S3 client's timeouts). A local read stays in the helper, where the
        # time limit also stops a read that hangs (a stuck network mount, a FIFO).
        if data is None and storage.is_s3(uri):
            data = read_video_bytes(uri)
        if self.isolation == "inline":
            start = time.monotonic()
            video = (decode_bytes(uri, data, sampler, seed, self.limits, window) if data is not None
                     else read_and_decode(uri, sampler, seed, self.limits, window))
            if time.monotonic() - start > self.limits.timeout_s:
                raise VideoError(
                    uri, "timeout", f"took {time.monotonic() - start:.1f}s (inline, not stopped)"
                )
            return video
        return self._decode_isolated(uri, data, sampler, seed, window)

    def _decode_isolated(
        self, uri: str, data: bytes | None, sampler: Sampler, seed: int, window: tuple[float, float]
    ) -> DecodedVideo:
        if self._child is None:
            self._buffer = _FrameBuffer()  # the helper maps the same descriptor, inherited at its start
            self._child = ChildProcess(
                "pipeline.data.decode", [str(self._buffer.fd)], pass_fds=[self._buffer.fd]
            )
        self._request += 1
        buf, child = self._buffer, self._child
        try:
            child.send((self._request, uri, data, sampler, seed, window, self.limits, buf.size))
            deadline = time.monotonic() + self.limits.timeout_s  # after a (re)start: imports do not count
            while True:
                msg = child.receive(deadline)
                if msg[0] != self._request:
                    raise RuntimeError(f"decode helper answered request {msg[0]}, expected {self._request}")
                if msg[1] == "need":  # the frames do not fit the shared buffer: grow it, the helper goes on
                    buf.ensure(msg[2])
                    child.send(("buffer", buf.size))
                    continue
                break
        except ChildTimeout:
            raise VideoError(
                uri, "timeout", f"no result within decode_timeout_s={self.limits.timeout_s}"
            ) from None
        except ChildDied as e:
            raise VideoError(uri, "decoder_crash", f"decode process exited with code {e.exit_code}") from None
        except BaseException:
            # interrupted mid-exchange (a cancelled Ray task, KeyboardInterrupt) or out of step: the
            # helper's state is unknown and a stale answer could be taken for the next video's
            child.kill()
            raise
        if msg[1] == "error":
            raise VideoError(uri, msg[2], msg[3])
        if msg[1] == "unavailable":
            raise decoders.DecoderUnavailable(msg[2])
        _, _, shape, clips, length, fps, backend, fallback_from = msg
        frames = np.frombuffer(buf.map, np.uint8, count=int(np.prod(shape))).reshape(shape)
        return DecodedVideo(frames, clips, length, fps, backend, fallback_from)

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def serve() -> None:
    """Helper process body (``python -m pipeline.data.decode``): answer decode requests until the parent
    closes the pipe."""
    import av  # noqa: F401 - imported before "ready" so the first video's time limit excludes imports

    for name in decoders.BACKENDS:  # the same for the decoders' libraries (and their availability checks)
        decoders.unavailable_reason(name)

    recv, send, (buffer_fd,) = parent_channel()
    buffer_fd = int(buffer_fd)
    mapped: tuple[int, mmap.mmap] | None = None
    while True:
        try:
            msg = recv.recv()
        except EOFError:
            return
        request, uri, data, sampler, seed, window, limits, size = msg
        try:
            if data is None:
                video = read_and_decode(uri, sampler, seed, limits, window)
            else:
                video = decode_bytes(uri, data, sampler, seed, limits, window)
        except VideoError as e:
            send.send((request, "error", e.reason, e.detail))
            continue
        except decoders.DecoderUnavailable as e:  # no video is to blame: the run stops with the reason
            send.send((request, "unavailable", str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - report, never die on one video
            send.send((request, "error", "decode_error", f"{type(e).__name__}: {e}"[:300]))
            continue
        nbytes = video.frames.nbytes
        if nbytes > size:
            send.send((request, "need", nbytes))
            _, size = recv.recv()
        if mapped is None or mapped[0] != size:
            mapped = (size, mmap.mmap(buffer_fd, size))
        np.frombuffer(mapped[1], np.uint8, count=nbytes)[:] = video.frames.reshape(-1)
        send.send((request, "ok", video.frames.shape, video.clips, video.length, video.fps, video.backend,
                   video.fallback_from))


if __name__ == "__main__":
    serve()
