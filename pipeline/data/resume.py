"""Exact resume of the training stream: which clips of the epoch were trained on, and the cursor that
tells the read tasks.

A rank counts the clips it trained on per position (``Consumption``); a video is done when all its
``clips_per_video`` clips were. Checkpoints hold the epoch's done positions (a bitmap), gathered over the
ranks. Before each pass rank 0 hands the epoch and its bitmap to the run's cursor actor (``CursorState``),
and the read tasks drop done rows before anything is decoded: a resumed epoch continues with the videos
it had not yet trained on. Videos in flight at the checkpoint (decoded, in a prefetch or shuffle buffer,
not trained on) are seen again. ``train.audit_dir`` records every trained clip (``read_audit``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

CURSOR_PREFIX = "videomae-data-cursor/"
CURSOR_NAMESPACE = "videomae"


class CursorState:
    """The epoch a pass reads, the bitmap of its done positions and the clip masks of its begun videos
    (set by rank 0 before each pass)."""

    def __init__(self) -> None:
        self.epoch, self.done, self.partial = 0, b"", {}
        self.beats = 0  # the training loop's signs of life, for the driver's watch (watchdog.GroupWatch)

    def set(self, epoch: int, done: bytes, partial: dict[int, int] | None = None) -> None:
        self.epoch, self.done, self.partial = epoch, done, dict(partial or {})
        self.beats += 1

    def beat(self) -> None:
        self.beats += 1

    def count_beats(self) -> int:
        return self.beats

    def get(self) -> tuple[int, bytes, dict[int, int]]:
        return self.epoch, self.done, self.partial


def cursor_name(run_name: str) -> str:
    return CURSOR_PREFIX + run_name


def create_cursor(run_name: str):
    """The run's cursor actor, on the driver's node (see ErrorLedger.get_or_create)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(CursorState).options(
        name=cursor_name(run_name), namespace=CURSOR_NAMESPACE, get_if_exists=True, scheduling_strategy=here
    ).remote()


def get_cursor(run_name: str):
    import ray

    return ray.get_actor(cursor_name(run_name), namespace=CURSOR_NAMESPACE)


def done_mask(done: bytes, lo: int, hi: int) -> np.ndarray:
    """Positions ``[lo, hi)`` of a packed bitmap as booleans (missing bits: not done)."""
    bits = np.unpackbits(np.frombuffer(done, np.uint8), bitorder="little") if done else np.zeros(0, bool)
    out = np.zeros(hi - lo, bool)
    have = bits[lo:hi]
    out[: len(have)] = have.astype(bool)
    return out


class Consumption:
    """Which clips of the current epoch were trained on, per position: a video is done when all of its
    ``clips_per_video`` clips were, on whichever ranks. A rank records its own clips (``add``); ``merge``
    unites every rank's (a checkpoint's gather), so all ranks then hold the same record: a bitmap of done
    positions and the clip masks of the videos begun but not done (``partial``). A resumed pass skips the
    done videos and, of a begun one, the clips already trained: every clip of an epoch once."""

    def __init__(self, clips_per_video: int, audit_dir: str = "") -> None:
        self.clips_per_video, self.audit_dir = clips_per_video, audit_dir
        self.full = (1 << clips_per_video) - 1
        self.epoch = 0
        self.partial: dict[int, int] = {}  # position -> mask of its trained clips (not all of them)
        self.done: set[int] = set()  # since the last merge
        self.bitmap = np.zeros(0, bool)  # done positions of the epoch, every rank's, as of the last merge

    def start_epoch(self, epoch: int, bitmap: np.ndarray | None = None,
                    partial: dict[int, int] | None = None) -> None:
        self.epoch, self.partial, self.done = epoch, dict(partial or {}), set()
        self.bitmap = np.zeros(0, bool) if bitmap is None else bitmap

    def add(self, epochs: np.ndarray, positions: np.ndarray, clips: Any, step: int = 0,
            videos: list[str] | None = None) -> None:
        """The clips of a micro-batch of optimizer step ``step`` were trained on: ``clips`` says which clip
        of its video each is (the stream's ``clip`` column), ``videos`` their URIs (for the audit)."""
        n = len(positions)
        indices = np.asarray(clips).tolist()
        if self.audit_dir:  # what each step trained on, clip by clip (train.audit_dir; read_audit)
            uris = list(videos) if videos is not None else ["-"] * n
            with open(os.path.join(self.audit_dir, f"consumed-{os.getpid()}.txt"), "a") as out:
                out.writelines(f"{step} {e} {p} {c} {u}\n" for e, p, c, u in zip(
                    epochs.tolist(), positions.tolist(), indices, uris, strict=True))
        for e, p, c in zip(epochs.tolist(), positions.tolist(), indices, strict=True):
            if e == self.epoch:
                self._mark(p, 1 << c)

    def _mark(self, position: int, mask: int) -> None:
        seen = self.partial.get(position, 0) | mask
        if seen & self.full == self.full:
            self.partial.pop(position, None)
            self.done.add(position)
        else:
            self.partial[position] = seen

    def local(self) -> tuple[list[int], dict[int, int]]:
        """This rank's news for a merge: positions done since the last one, and its begun videos."""
        return sorted(self.done), dict(self.partial)

    def merge(self, per_rank: list[tuple[list[int], dict[int, int]]]) -> None:
        """Every rank's ``local()`` into the epoch's record (the same on every rank afterwards)."""
        for _, partial in per_rank:
            for position, mask in partial.items():
                self._mark(int(position), int(mask))
        finished = {p for done, _ in per_rank for p in done} | self.done
        self.partial = {p: m for p, m in self.partial.items() if p not in finished}
        positions = sorted(finished)
        if positions:
            size = max(len(self.bitmap), positions[-1] + 1)
            if size > len(self.bitmap):
                self.bitmap = np.concatenate([self.bitmap, np.zeros(size - len(self.bitmap), bool)])
            self.bitmap[positions] = True
        self.done = set()

    def packed(self) -> bytes:
        return np.packbits(self.bitmap, bitorder="little").tobytes()

    @staticmethod
    def unpack(data: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little").astype(bool)


@dataclass(frozen=True)
class AuditRecord:
    """One trained clip, as ``train.audit_dir`` records it: a line ``step epoch position clip uri``."""

    step: int
    epoch: int
    position: int
    clip: int  # which of its video's clips_per_video clips
    uri: str
    attempt: str  # the file (one per worker process: a restart writes a new one)


def read_audit(audit_dir: str) -> list[AuditRecord]:
    """Every clip the workers trained on, from a local ``train.audit_dir``, file by file in line order."""
    out = []
    for name in sorted(os.listdir(audit_dir)):
        if not name.startswith("consumed-"):
            continue
        with open(os.path.join(audit_dir, name)) as f:
            for line in f:
                step, epoch, position, clip, uri = line.rstrip("\n").split(" ", 4)
                out.append(AuditRecord(int(step), int(epoch), int(position), int(clip), uri, name))
    return out

