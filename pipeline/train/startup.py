"""Where a training job's start-up goes: wall-clock marks from the driver's process start to the first
optimizer step, printed as one line by rank 0 when that step is done.

The driver marks its phases (imports, storage check, Ray, sources, MLflow run, datasets); the marks travel
to the workers in ``LoopArgs``, where rank 0 adds its own (the worker group formed, model and optimizer
built, checkpoint restored, first batch, first step). Marks are ``time.time()``: the driver and the workers
share a clock on one machine, and NTP keeps a cluster's within milliseconds, far below these phases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Startup:
    marks: list[tuple[str, float]] = field(default_factory=list)  # (the phase that just ended, when)
    started: float = field(default_factory=lambda: psutil.Process().create_time())  # this process's start

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def line(self) -> str:
        """``start-up 33.1 s: imports 4.2 | storage 0.1 | ray 3.0 | ...`` (seconds per phase, in order)."""
        parts, last = [], self.started
        for phase, at in self.marks:
            parts.append(f"{phase} {at - last:.1f}")
            last = at
        return f"start-up {last - self.started:.1f} s: " + " | ".join(parts)
