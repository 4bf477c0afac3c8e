"""Throughput, data-wait and progress accounting for the training loop (rank 0 prints and logs them).

The *data-wait fraction* is the share of wall time a worker spends blocked on the next batch: 0 means
the Ray Data pipeline keeps up and the model is the bottleneck; near 1 means decoding is. It is the one
number that says whether to add decode CPUs or GPUs.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class StepMeter:
    """Accumulates time waiting for data vs. total time and clips processed between two log points."""

    total_steps: int
    start_step: int
    world_size: int = 1
    started: float = field(default_factory=time.perf_counter)
    _window_start: float = field(default_factory=time.perf_counter)
    _window_wait: float = 0.0
    _window_clips: int = 0
    _window_steps: int = 0
    _loss_sum: Any = 0.0  # a device tensor during a window: read (a host sync) only in ``window``
    _loss_count: int = 0
    total_wait: float = 0.0

    def data_wait(self, seconds: float) -> None:
        self._window_wait += seconds
        self.total_wait += seconds

    def step_done(self, local_clips: int, loss: Any) -> None:
        """One optimizer step of ``local_clips`` on this rank; ``loss`` a float or a device tensor, None
        for a skipped (non-finite) step."""
        self._window_clips += local_clips * self.world_size
        self._window_steps += 1
        if loss is not None:
            self._loss_sum += loss
            self._loss_count += 1

    def window(self, step: int) -> dict[str, float]:
        """Metrics since the last call, and reset the window. ``step`` is the optimizer steps done."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        done = step - self.start_step
        per_step = (now - self.started) / done if done else 0.0
        out = {
            "loss": float(self._loss_sum) / self._loss_count if self._loss_count else float("nan"),
            "clips_per_s": self._window_clips / elapsed,
            "data_wait_fraction": min(1.0, self._window_wait / elapsed),
            "step_time_s": elapsed / max(self._window_steps, 1),
            "eta_s": per_step * (self.total_steps - step),
        }
        self._window_start, self._window_wait, self._window_clips, self._window_steps = now, 0.0, 0, 0
        self._loss_sum, self._loss_count = 0.0, 0
        return out


def say(*objects: Any, flush: bool = True) -> None:
    """``print`` for the training workers: one line on this process's stdout, once. Ray Train 2.60 patches
    ``print`` in its workers to log through the root logger, and, since Ray's worker replaced
    ``sys.stdout``, to print as well: every line of a job's log came out twice."""
    sys.stdout.write(" ".join(map(str, objects)) + "\n")
    if flush:
        sys.stdout.flush()


def progress_line(step: int, total: int, epoch: int, lr: float, m: dict[str, float]) -> str:
    return (f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) | epoch {epoch} | "
            f"loss {m['loss']:.4f} | lr {lr:.2e} | {m['clips_per_s']:.1f} clips/s | "
            f"data wait {100 * m['data_wait_fraction']:.0f}% | ETA {format_duration(m['eta_s'])}")
