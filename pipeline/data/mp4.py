"""What the MP4/MOV headers say about the video track, read from the headers alone, without a decoder.

Two facts come from here: the frame size (refused before decoding when too large) and whether a
keyframe is shown after frames that are decoded later (an open GOP: HEVC's CRA pictures as x265 writes
them by default, H.264 with ``open-gop``). decord numbers keyframes in decode order, so on such a stream it
seeks a few frames past the one asked for; the decoders module sends those videos to an exact backend.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np


def boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """ISO-BMFF boxes in ``data[start:end]`` as (type, payload start, end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in boxes(data, start, end) if k == kind), None)


def _tracks(data: bytes) -> Iterator[tuple[int, int]]:
    if data[4:8] != b"ftyp":
        return
    for kind, start, end in boxes(data, 0, len(data)):
        if kind == b"moov":
            yield from ((s, e) for k, s, e in boxes(data, start, end) if k == b"trak")


def frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the largest video track of an MP4/MOV file from its ``tkhd`` boxes, else None."""
    best = None
    for start, end in _tracks(data):
        tkhd = _child(data, start, end, b"tkhd")
        if tkhd is None:
            continue
        offset = tkhd[0] + (88 if data[tkhd[0]] == 1 else 76)  # width, height: 16.16 fixed point
        if offset + 8 <= tkhd[1]:
            w, h = (v >> 16 for v in struct.unpack_from(">II", data, offset))
            if w * h and (best is None or w * h > best[0] * best[1]):
                best = (w, h)
    return best


def _table(data: bytes, box: tuple[int, int] | None, columns: int, dtype: str) -> np.ndarray | None:
    """The entries of a full box that holds a u32 count and then ``columns`` 32-bit fields per entry."""
    if box is None:
        return None
    start, end = box
    (count,) = struct.unpack_from(">I", data, start + 4)
    if start + 8 + count * 4 * columns > end:
        raise ValueError("sample table shorter than its entry count")
    entries = np.frombuffer(data, np.dtype(dtype).newbyteorder(">"), count * columns, start + 8)
    return entries.reshape(count, columns)


def keyframes_out_of_order(data: bytes) -> bool | None:
    """Whether a keyframe of the video track is shown at another position than it is decoded at.

    From the sample tables (``stts`` durations, ``ctts`` composition offsets, ``stss`` keyframes); None
    when the file is not an MP4/MOV with them (other containers, fragmented MP4): the caller decides.
    """
    for start, end in _tracks(data):
        mdia = _child(data, start, end, b"mdia")
        hdlr = mdia and _child(data, *mdia, b"hdlr")
        if not hdlr or data[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
            continue
        minf = _child(data, *mdia, b"minf")
        stbl = minf and _child(data, *minf, b"stbl")
        if not stbl:
            return None
        try:
            stts = _table(data, _child(data, *stbl, b"stts"), 2, "u4")
            ctts = _table(data, _child(data, *stbl, b"ctts"), 2, "i4")
            stss = _table(data, _child(data, *stbl, b"stss"), 1, "u4")
        except (ValueError, struct.error):
            return None
        if stts is None or not len(stts):
            return None  # fragmented: the samples are described in the fragments
        if ctts is None or stss is None:
            return False  # presentation order is decode order, or every frame is a keyframe
        decode_time = np.concatenate([[0], np.cumsum(np.repeat(stts[:, 1].astype(np.int64), stts[:, 0]))])
        offsets = np.repeat(ctts[:, 1].astype(np.int64), ctts[:, 0])
        n = min(len(offsets), len(decode_time) - 1)
        shown_at = np.empty(n, np.int64)
        shown_at[np.argsort(decode_time[:n] + offsets[:n], kind="stable")] = np.arange(n)
        keys = stss[:, 0].astype(np.int64) - 1
        keys = keys[(keys >= 0) & (keys < n)]
        return bool(np.any(shown_at[keys] != keys))
    return None
