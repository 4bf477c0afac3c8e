"""The stall watchdog: a training loop that gets no batch says why, then fails, instead of waiting for ever.

Ray Data's iterator blocks until its next batch is ready, and a data stream whose tasks cannot be
scheduled never makes one: the job would wait with no error. ``Watched`` takes each ``next()`` of the
iterator in a helper thread and waits for it in periods of ``train.stall_timeout_s``: after the first it
prints a diagnosis (what the stream's stages have done, what its tasks ask for, what the cluster has
free), after the second it raises ``DataStall`` with the same, and Ray Train fails the run. Only the
batch the loop asks for is fetched, so an abandoned iterator (an epoch's quota met) consumes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from pipeline.train.resources import group_size, show

_END = object()


class DataStall(RuntimeError):
    """No batch arrived within two periods of ``train.stall_timeout_s``."""


class Watched:
    """``next()`` of ``batches`` with the stall watchdog (module docstring); ``timeout_s`` 0 turns it off."""

    def __init__(self, batches: Iterator, timeout_s: float, diagnose: Callable[[], str],
                 say: Callable[[str], Any], pool: ThreadPoolExecutor) -> None:
        self.batches, self.timeout_s, self.pool = batches, timeout_s, pool
        self.diagnose, self.say = diagnose, say

    def __iter__(self) -> Watched:
        return self

    def __next__(self) -> Any:
        if not self.timeout_s:
            return next(self.batches)
        pending = self.pool.submit(next, self.batches, _END)
        for period in (1, 2):
            try:
                batch = pending.result(timeout=self.timeout_s)
                break
            except FutureTimeout:
                waited = f"no batch for {period * self.timeout_s:g} s (train.stall_timeout_s)"
                if period == 1:
                    self.say(f"warning: {waited}; {self.diagnose()}")
                else:  # Ray Train shows a failure's last 500 characters: the summary goes last
                    raise DataStall(f"{self.diagnose()}; {waited}, so the run stops instead of waiting for "
                                    f"ever") from None
        if batch is _END:
            raise StopIteration
        return batch


_stall_timeout_s = 0.0  # this worker's train.stall_timeout_s, set once by its training loop


def set_stall_timeout(seconds: float) -> None:
    """The watchdog period of this worker's validation and probe passes (``watch``)."""
    global _stall_timeout_s
    _stall_timeout_s = seconds


def watch(batches: Iterable, say: Callable[[str], Any]) -> Iterator:
    """``batches`` of a validation or probe pass under this worker's stall watchdog, with a helper thread
    of its own (a pass never waits silently for a dataset that cannot run either)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="eval-batches")
    try:
        yield from Watched(iter(batches), _stall_timeout_s, lambda: diagnose_stream(""), say, pool)
    finally:
        pool.shutdown(wait=False)


def diagnose_stream(requests: str) -> str:
    """What a stalled stream's stages have done and wait for: Ray Data's operator states for this job's
    running datasets (from its stats actor), what the stream's tasks ask for (``requests``, from the
    resource plan), what the cluster has free, and the fixes."""
    import ray

    if not ray.is_initialized():  # nothing to ask (a pass outside a Ray worker)
        return "Ray is not running here"
    parts = []
    try:
        from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

        actor = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
        job = ray.get_runtime_context().get_job_id()
        for tag, state in ray.get(actor.get_datasets.remote(job), timeout=10).items():
            if state.get("state") != "RUNNING":
                continue
            ops = [f"{op.get('name', key)} {op.get('progress', 0)} task(s) done, "
                   f"{op.get('queued_blocks', 0)} block(s) queued, {op.get('state', '?').lower()}"
                   for key, op in state.get("operators", {}).items()]
            parts.append(f"dataset {tag}: {'; '.join(ops)}")
    except Exception as e:  # noqa: BLE001 - a diagnosis must not fail the diagnosis
        parts.append(f"Ray Data's operator states unavailable ({type(e).__name__}: {e})")
    free, total = ray.available_resources(), ray.cluster_resources()
    # a placement group's bundles show as resources of their own (CPU_group_<id>): the workers' CPUs
    shown = ", ".join(f"{k} {free.get(k, 0):g} of {v:g}" for k, v in sorted(total.items())
                      if "_group_" not in k and "memory" not in k and not k.startswith(("node:", "accel")))
    if requests:
        parts.append(f"its tasks ask for {requests}")
    parts.append(f"the cluster has free: {shown}")
    parts.append("fixes: lower scaling.cpus_per_worker or data.decode_num_cpus, add CPU nodes "
                 "(docs/cluster.md, \"The resource plan\")")
    return "; ".join(parts)


class GroupStall(RuntimeError):
    """The training workers showed no sign of life for two periods of ``scaling.group_timeout_s``."""


class GroupWatch:
    """On the driver, while Ray Train runs: a worker group that never forms (its workers cannot be placed,
    or an elastic group that will not restart) says why, as the loop's watchdog does for data.

    ``beats()`` counts the group's signs of life (rank 0 marks each pass on the run's cursor and beats
    while it runs). When it stays put for a period (``scaling.group_timeout_s``) the watch prints
    ``diagnose()``; after a second it records the failure and calls ``abort``: a SIGINT, on which Ray Train
    aborts its run as on Ctrl-C; its controller, busy starting a group, may not answer, and at the third
    Ray's handler stops waiting for it. The driver then raises ``GroupStall``. Without ``abort`` (a driver
    off the main thread) it only warns."""

    def __init__(self, beats: Callable[[], int], timeout_s: float, diagnose: Callable[[], str],
                 abort: Callable[[], None] | None) -> None:
        import threading

        self.beats, self.timeout_s, self.diagnose, self.abort = beats, timeout_s, diagnose, abort
        self.failure: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True, name="group-watch")

    def __enter__(self) -> GroupWatch:
        if self.timeout_s:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()

    def watch(self) -> None:
        seen, quiet = self.read(), 0
        while not self.done.wait(self.timeout_s):
            now = self.read()
            quiet = 0 if now != seen else quiet + 1
            seen = now
            if not quiet:
                continue
            waited = f"the training workers showed no sign of life for {quiet * self.timeout_s:g} s " \
                     f"(scaling.group_timeout_s)"
            if quiet == 1 or self.abort is None:
                print(f"warning: {waited}: {self.diagnose()}", flush=True)
                continue
            self.failure = f"{waited}, so the run stops instead of waiting for ever: {self.diagnose()}"
            print(f"error: {self.failure}", flush=True)
            for _ in range(3):  # a controller busy starting a group may not answer the first
                self.abort()
                if self.done.wait(10):
                    return
            return

    def read(self) -> int:
        try:
            return self.beats()
        except Exception:  # noqa: BLE001 - an unreadable count is no sign of life
            return -1


def diagnose_group(worker: dict[str, float], low: int, high: int) -> str:
    """Why a worker group of ``low``..``high`` may not form: what it asks for against what the cluster has
    free."""
    import ray


    free, total = ray.available_resources(), ray.cluster_resources()
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    shown = ", ".join(f"{k} {free.get(k, 0):g} of {total.get(k, 0):g}" for k in sorted(worker))
    return (f"the group asks for {group_size(low, high)} worker(s) of {{{show(worker)}}}; the cluster "
            f"({alive} node(s) alive) has free: {shown}. Ray Train's controller log says what it waits for; "
            "fixes: lower scaling.num_workers (or its minimum) or scaling.cpus_per_worker, or add nodes")
