"""Video-level metrics from view-level predictions: aggregation, top-k, per-class accuracy, confusion.

Multi-view testing scores each (temporal clip x spatial crop) view separately; a video's score is the
mean of its views' softmax probabilities, as the original VideoMAE evaluation does. Views arrive in any
order from distributed workers, so they are summed per video as they stream in (memory: one row of K
floats per video, not per view).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class ViewAccumulator:
    """Running per-video sums of view probabilities; ``add`` batches in any order, then ``result``.

    A video is its manifest row when the views carry one (``video_row``), else its path: a manifest may
    list one file several times with different start / end windows, and each is a video of its own."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._index: dict[tuple[int, str], int] = {}
        self._videos: list[str] = []
        self._labels: list[int] = []
        self._sums: list[np.ndarray] = []
        self._views: list[int] = []

    def add(self, videos: list[str], labels: np.ndarray, probs: np.ndarray,
            rows: np.ndarray | None = None) -> None:
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"expected view probabilities (N, {self.num_classes}), got {probs.shape}")
        keys = [-1] * len(videos) if rows is None else [int(r) for r in rows]
        for video, row, label, p in zip(videos, keys, labels, probs, strict=True):
            i = self._index.get((row, video))
            if i is None:
                self._index[(row, video)] = i = len(self._labels)
                self._videos.append(video)
                self._labels.append(int(label))
                self._sums.append(np.zeros(self.num_classes, np.float64))
                self._views.append(0)
            elif self._labels[i] != int(label):
                raise ValueError(
                    f"video {video!r} has views with different labels ({self._labels[i]}, {label})"
                )
            self._sums[i] += p
            self._views[i] += 1

    def result(self) -> VideoScores:
        if not self._labels:
            empty = np.zeros(0, np.int64)
            return VideoScores([], empty, np.zeros((0, self.num_classes)), empty)
        views = np.asarray(self._views)
        return VideoScores(
            videos=list(self._videos),
            labels=np.asarray(self._labels, np.int64),
            probs=np.stack(self._sums) / views[:, None],
            num_views=views,
        )


@dataclass
class VideoScores:
    """One row per video: its label, its mean view probabilities (V, K), how many views were scored."""

    videos: list[str]
    labels: np.ndarray
    probs: np.ndarray
    num_views: np.ndarray


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (k capped at the class count)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix; NaN for classes with no examples."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


@dataclass
class EvalReport:
    """Everything an evaluation reports; ``gaps`` lists what could not be measured, in words."""

    num_videos: int
    top1: float
    top5: float
    mean_class_accuracy: float
    per_class: dict[str, float]
    confusion: np.ndarray
    class_names: list[str]
    views_per_video: int
    gaps: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow (per-class keys are sanitised class names)."""
        out = {
            "top1": self.top1,
            "top5": self.top5,
            "mean_class_accuracy": self.mean_class_accuracy,
            "num_videos": float(self.num_videos),
        }
        for name, acc in self.per_class.items():
            if not np.isnan(acc):
                out[f"class_acc/{_metric_safe(name)}"] = acc
        return out

    def summary(self) -> str:
        lines = [
            f"videos: {self.num_videos}  views/video: {self.views_per_video}",
            f"top-1: {100 * self.top1:.2f}%  top-5: {100 * self.top5:.2f}%  "
            f"mean class accuracy: {100 * self.mean_class_accuracy:.2f}%",
        ]
        width = max((len(n) for n in self.class_names), default=5)
        for name in self.class_names:
            acc = self.per_class[name]
            lines.append(f"  {name:<{width}}  " + ("no examples" if np.isnan(acc) else f"{100 * acc:6.2f}%"))
        lines += [f"GAP: {gap}" for gap in self.gaps]
        return "\n".join(lines)


def _metric_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def evaluate_scores(
    scores: VideoScores, class_names: list[str], views_per_video: int, expected_videos: int | None = None
) -> EvalReport:
    """Video-level report; classes without examples and videos with missing views become ``gaps``."""
    num_classes = len(class_names)
    preds = scores.probs.argmax(axis=1) if len(scores.labels) else np.zeros(0, np.int64)
    cm = confusion_matrix(scores.labels, preds, num_classes)
    per_class = per_class_accuracy(cm)
    gaps = []
    empty = [class_names[i] for i in np.flatnonzero(cm.sum(axis=1) == 0)]
    if empty:
        gaps.append(
            f"{len(empty)} of {num_classes} classes have no examples: {', '.join(empty[:20])}"
            + (" ..." if len(empty) > 20 else "")
        )
    short = int((scores.num_views < views_per_video).sum())
    if short:
        gaps.append(f"{short} videos were scored on fewer than {views_per_video} views (unreadable frames)")
    if expected_videos is not None and expected_videos > len(scores.labels):
        missing = expected_videos - len(scores.labels)
        gaps.append(
            f"{missing} of {expected_videos} videos produced no view at all (unreadable) and are "
            "not in the metrics"
        )
    measured = per_class[~np.isnan(per_class)]
    return EvalReport(
        num_videos=len(scores.labels),
        top1=topk_accuracy(scores.probs, scores.labels, 1),
        top5=topk_accuracy(scores.probs, scores.labels, 5),
        mean_class_accuracy=float(measured.mean()) if measured.size else float("nan"),
        per_class={name: float(acc) for name, acc in zip(class_names, per_class, strict=True)},
        confusion=cm,
        class_names=list(class_names),
        views_per_video=views_per_video,
        gaps=gaps,
    )
