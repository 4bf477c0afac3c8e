"""Where a training job's start-up goes: wall-clock marks from the driver's start to the first optimizer
step, printed as one line by rank 0 when that step is done.

The driver marks its phases (imports, storage check, Ray, sources, MLflow run, datasets) on this process's
clock (``begin`` then ``mark``); ``Session.fit`` hands the marks to the workers in ``LoopArgs``, where rank 0
adds its own (the worker group formed, model and optimizer built, checkpoint restored, first batch, first
step). Marks are ``time.time()``: the driver and the workers share a clock on one machine, and NTP keeps a
cluster's within milliseconds, far below these phases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Startup:
    started: float = 0.0
    marks: list[tuple[str, float]] = field(default_factory=list)  # (the phase that just ended, when)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def line(self) -> str:
        """``start-up 33.1 s: imports 4.2 | storage 0.1 | ray 3.0 | ...`` (seconds per phase, in order)."""
        parts, last = [], self.started
        for phase, at in self.marks:
            parts.append(f"{phase} {at - last:.1f}")
            last = at
        return f"start-up {last - self.started:.1f} s: " + " | ".join(parts)


_JOB = Startup()  # this driver process's current job


def begin() -> Startup:
    """A job starts: its clock runs from the process's start for the first job (its imports count), from now
    for a later one in the same process."""
    global _JOB
    first = not _JOB.started
    _JOB = Startup(psutil.Process().create_time() if first else time.time())
    if first:
        _JOB.mark("imports")
    return _JOB


def mark(phase: str) -> None:
    """The driver's phase ``phase`` just ended (no-op before ``begin``)."""
    if _JOB.started:
        _JOB.mark(phase)


def current() -> Startup:
    return _JOB
