"""Evaluation artefacts: the confusion-matrix picture, the predictions table, the metrics JSON."""

from __future__ import annotations

import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.eval.metrics import EvalReport, VideoScores  # noqa: E402


def confusion_matrix_png(cm: np.ndarray, class_names: list[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix (true class per row) with counts written in the cells."""
    k = len(class_names)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros(cm.shape, np.float64), where=support > 0)
    side = min(4 + 0.45 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(k)
    labels = class_names if k <= 60 else [""] * k
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} videos)")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def predictions_table(scores: VideoScores, class_names: list[str], k: int = 5) -> pa.Table:
    """One row per video: path, true label, the top-k classes with their scores, views, correctness."""
    k = min(k, len(class_names))
    order = (
        np.argsort(-scores.probs, axis=1, kind="stable")[:, :k]
        if len(scores.labels)
        else np.zeros((0, k), np.int64)
    )
    names = np.asarray(class_names, dtype=object)
    top_scores = np.take_along_axis(scores.probs, order, axis=1) if len(order) else np.zeros((0, k))
    return pa.table(
        {
            "path": pa.array(scores.videos, pa.string()),
            "label": pa.array(scores.labels, pa.int64()),
            "label_name": pa.array(names[scores.labels].tolist() if len(scores.labels) else [], pa.string()),
            "top5_ids": pa.array(order.tolist(), pa.list_(pa.int64())),
            "top5_classes": pa.array(names[order].tolist() if len(order) else [], pa.list_(pa.string())),
            "top5_scores": pa.array(top_scores.astype(np.float32).tolist(), pa.list_(pa.float32())),
            "num_views": pa.array(scores.num_views, pa.int64()),
            "correct": pa.array(order[:, 0] == scores.labels if len(order) else [], pa.bool_()),
        }
    )


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def report_json(report: EvalReport) -> str:
    """The report as strict JSON (NaN, i.e. "not measurable", becomes null)."""

    def num(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    body = {
        "num_videos": report.num_videos,
        "views_per_video": report.views_per_video,
        "top1": num(report.top1),
        "top5": num(report.top5),
        "mean_class_accuracy": num(report.mean_class_accuracy),
        "per_class": {n: num(a) for n, a in report.per_class.items()},
        "confusion": report.confusion.tolist(),
        "class_names": report.class_names,
        "gaps": report.gaps,
    }
    return json.dumps(body, indent=1, allow_nan=False)
