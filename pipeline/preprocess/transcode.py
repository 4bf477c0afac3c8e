"""Inspect, check and transcode one video with PyAV: the per-video work of the preprocessing job.

Every failure becomes a :class:`VideoError` whose ``reason`` is a short code (the manifest's
``status``) and whose detail says what went wrong, so a broken file ends as a manifest row, never as
a crash. Outputs are written to a temporary file first and moved (or PUT) into place in one step,
so a reader never sees a half-written video.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import av

from pipeline import storage
from pipeline.data import decoders, errors
from pipeline.data.errors import VideoError

# Failure reasons: the decode path's (errors.REASONS) plus what only a full read can tell.
REASONS = {
    **errors.REASONS,
    "not_a_video": "no known container format (random bytes, text named .mp4, ...)",
    "truncated": "the file ends before its index says it should",
    "write_error": "the transcoded file could not be written to the output",
    "output_collision": "another input maps to the same output path (e.g. a.avi and a.mp4)",
    "internal_error": "an unexpected error in the preprocessing code (a bug: please report it)",
}
# Retried on a rerun because they can pass; the others describe the file itself.
TRANSIENT_REASONS = frozenset({"storage", "timeout", "decoder_crash", "write_error", "internal_error"})


@dataclass(frozen=True)
class VideoSettings:
    """What to accept and how to transcode; stored (hashed) with each manifest row for resume."""

    transcode: bool = True
    short_side: int = 320
    crf: int = 23
    preset: str = "veryfast"
    # Keyframe every `gop_seconds`: a training read seeks to the keyframe before its clip and decodes
    # forward, so on average it pays half a GOP of extra frames (~15 at 1 s, 30 fps) on top of the
    # 64-frame span of a 16-frame stride-4 clip; shorter GOPs cost file size for little decode gain.
    gop_seconds: float = 1.0
    max_pixels: int = 7680 * 4320
    min_frames: int = 2
    threads: int = 1
    # The training data's decoder (data.decoder): every video the manifest marks "ok" opens with it. In
    # inspect-only mode a video it cannot read (AV1 in decord 0.6, say) is transcoded to H.264 instead.
    decoder: str = "auto"

    def fingerprint(self) -> str:
        """Settings that change the output; a manifest row made with other settings is redone."""
        if not self.transcode:
            # "probe:" is inspect-only mode's old word: manifests store this string, so it stays (resume)
            return f"probe:max_pixels={self.max_pixels}:min_frames={self.min_frames}:decoder={self.decoder}"
        keys = ("short_side", "crf", "preset", "gop_seconds", "max_pixels", "min_frames", "decoder")
        d = asdict(self)
        return "h264:" + ":".join(f"{k}={d[k]}" for k in keys)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is ``short_side`` (never upscale), keep aspect, round to even sizes."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _open_source(uri: str) -> tuple[Any, int]:
    """Something ``av.open`` accepts, and the size in bytes. Local files are opened in place, objects
    in S3 are fetched with one GET."""
    if storage.is_s3(uri):
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as e:
            if isinstance(e, storage.ObjectNotFound):
                raise VideoError(uri, "not_found", "object not found") from e
            raise VideoError(uri, "storage", str(e)) from e
        return io.BytesIO(data), len(data)
    _, path = storage.resolve(uri)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as e:
        raise VideoError(uri, "not_found", "file not found") from e
    except OSError as e:
        raise VideoError(uri, "storage", str(e)) from e
    return path, size


def _first_bytes(source: Any, n: int = 12) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:n]
    with open(source, "rb") as f:
        return f.read(n)


def _open_container(uri: str, source: Any, size: int) -> av.container.InputContainer:
    if size == 0:
        raise VideoError(uri, "empty", "0 bytes")
    try:
        return av.open(source, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        # An MP4 whose header box is present but whose index cannot be read was cut short.
        if _first_bytes(source)[4:8] == b"ftyp":
            raise VideoError(uri, "truncated", f"MP4 header present but unreadable ({e.strerror})") from e
        raise VideoError(uri, "not_a_video", f"no known container format ({e.strerror})") from e
    except OSError as e:
        raise VideoError(uri, "storage", str(e)) from e


def _video_stream(
    uri: str, container: av.container.InputContainer, settings: VideoSettings
) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        raise VideoError(uri, "no_video_stream", f"only {'/'.join(kinds)} streams")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or not ctx.name:
        raise VideoError(
            uri, "unsupported_codec", "no decoder for the video stream's codec in this FFmpeg build"
        )
    if not ctx.width or not ctx.height:
        raise VideoError(uri, "undecodable", f"{ctx.name} stream has no frame size")
    if ctx.width * ctx.height > settings.max_pixels:
        raise VideoError(
            uri, "too_large", f"{ctx.width}x{ctx.height} exceeds max_pixels={settings.max_pixels}"
        )
    ctx.thread_count = settings.threads
    return stream


def _frame_rate(stream: av.VideoStream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate and rate > 0 else Fraction(25)


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[int, int | None]:
    """Demux (no decoding) the video stream: number of frames present and pts of the last keyframe."""
    count, last_key = 0, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            if packet.is_keyframe and packet.pts is not None:
                last_key = packet.pts
    except av.error.FFmpegError:
        pass  # a cut-off file stops demuxing early; the count below tells
    return count, last_key


def inspect_video(
    uri: str, source: Any, size: int, settings: VideoSettings
) -> tuple[av.container.InputContainer, dict]:
    """Open and check a video. Returns the open container (caller closes it) and its metadata.

    Reads the container's index and every packet header (cheap, no decoding) to count frames and
    catch files cut short. Decoding is checked by the caller: :func:`check_decodes` or a transcode.
    """
    container = _open_container(uri, source, size)
    try:
        stream = _video_stream(uri, container, settings)
        fps = _frame_rate(stream)
        declared = stream.frames or 0
        frames, last_key = _count_packets(container, stream)
        info = {
            "container": container.format.name.split(",")[0],
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(fps),
            "frames": frames,
            "duration": frames / float(fps),
            "bytes": size,
        }
        if frames == 0:
            raise VideoError(uri, "undecodable", "no video packets")
        if frames < settings.min_frames:
            raise VideoError(uri, "too_short", f"{frames} frame(s), fewer than {settings.min_frames}")
        if declared and frames < declared:
            raise VideoError(uri, "truncated", f"only {frames} of {declared} frames present")
        if container.duration and info["duration"] < 0.9 * container.duration / 1e6 - 0.5:
            raise VideoError(
                uri, "truncated", f"{info['duration']:.2f}s of {container.duration / 1e6:.2f}s present"
            )
        info["_last_key"] = last_key
        return container, info
    except BaseException:
        container.close()
        raise


def _decode_packets(
    container: av.container.InputContainer, stream: av.VideoStream
) -> Iterator[av.VideoFrame]:
    """Decoded frames, skipping packets the decoder rejects (as players do); callers compare counts."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            continue


def check_decodes(uri: str, container: av.container.InputContainer, info: dict) -> None:
    """Decode the first frame and the last keyframe's group to the end: proves both ends are readable."""
    stream = container.streams.video[0]
    container.seek(0, stream=stream)
    if next(_decode_packets(container, stream), None) is None:
        raise VideoError(uri, "undecodable", f"{info['codec']} stream: first frame does not decode")
    if info["_last_key"] is not None:
        container.seek(info["_last_key"], stream=stream, backward=True)
        tail = sum(1 for _ in _decode_packets(container, stream))
        if tail == 0:
            raise VideoError(uri, "truncated", "the last group of frames does not decode")


def transcode(
    uri: str, container: av.container.InputContainer, info: dict, dst_path: str, settings: VideoSettings
) -> dict:
    """Decode every frame, resize to the short side, encode H.264 in MP4 at ``dst_path``.

    Keeps the frame count and the average frame rate (so the length too), drops audio (pretraining
    never reads it) and writes the index first (faststart) so ranged readers need one request.
    """
    stream = container.streams.video[0]
    container.seek(0, stream=stream)
    rate = Fraction(info["fps"]).limit_denominator(100000)
    out_w, out_h = output_size(info["width"], info["height"], settings.short_side)
    gop = max(1, round(float(rate) * settings.gop_seconds))
    frames = 0
    with av.open(dst_path, "w", format="mp4", options={"movflags": "+faststart"}) as out:
        vs = out.add_stream(
            "libx264",
            rate=rate,
            options={
                "crf": str(settings.crf),
                "preset": settings.preset,
                "g": str(gop),
                "threads": str(settings.threads),
            },
        )
        vs.width, vs.height, vs.pix_fmt = out_w, out_h, "yuv420p"
        for frame in _decode_packets(container, stream):
            small = frame.reformat(width=out_w, height=out_h, format="yuv420p", interpolation="AREA")
            small.pts, small.time_base = frames, 1 / rate
            out.mux(vs.encode(small))
            frames += 1
        out.mux(vs.encode(None))
    if frames < settings.min_frames:
        raise VideoError(uri, "too_short", f"{frames} frame(s) decode")
    if frames < 0.9 * info["frames"]:
        raise VideoError(uri, "undecodable", f"only {frames} of {info['frames']} frames decode")
    return {
        "out_width": out_w,
        "out_height": out_h,
        "out_frames": frames,
        "out_bytes": os.path.getsize(dst_path),
    }


def unreadable_by(decoder: str, data: bytes) -> str | None:
    """Why the training decoder cannot read this video (its first and last frames), or None if it can;
    for ``auto``, None when any of its backends can, as training falls back per video the same way."""

    failed = []
    for name in decoders.candidates(decoder):
        try:
            video = decoders.open_video(name, data)
            video.frames(sorted({0, video.length - 1}))
            return None
        except Exception as e:  # noqa: BLE001 - each library raises its own types
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return "; ".join(failed)[:300]


def _source_bytes(source: Any) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    with open(source, "rb") as f:
        return f.read()


def _publish(uri: str, tmp_path: str, dst: str) -> None:
    """Move a finished local file into place: rename locally, one (multipart-atomic) PUT to S3."""
    try:
        if storage.is_s3(dst):
            storage.upload_file(tmp_path, dst)
            os.remove(tmp_path)
        else:
            _, path = storage.resolve(dst)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp_path, path)
    except (OSError, storage.StorageError) as e:
        raise VideoError(uri, "write_error", str(e)) from e


def process_video(src: str, dst: str | None, tmp_path: str | None, settings: VideoSettings) -> dict:
    """Inspect ``src`` (and transcode it to ``dst`` through ``tmp_path``); always returns a result row.

    The row has the input's metadata, ``status`` (``ok`` or a reason) and ``error`` (the detail).
    """
    start = time.monotonic()
    row: dict = {"original_path": src, "status": "ok", "error": None, "transcoded": None}
    container = None
    try:
        source, size = _open_source(src)
        row["bytes"] = size
        container, info = inspect_video(src, source, size, settings)
        row.update({k: v for k, v in info.items() if not k.startswith("_")})
        needs_transcode = settings.transcode
        if not settings.transcode:
            check_decodes(src, container, info)
            reason = unreadable_by(settings.decoder, _source_bytes(source))
            if reason and (dst is None or tmp_path is None):
                raise VideoError(src, "unsupported_codec", f"the training decoder cannot read it: {reason}")
            row["transcoded"] = needs_transcode = reason is not None  # then the manifest points at a copy
        if needs_transcode:
            if dst is None or tmp_path is None:
                raise ValueError("transcoding needs a destination and a temporary path")
            os.makedirs(os.path.dirname(tmp_path), exist_ok=True)
            row.update(transcode(src, container, info, tmp_path, settings))
            with open(tmp_path, "rb") as f:
                reason = unreadable_by(settings.decoder, f.read())
            if reason:  # e.g. a size the decoder mishandles: never hand training a video it cannot read
                raise VideoError(src, "unsupported_codec", f"the training decoder cannot read its transcode: "
                                 f"{reason}")
            _publish(src, tmp_path, dst)
    except VideoError as e:
        row.update(status=e.reason, error=e.detail)
    except av.error.FFmpegError as e:
        row.update(status="undecodable", error=f"{type(e).__name__}: {e.strerror}")
    except Exception as e:  # noqa: BLE001 - a bug must cost one row, not the run; the detail names it
        row.update(status="internal_error", error=f"{type(e).__name__}: {e}")
    finally:
        if container is not None:
            container.close()
        if tmp_path and os.path.exists(tmp_path):
            os.remove(tmp_path)
    row["seconds"] = time.monotonic() - start
    return row
