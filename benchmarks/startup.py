"""Start-up against a bare Ray Train start (issue 27): seconds from a fresh ``python`` process's start to
the demo's first optimizer step, against the same for a bare one-worker ``TorchTrainer``, in the same run.

- ``demo``: ``python jobs/pretrain.py`` on the demo config (the generated sample set, cached after the
  first use) with one worker, 2 steps, the kNN monitor off; its rank 0 prints the phases of its start-up
  (pipeline/train/startup.py), which the table averages.
- ``bare``: a process that imports Ray Train, starts a local Ray as the jobs do, and fits a ``TorchTrainer``
  of one worker whose train function takes one batch of a trivial ``ray.data.range`` dataset: the seconds
  to the train function and to that batch.

Each measurement is its own process (a user's cold start: its imports count); the arms alternate within a
repeat. Target (issue 27): the demo's first step within 1.5x the bare start (to its first batch).

    python benchmarks/startup.py [--repeats 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from epoch_seams import cpu_model  # noqa: E402

STARTUP_LINE = re.compile(r"start-up ([\d.]+) s: (.*)")


def bare_child(out: str) -> None:
    """The bare arm, in this (fresh) process: its clock runs from the process's start, as the jobs' does."""
    import psutil

    started = psutil.Process().create_time()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(address="local", log_to_driver=True)

    def train_fn(config: dict) -> None:
        reached = time.time()
        batches = ray.train.get_dataset_shard("train").iter_batches(batch_size=8)
        next(iter(batches))
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "train function": reached - config["started"],
                    "first batch": time.time() - config["started"],
                }
            )
        )

    TorchTrainer(
        train_fn,
        train_loop_config={"out": out, "started": started},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(storage_path=str(Path(out).parent / "bare-runs")),
        datasets={"train": ray.data.range(1000)},
    ).fit()
    ray.shutdown()


def run_bare(work: Path, repeat: int) -> dict[str, float]:
    out = work / f"bare-{repeat}.json"
    subprocess.run(
        [sys.executable, __file__, "--bare-child", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def run_demo(work: Path, repeat: int, sets: list[str]) -> dict[str, float]:
    """The demo job's start-up line, parsed: each phase's seconds and their total (to the first step)."""
    overrides = [
        f"run_name=startup-{repeat}",
        f"storage_path={work}/runs",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        "tracking.experiment=startup",
        "scaling.num_workers=1",
        "train.max_steps=2",
        "checkpoint.every_steps=2",
        "probe.every_steps=0",
        *sets,
    ]
    command = [
        sys.executable,
        str(REPO / "jobs" / "pretrain.py"),
        "--config",
        str(REPO / "configs" / "pretrain_tiny_demo.yaml"),
    ]
    command += [arg for s in overrides for arg in ("--set", s)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    found = STARTUP_LINE.search(done.stdout + done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"the demo run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    phases = {
        name: float(seconds)
        for name, seconds in (part.rsplit(" ", 1) for part in found.group(2).split(" | "))
    }
    return {**phases, "total": float(found.group(1))}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for the demo run")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        bare_child(args.bare_child)
        return
    bare, demo = [], []
    with tempfile.TemporaryDirectory(prefix="startup-") as root:
        for repeat in range(args.repeats):
            bare.append(run_bare(Path(root), repeat))
            demo.append(run_demo(Path(root), repeat, args.set))
            print(f"repeat {repeat}: bare {bare[-1]}, demo {demo[-1]['total']:.1f} s", flush=True)

    print(
        f"\nstart-up, seconds from the process's start ({os.cpu_count()} CPUs, {cpu_model()}; "
        f"{args.repeats} repeats, mean ± std)\n"
    )
    print("| arm | to | seconds |\n|---|---|---|")
    for key in ("train function", "first batch"):
        print(f"| bare TorchTrainer, 1 worker, ray.data.range | {key} | {mean_std([b[key] for b in bare])} |")
    print(f"| demo, 1 worker | first step | {mean_std([d['total'] for d in demo])} |")
    print(
        "\ndemo phases (mean s): "
        + " | ".join(
            f"{name} {statistics.mean(d.get(name, 0.0) for d in demo):.1f}"
            for name in demo[0]
            if name != "total"
        )
    )
    ratios = [d["total"] / b["first batch"] for d, b in zip(demo, bare, strict=True)]
    ratio = statistics.mean(d["total"] for d in demo) / statistics.mean(b["first batch"] for b in bare)
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"\nratio demo first step / bare first batch: {ratio:.2f}x (per repeat {shown}); "
        f"target <= 1.5x: {'met' if ratio <= 1.5 else 'not met'}"
    )


if __name__ == "__main__":
    main()
