"""Does the pretraining pay? VideoMAE-pretrained vs random init at the same label budget, over seeds.

With the real jobs (Ray Train, Ray Data, MLflow) on generated videos of two families
(pipeline/data/synthetic.py): **motion**, whose class is its motion alone (4 directions of a panning
scene), and **appearance**, whose class is what the one small object in view is (10 digits, real
handwritten scans, gliding over a static smooth background; the scans of the test videos are never seen
in training). For each family and seed:

1. pretrain the model on every train video of the dataset, labels unused;
2. frozen features: kNN and linear-probe top-1 on the test split, with ``--probe-per-class`` labeled
   train videos per class as the bank / the probe's training set: the pretrained encoder vs a random init
   of the same seed (jobs/probe.py);
3. finetuning on ``--labeled-per-class`` labeled videos per class, from the pretrained encoder and from
   scratch, each at every LR of ``--lrs``; each arm keeps the LR with the best *validation* top-1 (the
   test split is never used to choose), whose best-validation model is scored on the test split
   (jobs/evaluate.py, 2 clips per video);
4. the supervised ceiling: the same finetuning recipe and budget from scratch with *every* train label,
   so a task the model's geometry cannot learn shows as such.

The seeds draw the labeled subsets, the inits and the data order; within a seed the arms share all of
them. The table gives each arm's mean ± std over the seeds and a paired two-sided t-test of the
difference (df = seeds - 1). Targets (issue 12): kNN top-1 at least 15 points above random init and
finetuning at least 5 points above scratch, both with p < 0.05.

    python benchmarks/sample_efficiency.py                       # both families, 3 seeds each
    python benchmarks/sample_efficiency.py --quick               # 2 seeds, shorter: checks the wiring
    python benchmarks/sample_efficiency.py --families appearance --split val --arms probe \
        --set model.preset=small_cpu                             # choose settings on validation only

``--split val`` scores every arm on the validation split (settings are chosen there, never on test).
An appearance seed with every arm took 17-21 min on the 2-core development machine (docs/finetune_eval.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config as config_lib  # noqa: E402
from pipeline.data.synthetic import class_names, make_dataset  # noqa: E402
from pipeline.eval.evaluate import EvalConfig, run_evaluate  # noqa: E402
from pipeline.eval.probing import ProbeConfig, run_probe  # noqa: E402
from pipeline.train.finetune import FinetuneConfig, run_finetune  # noqa: E402
from pipeline.train.pretrain import PretrainConfig, run_pretrain  # noqa: E402

# Per family: classes, videos per class (70/15/15% train/val/test), frames per video, labeled videos per
# class for finetuning at the small label budget.
FAMILIES = {
    "motion": {"num_classes": 4, "videos_per_class": 200, "num_frames": 48, "labeled_per_class": 5},
    "appearance": {"num_classes": 10, "videos_per_class": 100, "num_frames": 32, "labeled_per_class": 10},
}


# --- statistics --------------------------------------------------------------------------------------------


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes' betacf)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * f / a


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired_t_test(treated: list[float], baseline: list[float]) -> tuple[float, float]:
    """(mean difference, two-sided p) of a paired t-test; p = 0 when every difference is equal and > 0,
    nan with one pair (no test)."""
    diffs = [t - b for t, b in zip(treated, baseline, strict=True)]
    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan
    sd = statistics.stdev(diffs)
    if sd == 0.0:
        return mean, (0.0 if mean != 0 else 1.0)
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    return mean, _betainc(df / 2, 0.5, df / (df + t * t))


# --- data ---------------------------------------------------------------------------------------------------


def labeled_subset(root: Path, out: Path, per_class: int, seed: int) -> Path:
    """A dataset folder whose train.csv holds ``per_class`` random train videos of each class (paths stay
    relative to ``root``: pass ``data.data_root=root``); val / test / labels are the full ones."""
    by_class: dict[str, list[str]] = {}
    for line in (root / "train.csv").read_text().splitlines():
        by_class.setdefault(line.rsplit(" ", 1)[1], []).append(line)
    rng = random.Random(seed)
    kept = [line for label in sorted(by_class) for line in rng.sample(by_class[label], per_class)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.csv").write_text("\n".join(kept) + "\n")
    for name in ("val.csv", "test.csv", "labels.json"):
        shutil.copy(root / name, out / name)
    return out


# --- one seed ----------------------------------------------------------------------------------------------


def finetune_and_evaluate(
    arm: str, init: str, data: Path, seed: int, args: argparse.Namespace, common: list[str]
) -> dict[str, float]:
    """Finetune at every LR of the grid, keep the LR with the best validation top-1 (ties: the smaller),
    and score that run's best-validation model on ``args.split``."""
    tried = []
    model = [] if init else args.model_set  # a pretrained start brings its own geometry
    for lr in args.lrs:
        ft = run_finetune(
            config_lib.load(
                FinetuneConfig,
                "finetune_tiny_demo",
                [
                    f"run_name=finetune-{arm}-lr{lr:g}",
                    f"init_from={init}",
                    f"seed={seed}",
                    f"data.uri={data}",
                    f"optim.lr={lr}",
                    f"train.max_steps={args.finetune_steps}",
                    f"train.steps_per_epoch={args.finetune_steps // 5}",
                    f"optim.warmup_steps={args.finetune_steps // 10}",
                    "train.log_every_steps=100",
                    f"checkpoint.every_steps={args.finetune_steps}",
                    *model,
                    *args.finetune_set,
                    *common,
                ],
            )
        )
        tried.append((ft.best_val_top1 or 0.0, -lr, ft))
    val, neg_lr, best = max(tried, key=lambda t: t[:2])
    ev = run_evaluate(
        config_lib.load(
            EvalConfig,
            None,
            [
                f"run_name=evaluate-{arm}",
                f"model_uri={best.export_uri}",
                f"data.uri={data}",
                f"data.split={args.split}",
                "data.sampling_rate=2",
                "data.eval_num_clips=2",
                "data.eval_num_crops=1",
                "data.decode_isolation=inline",
                *common,
            ],
        )
    )
    return {f"finetune/{arm}": ev.report.top1, f"finetune_val/{arm}": val, f"finetune_lr/{arm}": -neg_lr}


def run_seed(seed: int, family: str, args: argparse.Namespace, root: Path, work: Path) -> dict[str, float]:
    """Every arm of one seed; returns their top-1 on ``args.split`` (and what was chosen on validation)."""
    tracking = [f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.system_metrics=false"]
    here = work / family / f"seed{seed}"
    common = [f"storage_path={here}", f"data.data_root={root}", *tracking]
    out: dict[str, float] = {}
    started = time.time()
    if {"probe", "finetune"} & set(args.arms):
        pre = run_pretrain(
            config_lib.load(
                PretrainConfig,
                "pretrain_tiny_demo",
                [
                    "run_name=pretrain",
                    f"seed={seed}",
                    f"storage_path={here}",
                    f"data.uri={root}",
                    f"train.max_steps={args.pretrain_steps}",
                    f"optim.warmup_steps={args.pretrain_steps // 10}",
                    f"optim.lr={args.pretrain_lr}",
                    "probe.every_steps=0",
                    "tracking.recon_every_steps=0",
                    f"checkpoint.every_steps={args.pretrain_steps}",
                    *args.model_set,
                    *args.set,
                    *tracking,
                ],
            )
        )
        out["pretrain/loss"] = float(pre.metrics.get("loss", math.nan))
        out["pretrain/minutes"] = (time.time() - started) / 60

    if "probe" in args.arms:
        probe_data = labeled_subset(root, here / "probe-labels", args.probe_per_class, seed)
        for arm, uri in (("pretrained", pre.export_uri), ("random", "")):
            probe = run_probe(
                config_lib.load(
                    ProbeConfig,
                    None,
                    [
                        f"run_name=probe-{arm}",
                        f"model_uri={uri}",
                        f"seed={seed}",
                        "model.preset=demo",
                        *args.model_set,
                        f"data.uri={probe_data}",
                        f"test_split={args.split}",
                        "data.decode_isolation=inline",
                        *common,
                    ],
                )
            )
            out[f"knn/{arm}"], out[f"linear/{arm}"] = probe.knn_top1, probe.linear_top1

    if "finetune" in args.arms:
        labeled = labeled_subset(root, here / "finetune-labels", args.labeled_per_class, seed)
        out.update(finetune_and_evaluate("pretrained", pre.export_uri, labeled, seed, args, common))
        out.update(finetune_and_evaluate("scratch", "", labeled, seed, args, common))
    if "ceiling" in args.arms:
        out.update(finetune_and_evaluate("ceiling", "", root, seed, args, common))
    out["minutes"] = (time.time() - started) / 60
    print(f"{family} seed {seed}: {json.dumps(out)}", flush=True)
    return out


# --- the table ---------------------------------------------------------------------------------------------


def _cell(values: list[float], width: int) -> str:
    """ "mean ± std", the mean right-aligned in ``width`` characters."""
    return f"{statistics.fmean(values):>{width}.1f} ± {_std(values):<5.1f}"


def report(family: str, args: argparse.Namespace, counts: dict[str, int], results: list[dict]) -> list[str]:
    """Print one family's table; returns its verdict lines."""
    spec = FAMILIES[family]
    chance = 100 / spec["num_classes"]
    minutes = sum(r["minutes"] for r in results)
    print(
        f"\n{family}: {spec['num_classes']} classes ({', '.join(class_names(spec['num_classes'], family))}; "
        f"chance {chance:.0f}%), {counts['train']} unlabeled train videos pretrained for "
        f"{args.pretrain_steps} steps; probes with {args.probe_per_class} labeled videos per class, "
        f"finetuning with {args.labeled_per_class} per class ({args.finetune_steps} steps per LR of "
        f"{args.lrs}, LR chosen on {counts['val']} val videos); scored on {counts[args.split]} "
        f"{args.split} videos; {len(results)} seed(s); {minutes:.1f} min"
        + (f"; settings {' '.join(args.model_set + args.set)}" if args.model_set + args.set else "")
    )
    header = (
        f"{'comparison':<36}{'VideoMAE pretrained':>22}{'baseline':>18}{'difference':>14}{'p (paired t)':>14}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for metric, baseline, name, target in (
        ("knn", "random", "kNN top-1 vs random init", 15.0),
        ("linear", "random", "linear probe vs random init", None),
        ("finetune", "scratch", f"finetuning ({args.labeled_per_class}/class) vs scratch", 5.0),
    ):
        if f"{metric}/pretrained" not in results[0]:
            continue
        pre = [100 * r[f"{metric}/pretrained"] for r in results]
        base = [100 * r[f"{metric}/{baseline}"] for r in results]
        diff, p = paired_t_test(pre, base)
        print(f"{name:<36}{_cell(pre, 14)}{_cell(base, 10)}{diff:>+12.1f}  {p:>12.4f}")
        if target is not None:
            verdicts.append(
                f"{family}, {name}: {diff:+.1f} points (target >= +{target:.0f}), p = {p:.4f} (target < "
                "0.05): " + ("met" if diff >= target and p < 0.05 else "NOT met")
            )
    if "finetune/ceiling" in results[0]:
        ceiling = [100 * r["finetune/ceiling"] for r in results]
        name = f"supervised ceiling (all {counts['train']} labels)"
        print(f"{name:<36}{'':>22}{_cell(ceiling, 10)}")
    if "finetune_lr/pretrained" in results[0]:
        lrs = {arm: [r[f"finetune_lr/{arm}"] for r in results] for arm in ("pretrained", "scratch")}
        print(f"LRs chosen on validation, per seed: pretrained {lrs['pretrained']}, scratch {lrs['scratch']}")
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, shorter pretraining and finetuning")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=("probe", "finetune", "ceiling"),
        default=["probe", "finetune", "ceiling"],
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="where every arm is scored: val to choose settings, test for the figures",
    )
    parser.add_argument("--probe-per-class", type=int, default=50, help="labeled videos per class, probes")
    parser.add_argument(
        "--labeled-per-class",
        type=int,
        default=None,
        help="labeled videos per class, finetuning (default: the family's)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3, help="peak LR of the pretraining")
    parser.add_argument("--finetune-steps", type=int, default=300, help="per LR")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="finetuning LR grid")
    parser.add_argument(
        "--model-set",
        nargs="*",
        default=[],
        metavar="model.KEY=VALUE",
        help="model settings of every model trained from scratch (pretraining, random, scratch)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pretraining settings")
    parser.add_argument(
        "--finetune-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="finetuning settings (every finetuning arm)",
    )
    parser.add_argument("--workdir", default="runs/bench-sample-efficiency")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.pretrain_steps, args.finetune_steps = 2, 1500, 150
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    verdicts, saved = [], {"args": vars(args), "families": {}}
    for family in args.families:
        spec = dict(FAMILIES[family])
        labeled_per_class = spec.pop("labeled_per_class")
        family_args = argparse.Namespace(
            **{**vars(args), "labeled_per_class": args.labeled_per_class or labeled_per_class}
        )
        root = Path(
            make_dataset(str(work / family / "data"), size=(64, 64), seed=1234, family=family, **spec)
        )
        counts = {s: len((root / f"{s}.csv").read_text().splitlines()) for s in ("train", "val", "test")}
        results = [run_seed(seed, family, family_args, root, work) for seed in range(args.seeds)]
        saved["families"][family] = results
        verdicts += report(family, family_args, counts, results)
        (work / "result.json").write_text(json.dumps(saved, indent=1))
    print()
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
