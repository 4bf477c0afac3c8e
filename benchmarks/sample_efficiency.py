"""VideoMAE's data-efficiency claim at small scale: finetuning from self-supervised pretraining vs from
scratch, with the same labeled budget, measured in the same run with the real jobs (Ray Train, Ray Data).

1. generate the sample dataset (motion classes) and a labeled subset: ``--labeled-per-class`` train videos
   per class (validation and test splits unchanged);
2. pretrain on *all* train videos, labels unused;
3. finetune twice on the labeled subset with identical settings: from the pretrained encoder, and from a
   random init (the baseline);
4. evaluate both on the held-out test split (multi-view) and print a table with the difference.

    python benchmarks/sample_efficiency.py            # about 10 minutes on a quiet 2-core machine
    python benchmarks/sample_efficiency.py --quick    # smaller and shorter (both arms stay at chance)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config as config_lib  # noqa: E402
from pipeline.config import PretrainConfig  # noqa: E402
from pipeline.data.synthetic import ensure_sample_dataset  # noqa: E402
from pipeline.eval.evaluate import load_config as load_eval  # noqa: E402
from pipeline.eval.evaluate import run_evaluate  # noqa: E402
from pipeline.train.finetune import load_config as load_finetune  # noqa: E402
from pipeline.train.finetune import run_finetune  # noqa: E402
from pipeline.train.trainer import run_pretrain  # noqa: E402


def labeled_subset(root: str, out: Path, per_class: int) -> Path:
    """A dataset folder whose train.csv keeps ``per_class`` videos of each class (paths stay relative to
    ``root``: pass ``data.data_root=root``); val/test/labels are the full ones."""
    out.mkdir(parents=True, exist_ok=True)
    kept: dict[str, int] = {}
    lines = []
    for line in Path(root, "train.csv").read_text().splitlines():
        label = line.rsplit(" ", 1)[1]
        if kept.get(label, 0) < per_class:
            kept[label] = kept.get(label, 0) + 1
            lines.append(line)
    (out / "train.csv").write_text("\n".join(lines) + "\n")
    for name in ("val.csv", "test.csv", "labels.json"):
        shutil.copy(Path(root, name), out / name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer videos and steps")
    parser.add_argument("--videos-per-class", type=int, default=150)
    parser.add_argument("--labeled-per-class", type=int, default=30)
    parser.add_argument("--pretrain-epochs", type=float, default=8)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--workdir", default="runs/bench-sample-efficiency")
    args = parser.parse_args()
    if args.quick:
        args.videos_per_class, args.labeled_per_class = 80, 20
        args.pretrain_epochs, args.finetune_steps = 4, 600
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    tracking = [f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.system_metrics=false"]
    root = ensure_sample_dataset(".cache/sample-data", videos_per_class=args.videos_per_class)
    subset = labeled_subset(root, work / "labeled", args.labeled_per_class)
    started = time.time()

    pre = run_pretrain(
        config_lib.load(
            PretrainConfig,
            "pretrain_tiny_demo",
            [
                "run_name=pretrain",
                f"storage_path={work}",
                f"data.uri={root}",
                f"train.epochs={args.pretrain_epochs}",
                "tracking.recon_every_steps=0",
                *tracking,
            ],
        )
    )
    pretrain_s = time.time() - started

    rows = []
    for name, init in (("VideoMAE pretrained", pre.export_uri), ("scratch", "")):
        t0 = time.time()
        ft = run_finetune(
            load_finetune(
                "finetune_tiny_demo",
                [
                    f"run_name=finetune-{'pre' if init else 'scratch'}",
                    f"storage_path={work}",
                    f"init_from={init}",
                    f"data.uri={subset}",
                    f"data.data_root={root}",
                    f"train.max_steps={args.finetune_steps}",
                    "train.epochs=1000",
                    "optim.warmup_steps=" + str(args.finetune_steps // 10),
                    *tracking,
                ],
            )
        )
        ev = run_evaluate(
            load_eval(
                None,
                [
                    f"run_name=evaluate-{'pre' if init else 'scratch'}",
                    f"storage_path={work}",
                    f"model_uri={ft.export_uri}",
                    f"data.uri={subset}",
                    f"data.data_root={root}",
                    "data.sampling_rate=4",
                    "data.decode_isolation=inline",
                    *tracking,
                ],
            )
        )
        rows.append((name, ft.best_val_top1 or 0.0, ev.report.top1, ev.report.top5, time.time() - t0))

    labeled = args.labeled_per_class * 8
    unlabeled = len(Path(root, "train.csv").read_text().splitlines())  # the train split, labels unused
    print(
        f"\nsample efficiency: {labeled} labeled train videos ({args.labeled_per_class}/class, 8 classes), "
        f"pretraining on {unlabeled} unlabeled videos ({args.pretrain_epochs} epochs, "
        f"{pretrain_s:.0f} s), {args.finetune_steps} finetuning steps each; test = held-out split, "
        f"2 clips x 3 crops. Chance = 12.5%."
    )
    print(f"{'init':<22}{'best val top-1':>16}{'test top-1':>12}{'test top-5':>12}{'time (s)':>10}")
    for name, val, top1, top5, secs in rows:
        print(f"{name:<22}{100 * val:>15.1f}%{100 * top1:>11.1f}%{100 * top5:>11.1f}%{secs:>10.0f}")
    (pre_top1, scratch_top1) = rows[0][2], rows[1][2]
    ratio = pre_top1 / scratch_top1 if scratch_top1 else float("inf")
    print(
        f"pretrained - scratch: {100 * (pre_top1 - scratch_top1):+.1f} points of test top-1 "
        f"(ratio {ratio:.2f}x)"
    )
    (work / "result.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
