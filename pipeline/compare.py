"""Compare MLflow runs: what differed in their configs, where they ended, how their curves went.

Runs are picked by id, by experiment name and/or by tag (``key=value``), so "every finetune of the
ablation", "these three run ids" and "everything in experiment X" are one command each. The output is
a terminal table (config params that differ, then final metrics), a PNG with each chosen metric's
history overlaid per run, and the same two logged as artifacts of a new MLflow run tagged as a
comparison (so a comparison is itself findable and shareable).
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from mlflow.entities import Run as MlflowRun  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import tracking  # noqa: E402

COMPARE_JOB = "compare"
DEFAULT_CURVES = r"(loss|top1|top5|acc)"  # metric names plotted when none are asked for
MAX_CELL = 36


class CompareError(ValueError):
    """Nothing (or not enough) to compare; the message says what was looked for."""


@dataclass
class Comparison:
    runs: list[MlflowRun]
    labels: list[str]
    param_diffs: dict[str, list[str | None]]  # param -> value per run (None: not set in that run)
    identical_params: int
    final_metrics: dict[str, list[float | None]]
    curves: dict[str, list[list[tuple[int, float]]]] = field(default_factory=dict)  # metric -> per run

    def table(self) -> str:
        """The terminal table: differing config values, then final metrics, one column per run."""
        header = ["", *self.labels]
        rows: list[list[str]] = []
        if self.param_diffs:
            rows.append(
                [f"config ({len(self.param_diffs)} differ, {self.identical_params} identical)"]
                + [""] * len(self.labels)
            )
            rows += [[f"  {k}", *(_cell(v) for v in vals)] for k, vals in sorted(self.param_diffs.items())]
        else:
            rows.append([f"config: all {self.identical_params} params identical"] + [""] * len(self.labels))
        if self.final_metrics:
            rows.append(["final metrics"] + [""] * len(self.labels))
            rows += [
                [f"  {k}", *(_metric_cell(v) for v in vals)] for k, vals in sorted(self.final_metrics.items())
            ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])

    def to_json(self) -> str:
        return json.dumps(
            {
                "runs": [
                    {"run_id": r.info.run_id, "label": lab, "experiment_id": r.info.experiment_id}
                    for r, lab in zip(self.runs, self.labels, strict=True)
                ],
                "param_diffs": self.param_diffs,
                "identical_params": self.identical_params,
                "final_metrics": self.final_metrics,
            },
            indent=1,
        )


def _cell(value: str | None) -> str:
    if value is None:
        return "-"
    return value if len(value) <= MAX_CELL else value[: MAX_CELL - 3] + "..."


def _metric_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def select_runs(
    client: MlflowClient,
    run_ids: Sequence[str] = (),
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    max_runs: int = 20,
) -> list[MlflowRun]:
    """Runs by id, plus runs of the named experiments (all when none named and tags given) matching
    every tag. Earlier comparison runs are left out. Fails clearly when an id or experiment is unknown."""
    runs: list[MlflowRun] = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except Exception as e:  # noqa: BLE001 - mlflow raises MlflowException/RestException variants
            raise CompareError(f"no MLflow run with id {run_id!r} at {client.tracking_uri}: {e}") from e
    if experiments or tags:
        exp_ids = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = [e.name for e in client.search_experiments()]
                raise CompareError(
                    f"no MLflow experiment named {name!r}; known: {', '.join(known) or 'none'}"
                )
            exp_ids.append(exp.experiment_id)
        if not exp_ids:
            exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        query = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in (tags or {}).items())
        found = client.search_runs(
            exp_ids, filter_string=query, max_results=max_runs + 50, order_by=["attributes.start_time ASC"]
        )
        runs += [r for r in found if r.data.tags.get(tracking.JOB_TAG) != COMPARE_JOB]
    unique = list({r.info.run_id: r for r in runs}.values())
    if len(unique) > max_runs:
        raise CompareError(f"{len(unique)} runs match; narrow the selection or raise max_runs ({max_runs})")
    if len(unique) < 1:
        wanted = {"ids": list(run_ids), "experiments": list(experiments), "tags": dict(tags or {})}
        raise CompareError(f"no runs match {wanted} at {client.tracking_uri}")
    return unique


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def run_label(run: MlflowRun) -> str:
    name = run.info.run_name or run.data.tags.get(tracking.RUN_NAME_TAG) or "run"
    return f"{name} ({run.info.run_id[:6]})"


def diff_params(runs: Sequence[MlflowRun]) -> tuple[dict[str, list[str | None]], int]:
    """Params whose values differ between runs (missing counts as different), and how many agree."""
    keys = sorted({k for r in runs for k in r.data.params})
    diffs, same = {}, 0
    for key in keys:
        values = [r.data.params.get(key) for r in runs]
        if len(set(values)) > 1:
            diffs[key] = values
        else:
            same += 1
    return diffs, same


def build_comparison(
    client: MlflowClient,
    runs: Sequence[MlflowRun],
    curve_pattern: str = DEFAULT_CURVES,
    metrics: Sequence[str] = (),
) -> Comparison:
    """Gather params, final metrics and the histories of ``metrics`` (default: names matching
    ``curve_pattern``, e.g. loss and accuracy) for ``runs``."""
    labels = [run_label(r) for r in runs]
    diffs, same = diff_params(runs)
    metric_keys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    finals = {k: [r.data.metrics.get(k) for r in runs] for k in metric_keys}
    wanted = list(metrics) or [k for k in metric_keys if re.search(curve_pattern, k)]
    missing = [k for k in wanted if k not in metric_keys]
    if missing:
        raise CompareError(f"metrics {missing} were not logged by any of the runs; logged: {metric_keys}")
    curves = {}
    for key in wanted:
        histories = []
        for r in runs:
            points = client.get_metric_history(r.info.run_id, key) if key in r.data.metrics else []
            histories.append(sorted((m.step, m.value) for m in points))
        curves[key] = histories
    return Comparison(list(runs), labels, diffs, same, finals, curves)


def curves_png(comparison: Comparison) -> bytes:
    """One panel per metric, one line per run, x = step."""
    keys = list(comparison.curves)
    if not keys:
        raise CompareError("no loss or accuracy metric to plot; pass metric names explicitly")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, points in zip(comparison.labels, comparison.curves[key], strict=True):
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=label, marker="o" if len(points) < 15 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(names) // 4), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def log_comparison(comparison: Comparison, tracking_uri: str, experiment: str, png: bytes | None) -> str:
    """A new MLflow run holding the table, the JSON and the curves PNG; returns its id."""
    compared = ",".join(r.info.run_id for r in comparison.runs)
    run = tracking.start_run(
        f"compare-{len(comparison.runs)}-runs",
        experiment,
        tracking_uri,
        job=COMPARE_JOB,
        resume=False,
        tags={"pipeline.compared_runs": compared},
    )
    try:
        run.log_text(comparison.table(), "comparison/table.txt")
        run.log_text(comparison.to_json(), "comparison/comparison.json")
        if png is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "curves.png"
                path.write_bytes(png)
                run.log_artifact(path, "comparison")
        run.end("FINISHED")
    except BaseException:
        run.end("FAILED")
        raise
    return run.run_id


def compare(
    run_ids: Sequence[str] = (),
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    metrics: Sequence[str] = (),
    tracking_uri: str | None = None,
    out_png: str | None = "comparison.png",
    log_experiment: str | None = "comparisons",
    max_runs: int = 20,
) -> tuple[Comparison, str | None]:
    """The whole comparison: select, print-ready table, PNG written to ``out_png`` (if given) and logged
    to a new run in ``log_experiment`` (if given). Returns the comparison and the logged run id."""
    uri = tracking_uri or tracking.default_tracking_uri()
    client = MlflowClient(uri)
    runs = select_runs(client, run_ids, experiments, tags, max_runs=max_runs)
    comparison = build_comparison(client, runs, metrics=metrics)
    png = curves_png(comparison) if comparison.curves else None
    if png is not None and out_png:
        Path(out_png).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(out_png).expanduser().write_bytes(png)
    logged = log_comparison(comparison, uri, log_experiment, png) if log_experiment else None
    return comparison, logged
