import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.eval.metrics import (
    ViewAccumulator,
    confusion_matrix,
    evaluate_scores,
    per_class_accuracy,
    topk_accuracy,
)
from pipeline.eval.report import confusion_matrix_png, parquet_bytes, predictions_table, report_json

NAMES = ["left", "right", "up"]


def test_views_are_averaged_per_video_in_any_order():
    acc = ViewAccumulator(3)
    # video a: two views that disagree; their mean decides. video b: one confident view.
    acc.add(["a", "b"], np.array([0, 2]), np.array([[0.6, 0.4, 0.0], [0.0, 0.1, 0.9]]))
    acc.add(["a"], np.array([0]), np.array([[0.2, 0.7, 0.1]]))
    scores = acc.result()
    assert scores.videos == ["a", "b"]
    assert scores.num_views.tolist() == [2, 1]
    assert scores.probs[0] == pytest.approx([0.4, 0.55, 0.05])
    assert scores.labels.tolist() == [0, 2]


def test_conflicting_labels_for_one_video_are_rejected():
    acc = ViewAccumulator(3)
    acc.add(["a"], np.array([0]), np.ones((1, 3)) / 3)
    with pytest.raises(ValueError, match="different labels"):
        acc.add(["a"], np.array([1]), np.ones((1, 3)) / 3)


def test_one_file_listed_with_several_windows_is_several_videos():
    """A manifest may list one file with different start/end windows (and labels): the views are grouped by
    manifest row, not by path, so neither merges nor clashes."""
    acc = ViewAccumulator(2)
    acc.add(["long.mp4", "long.mp4", "long.mp4"], np.array([0, 1, 0]),
            np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), rows=np.array([0, 1, 0]))
    scores = acc.result()
    assert scores.videos == ["long.mp4", "long.mp4"] and scores.labels.tolist() == [0, 1]
    assert scores.num_views.tolist() == [2, 1]
    np.testing.assert_allclose(scores.probs, [[0.8, 0.2], [0.2, 0.8]])


def test_topk_and_per_class_accuracy():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 1, 1])
    assert topk_accuracy(probs, labels, 1) == pytest.approx(0.75)
    assert topk_accuracy(probs, labels, 2) == pytest.approx(1.0)
    assert topk_accuracy(probs, labels, 5) == pytest.approx(1.0)  # k capped at the class count
    cm = confusion_matrix(labels, probs.argmax(1), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 2, 1], [0, 0, 0]]
    per_class = per_class_accuracy(cm)
    assert per_class[0] == 1.0 and per_class[1] == pytest.approx(2 / 3) and np.isnan(per_class[2])


def test_report_names_empty_classes_and_short_videos_as_gaps():
    acc = ViewAccumulator(3)
    acc.add(["a", "a", "b"], np.array([0, 0, 1]), np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]))
    report = evaluate_scores(acc.result(), NAMES, views_per_video=2, expected_videos=3)
    assert report.top1 == 1.0 and report.mean_class_accuracy == 1.0
    assert any("no examples: up" in g for g in report.gaps)
    assert any("1 videos were scored on fewer than 2 views" in g for g in report.gaps)
    assert any("1 of 3 videos produced no view" in g for g in report.gaps)
    assert "class_acc/up" not in report.metrics() and report.metrics()["class_acc/left"] == 1.0
    assert "no examples" in report.summary()
    assert json.loads(report_json(report))["per_class"]["up"] is None


def test_empty_evaluation_reports_instead_of_crashing():
    report = evaluate_scores(ViewAccumulator(3).result(), NAMES, views_per_video=1, expected_videos=2)
    assert report.num_videos == 0 and np.isnan(report.top1)
    assert json.loads(report_json(report))["top1"] is None
    assert predictions_table(ViewAccumulator(3).result(), NAMES).num_rows == 0


def test_predictions_parquet_and_confusion_png():
    acc = ViewAccumulator(3)
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]])
    acc.add(["s3://b/v1.mp4", "s3://b/v2.mp4"], np.array([0, 2]), probs)
    scores = acc.result()
    table = pq.read_table(io.BytesIO(parquet_bytes(predictions_table(scores, NAMES))))
    rows = table.to_pylist()
    assert rows[0]["path"] == "s3://b/v1.mp4" and rows[0]["correct"]
    assert rows[1]["top5_classes"] == ["left", "up", "right"] and not rows[1]["correct"]
    assert rows[1]["top5_scores"] == pytest.approx([0.5, 0.4, 0.1])
    assert rows[1]["label_name"] == "up"
    png = confusion_matrix_png(confusion_matrix(scores.labels, scores.probs.argmax(1), 3), NAMES)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > 200
