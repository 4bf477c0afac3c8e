"""The stall watchdog: a training loop that gets no batch says why, then fails, instead of waiting for ever.

Ray Data's iterator blocks until its next batch is ready, and a data stream whose tasks cannot be
scheduled never makes one: the job would wait with no error. ``Watched`` takes each ``next()`` of the
iterator in a helper thread and waits for it in periods of ``train.stall_timeout_s``: after the first it
prints a diagnosis (what the stream's stages have done, what its tasks ask for, what the cluster has
free), after the second it raises ``DataStall`` with the same, and Ray Train fails the run. Only the
batch the loop asks for is fetched, so an abandoned iterator (an epoch's quota met) consumes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

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


def diagnose_stream(requests: str) -> str:
    """What a stalled stream's stages have done and wait for: Ray Data's operator states for this job's
    running datasets (from its stats actor), what the stream's tasks ask for (``requests``, from the
    resource plan), what the cluster has free, and the fixes."""
    import ray

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
