"""Compare MLflow runs: config differences and final metrics as a table, loss/accuracy curves as a PNG.

    python jobs/compare.py RUN_ID RUN_ID ...                 # these runs
    python jobs/compare.py --experiment finetune             # every run of an experiment
    python jobs/compare.py --tag pipeline.job=finetune --metric train/loss --metric val/top1

The tracking store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the jobs' local default
(``runs/mlflow.db``). The table and PNG are also logged to a new run in experiment ``comparisons``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.compare import CompareError, compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_ids", nargs="*", help="MLflow run ids")
    parser.add_argument("--experiment", action="append", default=[], help="experiment name (repeatable)")
    parser.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs with this tag (repeatable; all must match)",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        help="metric to plot (repeatable; default: every loss/accuracy metric)",
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default="comparison.png", help="where to write the curves PNG")
    parser.add_argument(
        "--log-experiment",
        default="comparisons",
        help="experiment to log the comparison to; '' to not log it",
    )
    parser.add_argument("--max-runs", type=int, default=20)
    args = parser.parse_args(argv)
    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--tag {item!r} is not of the form KEY=VALUE")
        tags[key] = value
    if not (args.run_ids or args.experiment or tags):
        parser.error("name runs to compare: run ids, --experiment or --tag")
    try:
        comparison, logged = compare(
            args.run_ids,
            args.experiment,
            tags,
            args.metric,
            args.tracking_uri,
            args.out or None,
            args.log_experiment or None,
            args.max_runs,
        )
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(comparison.table())
    if comparison.curves and args.out:
        print(f"\ncurves: {args.out}")
    if logged:
        print(f"logged to MLflow run {logged} (experiment {args.log_experiment!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
