"""Bad videos are data, not crashes: a per-run ledger of read/decode failures.

Every video that cannot be read or decoded raises a ``VideoError(uri, reason, detail)`` in the decode
step; the step records it in the run's ``ErrorLedger``, skips the video and goes on. The run fails with
``ErrorBudgetExceeded`` (a clear message with counts per reason and the first failures) only when the
error fraction passes ``max_error_fraction`` after at least ``min_videos`` videos (while streaming: when
it is statistically clear that it does, see ``ErrorLedger.check``).

The ledger is a named Ray actor (``videomae-data-errors/<label>-<random>`` in namespace ``videomae``:
``create`` makes a fresh one) created by the driver before it builds a dataset; decode tasks report to it,
the training loop (rank 0, in a Ray Train worker) reads live counts, and the driver writes the report::

    ledger = ErrorLedger.create(run_name)          # driver (a fresh actor); ErrorLedger.get(ledger.run_name)
                                                   # finds it from a worker
    ledger.record(uri, reason, detail)             # decode tasks (returns the new snapshot)
    ledger.record_ok(n, by_backend=..., fallbacks=...)  # decode tasks, videos decoded (once per block)
    ledger.snapshot()  # {"videos", "ok", "errors", "error_fraction", "by_reason": {reason: n}, "by_backend"}
    ledger.check(max_error_fraction, min_videos)   # raises ErrorBudgetExceeded (e.g. at the end of an epoch)
    ledger.write_report(uri)                       # JSONL: one {"uri", "reason", "detail"} per line

``ErrorLedger.local()`` is the same API without Ray (unit tests, benchmarks, single-process tools).
"""

from __future__ import annotations

import json
import math
from collections import Counter

from pipeline import storage

REASONS = {
    "not_found": "the object does not exist (deleted after listing?)",
    "storage": "the object could not be read (permissions); outages are retried, not counted",
    "empty": "zero-byte file",
    "undecodable": "not a readable video container (random bytes, text, truncated file)",
    "no_video_stream": "the container has no video stream (audio-only?)",
    "unsupported_codec": "the video stream's codec cannot be decoded",
    "too_large": "frame resolution above the configured max_pixels",
    "too_short": "fewer frames than the configured min_frames",
    "decode_error": "decoding the frames failed",
    "timeout": "read + decode took longer than decode_timeout_s",
    "decoder_crash": "the decoder process died (e.g. a segfault in the C decoder)",
    "bad_sample": "a shard sample without a video member, or with unreadable .json / .cls",
    "corrupt_shard": "a shard is damaged from this point on: the rest of it is skipped",
    "no_label": "a labelled mode (finetuning) got a video without a label",
}
ACTOR_NAMESPACE = "videomae"
ACTOR_PREFIX = "videomae-data-errors/"
MAX_KEPT = 100_000  # errors kept for the report; counts stay exact beyond it


class VideoError(Exception):
    """One video that cannot be used; ``reason`` is a key of ``REASONS``."""

    def __init__(self, uri: str, reason: str, detail: str = ""):
        self.uri, self.reason, self.detail = storage.redact(uri), reason, detail
        super().__init__(f"{self.uri}: {reason}: {detail}" if detail else f"{self.uri}: {reason}")

    def __reduce__(self):
        return VideoError, (self.uri, self.reason, self.detail)


class ErrorBudgetExceeded(RuntimeError):
    """Too many bad videos: the data, not the pipeline, needs fixing."""


class LedgerState:
    """The counts and the kept errors; the body of the Ray actor, or used directly when local."""

    def __init__(self) -> None:
        self.ok = 0
        self.by_reason: Counter[str] = Counter()
        self.by_backend: Counter[str] = Counter()  # which decoder read the good videos
        self.errors: list[dict] = []
        self.fallbacks: list[dict] = []  # videos read only by a later decoder of data.decoder=auto

    def record(self, uri: str, reason: str, detail: str = "") -> dict:
        self.by_reason[reason] += 1
        if len(self.errors) < MAX_KEPT:
            self.errors.append({"uri": uri, "reason": reason, "detail": detail[:500]})
        return self.snapshot()

    def record_ok(self, n: int = 1, by_backend: dict[str, int] | None = None,
                  fallbacks: list[dict] | None = None) -> None:
        self.ok += n
        self.by_backend.update(by_backend or {})
        self.fallbacks.extend((fallbacks or [])[: max(0, MAX_KEPT - len(self.fallbacks))])

    def snapshot(self) -> dict:
        errors = sum(self.by_reason.values())
        videos = self.ok + errors
        return {
            "videos": videos,
            "ok": self.ok,
            "errors": errors,
            "error_fraction": errors / videos if videos else 0.0,
            "by_reason": dict(self.by_reason),
            "by_backend": dict(self.by_backend),
        }

    def report_lines(self) -> list[dict]:
        return list(self.errors)

    def fallback_lines(self) -> list[dict]:
        return list(self.fallbacks)


def error_rate_lower_bound(snap: dict, z: float) -> float:
    """Wilson score lower bound of the error rate after ``snap["videos"]`` videos (z = 0: the fraction)."""
    n, p = snap["videos"], snap["error_fraction"]
    if n == 0 or z == 0:
        return p
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def budget_message(snap: dict, max_error_fraction: float, first: list[dict]) -> str:
    examples = "; ".join(f"{e['uri']} ({e['reason']}: {e['detail'][:80]})" for e in first[:5])
    return (
        f"{snap['errors']} of {snap['videos']} videos failed to read/decode "
        f"({snap['error_fraction']:.1%} > max_error_fraction {max_error_fraction:.1%}); "
        f"by reason: {snap['by_reason']}; first failures: {examples}"
    )


class ErrorLedger:
    """Facade over a ``LedgerState`` held locally or in a named Ray actor; picklable into Ray tasks."""

    def __init__(self, target, name: str | None = None):
        self._target, self.name = target, name
        self._remote = name is not None

    @classmethod
    def local(cls) -> ErrorLedger:
        return cls(LedgerState())

    @classmethod
    def get_or_create(cls, run_name: str) -> ErrorLedger:
        """The run's ledger actor, created on first call; call it from the driver (the actor's owner)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = ACTOR_PREFIX + run_name
        actor_cls = ray.remote(num_cpus=0)(LedgerState)
        # NOTE: on the driver's node, whose loss ends the job anyway: anywhere else, losing that node would
        # take the run's error counts with it and fail every decode task that reports to them.
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        handle = actor_cls.options(name=name, namespace=ACTOR_NAMESPACE, get_if_exists=True,
                                   scheduling_strategy=driver_node).remote()
        return cls(handle, name)

    @classmethod
    def create(cls, label: str) -> ErrorLedger:
        """A new ledger for one run of a job, named ``<label>-<random>``. A reused name could hand back the
        actor of an earlier job in the same process that Ray is still tearing down (its handles gone), which
        then dies under the new job. The caller holds the handle while the job runs; workers find it by
        ``ledger.run_name`` (``get``)."""
        import uuid

        return cls.get_or_create(f"{label}-{uuid.uuid4().hex[:8]}")

    @property
    def run_name(self) -> str | None:
        return self.name.removeprefix(ACTOR_PREFIX) if self.name else None

    @classmethod
    def get(cls, run_name: str) -> ErrorLedger:
        """An existing run's ledger (e.g. from the training loop); ValueError if there is none."""
        import ray

        name = ACTOR_PREFIX + run_name
        return cls(ray.get_actor(name, namespace=ACTOR_NAMESPACE), name)

    def _call(self, method: str, *args, wait: bool = True):
        if not self._remote:
            return getattr(self._target, method)(*args)
        ref = getattr(self._target, method).remote(*args)
        if wait:
            import ray

            return ray.get(ref)
        return None

    def record(self, uri: str, reason: str, detail: str = "") -> dict:
        return self._call("record", uri, reason, detail)

    def record_ok(self, n: int = 1, wait: bool = False, by_backend: dict[str, int] | None = None,
                  fallbacks: list[dict] | None = None) -> None:
        self._call("record_ok", n, by_backend, fallbacks, wait=wait)

    def snapshot(self) -> dict:
        return self._call("snapshot")

    def errors(self) -> list[dict]:
        return self._call("report_lines")

    def check(
        self, max_error_fraction: float, min_videos: int = 20, snapshot: dict | None = None, z: float = 0.0
    ) -> None:
        """Raise ``ErrorBudgetExceeded`` when the error fraction passes the bound.

        ``z = 0`` compares the observed fraction (for the end of an epoch). While data streams, bad videos
        can come in clusters, so the decode tasks use ``z = 3``: they fail only when even the lower
        Wilson bound of the error rate (99.7% confidence) is above the limit: at once for a dataset of
        only bad videos, never for one just under the limit that happened to start badly.
        """
        snap = snapshot or self.snapshot()
        if snap["videos"] >= min_videos and error_rate_lower_bound(snap, z) > max_error_fraction:
            raise ErrorBudgetExceeded(budget_message(snap, max_error_fraction, self.errors()))

    def write_report(self, uri: str) -> int:
        """Write every kept error as JSONL to ``uri`` (atomically), and beside it, when ``data.decoder`` auto
        had to fall back, ``<name>_fallbacks.jsonl`` (which decoder read which video, after which failures);
        returns the number of errors."""
        lines = self.errors()
        storage.write_text(uri, "".join(json.dumps(e) + "\n" for e in lines))
        fallbacks = self._call("fallback_lines")
        if fallbacks:
            storage.write_text(uri.removesuffix(".jsonl") + "_fallbacks.jsonl",
                               "".join(json.dumps(e) + "\n" for e in fallbacks))
        return len(lines)
