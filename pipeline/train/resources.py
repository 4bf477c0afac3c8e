"""The resource plan, checked on the driver before training: do the training workers and the data stream's
tasks fit the cluster together?

Ray Train places its workers first (a placement group, packed onto as few nodes as it can), and Ray Data
then runs each dataset's stages in what the workers leave: its budget is the cluster's resources minus the
workers'. A stage whose one task fits no node's leftover never runs, and the job waits for ever with no
error (Ray Data only logs that the stage is starved). ``check`` finds that case from the numbers before
anything starts, and says which numbers to change.

A stage is read off a dataset's logical plan (``stages``): what each of its tasks asks Ray for, Ray's
default of 1 CPU where it asks nothing. The stages of one dataset need not all run at once (a starved
downstream stage runs when the upstream ones pause), so each must fit on its own; when they do not fit
together the data path takes turns, and ``check`` says so as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError

FIXES = (
    "lower scaling.cpus_per_worker; lower data.decode_num_cpus (and data.light_num_cpus, the stream's "
    "light stages); add CPU nodes; or give decoding nodes of its own with a custom resource "
    "(data.decode_resources, docs/cluster.md \"The resource plan\"). On an autoscaling cluster whose "
    "nodes come later, set scaling.check_resources=false"
)


class ResourcePlanError(ConfigError):
    """The workers and the data stream cannot run together on this cluster."""


@dataclass(frozen=True)
class Stage:
    """One stage of a dataset: its name (``train: MapBatches(clips_of_rows)``) and one task's request."""

    name: str
    request: dict[str, float]


def _fits(free: dict[str, float], request: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in request.items() if v > 0)


def _take(free: dict[str, float], request: dict[str, float]) -> dict[str, float]:
    return {k: free.get(k, 0.0) - request.get(k, 0.0) for k in set(free) | set(request)}


def group_size(low: int, high: int) -> str:
    """A group's size as messages give it: ``2``, or ``1-2`` for an elastic range."""
    return f"{low}" if low == high else f"{low}-{high}"


def show(resources: dict[str, float]) -> str:
    shown = [f"{k} {v:g}" for k, v in sorted(resources.items()) if abs(v) > 1e-9]
    return ", ".join(shown) or "nothing"


def place_workers(nodes: list[dict[str, float]], worker: dict[str, float], count: int
                  ) -> list[dict[str, float]] | None:
    """What each node has left once ``count`` workers are packed onto as few nodes as possible (Ray Train's
    default placement, PACK): the node that holds the most workers is filled first. None if they do not
    fit at all."""
    left = [dict(n) for n in nodes]

    def capacity(free: dict[str, float]) -> int:
        needed = [(free.get(k, 0.0) + 1e-9) // v for k, v in worker.items() if v > 0]
        return int(min(needed)) if needed else count

    for index in sorted(range(len(left)), key=lambda i: -capacity(left[i])):
        while count and _fits(left[index], worker):
            left[index] = _take(left[index], worker)
            count -= 1
    return None if count else left


def workers_started(nodes: list[dict[str, float]], worker: dict[str, float], low: int, high: int) -> int:
    """How many workers a group of ``low``..``high`` starts with here: the most that fit (0: not ``low``)."""
    for count in range(high, low - 1, -1):
        if place_workers(nodes, worker, count) is not None:
            return count
    return 0


def check(nodes: list[dict[str, float]], worker: dict[str, float], low: int, high: int,
          datasets: dict[str, list[Stage]]) -> list[str]:
    """Raise ResourcePlanError when the plan cannot run; return warnings for a plan that runs slowly.

    ``nodes`` are the alive nodes' total resources, ``worker`` one training worker's request, ``low`` and
    ``high`` the group's size range, ``datasets`` each dataset's stages."""
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in {k for n in nodes for k in n}}
    count = workers_started(nodes, worker, low, high)
    if not count:
        raise ResourcePlanError(
            f"resource plan: {group_size(low, high)} training worker(s) of {{{show(worker)}}} do not fit "
            f"this cluster "
            f"({len(nodes)} node(s): {'; '.join(show({k: n.get(k, 0) for k in worker}) for n in nodes)}). "
            f"Fixes: {FIXES}"
        )
    left = place_workers(nodes, worker, count)
    assert left is not None
    budget = _take(total, {k: v * count for k, v in worker.items()})
    asked = {k for stages_ in datasets.values() for stage in stages_ for k in stage.request} | set(worker)

    def shown(free: dict[str, float]) -> str:
        return show({k: v for k, v in free.items() if k in asked})

    where = (f"{count} training worker(s) of {{{show(worker)}}} leave "
             f"{'; '.join(f'node {i}: {shown(free)}' for i, free in enumerate(left))} "
             f"(Ray Data's budget: {shown(budget)})")
    problems, warnings = [], []
    for name, stages in datasets.items():
        for stage in stages:
            if not any(_fits(free, stage.request) for free in left) or not _fits(budget, stage.request):
                problems.append(f"{stage.name} needs {{{show(stage.request)}}} per task")
        together = [dict(free) for free in left]
        for stage in sorted(stages, key=lambda s: -sum(s.request.values())):
            room = next((i for i, free in enumerate(together) if _fits(free, stage.request)), None)
            if room is None:
                warnings.append(f"dataset {name!r}: its stages do not all fit beside the workers at once "
                                f"({where}); they take turns, and the training may wait for data")
                break
            together[room] = _take(together[room], stage.request)
    if problems:
        raise ResourcePlanError(
            f"resource plan: the data stream cannot run beside the training workers, so the job would wait "
            f"for ever: {where}, but {'; '.join(problems)}. Fixes: {FIXES}"
        )
    return warnings


def stages(name: str, dataset: Any) -> list[Stage]:
    """The stages of a ``ray.data.Dataset`` that run tasks, read off its logical plan, each with one task's
    request (Ray Data's default of 1 CPU where the stage names none). In-memory inputs (``from_items``)
    run no tasks and have no remote arguments."""
    found, pending = [], [dataset._logical_plan.dag]
    while pending:
        op = pending.pop()
        pending.extend(op.input_dependencies)
        remote = getattr(op, "ray_remote_args", None)
        if remote is None:
            continue
        cpus = remote.get("num_cpus")
        request = {"CPU": 1.0 if cpus is None else float(cpus), "GPU": float(remote.get("num_gpus") or 0),
                   **{k: float(v) for k, v in (remote.get("resources") or {}).items()}}
        found.append(Stage(f"{name}: {op.name}", {k: v for k, v in request.items() if v}))
    return found[::-1]


def cluster_nodes() -> list[dict[str, float]]:
    """The alive nodes' total resources (CPU, GPU, memory and custom ones), as Ray reports them."""
    import ray

    return [{k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
            for node in ray.nodes() if node.get("Alive")]
