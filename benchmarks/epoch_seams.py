"""Data wait at the seams between epochs: the buffer that fills before its first batch against the ramped
buffer and the next pass started while the current one drains, same run, same data.

Each repeat trains the demo preset (configs/pretrain_tiny_demo.yaml: 2 workers, 16 clips each, a 512-clip
shuffle buffer per worker) on the generated sample set for ``--epochs`` epochs, twice:

- ``fill first``: ``train.shuffle_buffer_initial_batches`` = ``shuffle_buffer_batches`` and
  ``train.overlap_epochs=false``: every pass decodes a full buffer before its first step, and no decoding
  happens while a pass drains (what Ray Data's ``local_shuffle_buffer_size`` does);
- ``ramped``: the buffer gives its first batch after two batches' worth, no overlap;
- ``ramped + overlap``: the defaults.

Rank 0's per-window data-wait fraction (a window is ``--log-every`` steps, from MLflow) is split into the
windows that hold an epoch's end and those inside an epoch; the run's first window (start-up) is left out.
Target (issue 27): seam windows' wait <= max(2x the mid-epoch windows', theirs + 5 points), whole-run wait
<= 5% where decode keeps up mid-epoch. Arms alternate within a repeat; the p-value is a paired t-test
over repeats.

    python benchmarks/epoch_seams.py [--repeats 3] [--epochs 4] [--log-every 5] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sample_efficiency import paired_t_test  # noqa: E402

ARMS = {
    "fill first": ["train.overlap_epochs=false", "train.shuffle_buffer_initial_batches=32"],
    "ramped": ["train.overlap_epochs=false"],
    "ramped + overlap": [],
}


def run_arm(name: str, repeat: int, args: argparse.Namespace, root: str) -> dict[str, float]:
    """One training run of ``name``: its windows' data wait split at the epochs' ends, and the seconds its
    windows after the first took (training, without the start-up)."""
    from mlflow.tracking import MlflowClient

    from pipeline import config as config_lib
    from pipeline.train.pretrain import PretrainConfig, run_pretrain

    run = f"seams-{repeat}-" + "-".join(name.replace("+", " ").split())  # one run folder per arm
    sets = ARMS[name] + [
        f"run_name={run}", f"storage_path={root}/runs", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        "tracking.experiment=epoch-seams", "tracking.system_metrics=false", "tracking.recon_every_steps=0",
        "probe.every_steps=0", f"train.log_every_steps={args.log_every}", f"seed={repeat}",
        f"data.limit={args.videos}", f"train.max_steps={args.steps_per_epoch * args.epochs}",
        f"checkpoint.every_steps={args.steps_per_epoch * args.epochs}", *args.set,
    ]
    cfg = config_lib.load(PretrainConfig, config_lib.CONFIG_DIR / "pretrain_tiny_demo.yaml", sets)
    result = run_pretrain(cfg)
    global_batch = cfg.train.global_batch(cfg.scaling.max_workers)
    client = MlflowClient(result.tracking_uri)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}

    waits, speeds, epochs = history("data_wait_fraction"), history("clips_per_s"), history("epoch")
    steps = sorted(waits)[1:]  # the first window holds the start-up
    seam = [s for s in steps if any(s - args.log_every < k * args.steps_per_epoch <= s
                                    for k in range(1, args.epochs))]
    mid = [s for s in steps if s not in seam]
    # each window's duration: its clips over its clips/s; the whole run's fraction weights windows by it
    seconds = {s: args.log_every * global_batch / speeds[s] for s in steps}
    whole = sum(waits[s] * seconds[s] for s in steps) / sum(seconds.values())
    assert max(epochs.values()) + 1 >= args.epochs, f"{run} trained {max(epochs.values()) + 1} epochs"
    return {"seam": 100 * statistics.fmean(waits[s] for s in seam),
            "mid": 100 * statistics.fmean(waits[s] for s in mid), "whole": 100 * whole,
            "train": sum(seconds.values())}


def cpu_model() -> str:
    """The CPU's model name (Linux), for the table's heading: CPU figures differ between machines."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--videos", type=int, default=210, help="of the sample set's training split: "
                        "210 x 4 clips fill 26 steps of 32 clips, and each epoch ends with its data")
    parser.add_argument("--steps-per-epoch", type=int, default=26, help="what --videos fill")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm, e.g. a wider model: training slower than "
                             "decoding, the regime the overlap is for")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ARMS}
    from pipeline import config as config_lib
    from pipeline.data.synthetic import ensure_sample_dataset
    from pipeline.train.pretrain import PretrainConfig

    demo = config_lib.load(PretrainConfig, config_lib.CONFIG_DIR / "pretrain_tiny_demo.yaml", [])
    ensure_sample_dataset(demo.data.sample_cache_dir)  # generated once, before any arm is timed
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for name in ARMS if repeat % 2 == 0 else reversed(ARMS):  # alternate the order of the arms
                results[name].append(run_arm(name, repeat, args, root))
    print(f"\ndata wait at epoch seams ({os.cpu_count()} CPUs, {cpu_model()}; demo preset"
          f"{' with ' + ' '.join(args.set) if args.set else ''}, 2 workers, {args.epochs} epochs of "
          f"{args.steps_per_epoch} steps, windows of {args.log_every} steps, {args.repeats} repeats, "
          "mean ± std)")
    header = f"{'arm':<18}{'seam windows':>16}{'mid-epoch':>16}{'whole run':>16}{'train s':>16}"
    print(header)
    print("-" * len(header))
    for name, rows in results.items():
        cells = []
        for key, unit in (("seam", "%"), ("mid", "%"), ("whole", "%"), ("train", "")):
            values = [r[key] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):>9.1f} ± {std:<4.1f}{unit}".rjust(16))
        print(f"{name:<18}{''.join(cells)}")
    for arm, baseline in (("ramped", "fill first"), ("ramped + overlap", "fill first"),
                          ("ramped + overlap", "ramped")):
        for key, label in (("seam", "seam-window data wait"), ("train", "training time")):
            new, base = [r[key] for r in results[arm]], [r[key] for r in results[baseline]]
            diff, p = paired_t_test(new, base)
            ratio = statistics.fmean(new) / max(statistics.fmean(base), 1e-9)
            print(f"{label}: {arm} / {baseline} = {ratio:.2f} ({diff:+.1f}), p = {p:.4f} (paired t)")
    new = results["ramped + overlap"]
    seam, mid = statistics.fmean(r["seam"] for r in new), statistics.fmean(r["mid"] for r in new)
    bound = max(2 * mid, mid + 5)
    print(f"target: seam windows <= max(2 x mid-epoch, mid-epoch + 5) = {bound:.1f}%: "
          f"{'met' if seam <= bound else 'NOT met'} ({seam:.1f}%)")


if __name__ == "__main__":
    main()
