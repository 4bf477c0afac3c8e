"""The generated sample dataset: real H.264 files, split manifests, and labels given by motion alone."""

from __future__ import annotations

import json
import os

import decord
import numpy as np

from pipeline.data.manifest import read_label_map, read_manifest
from pipeline.data.synthetic import class_names, ensure_sample_dataset


def motion(frames: np.ndarray, step: int = 4) -> tuple[float, float]:
    """Mean (dy, dx) per frame of what moves, by phase correlation of successive frame differences
    (the static background cancels in the differences; shapes wrap around, so shifts are circular)."""
    gray = frames.astype(np.float32).mean(-1)
    diffs = gray[1:] - gray[:-1]
    h, w = gray.shape[1:]
    shifts = []
    for t in range(0, len(diffs) - step, step):
        spec = np.fft.fft2(diffs[t + step]) * np.conj(np.fft.fft2(diffs[t]))
        corr = np.fft.ifft2(spec / (np.abs(spec) + 1e-6)).real
        dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
        shifts.append(((dy + h // 2) % h - h // 2, (dx + w // 2) % w - w // 2))
    dy, dx = np.median(np.array(shifts), axis=0)
    return dy / step, dx / step


def test_files_manifests_and_labels(sample_videos):
    names = class_names(8)
    assert read_label_map(str(sample_videos / "labels.json")) == {n: i for i, n in enumerate(names)}
    counts = {
        split: len(read_manifest(str(sample_videos), split=split)) for split in ("train", "val", "test")
    }
    assert counts == {"train": 8, "val": 8, "test": 8}
    info = json.loads((sample_videos / "dataset.json").read_text())
    assert info["recommended"] == {"hflip": False}
    reader = decord.VideoReader(str(sample_videos / "videos" / names[0] / "train_0000.mp4"))
    assert len(reader) == 24 and reader[0].shape == (48, 64, 3)


def test_the_label_is_the_motion(sample_videos):
    """Each video's measured motion points the way its class says, and fast classes move faster."""
    directions = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
    speeds = {}
    for row in read_manifest(str(sample_videos / "train.csv")) + read_manifest(
        str(sample_videos / "test.csv")
    ):
        name = os.path.basename(os.path.dirname(row["path"]))
        frames = decord.VideoReader(row["path"]).get_batch(list(range(24))).asnumpy()
        dy, dx = motion(frames)
        want = directions[name.split("_")[0]]
        assert np.sign(dy) == want[0] and np.sign(dx) == want[1], (name, dy, dx)
        speeds.setdefault(name.split("_")[1], []).append(abs(dy) + abs(dx))
    assert max(speeds["slow"]) * 1.5 < min(speeds["fast"])


def test_ensure_sample_dataset_is_idempotent_and_ignores_interrupted_runs(tmp_path):
    small = dict(videos_per_class=3, num_frames=8, size=(32, 32), num_classes=2)
    root = ensure_sample_dataset(str(tmp_path), **small)
    os.makedirs(root + ".tmp-deadbeef")  # what an interrupted generation leaves behind
    stamp = os.path.getmtime(os.path.join(root, "dataset.json"))
    assert ensure_sample_dataset(str(tmp_path), **small) == root
    assert os.path.getmtime(os.path.join(root, "dataset.json")) == stamp
    rows = read_manifest(root, split="train")
    assert {r["label"] for r in rows} == {0, 1} and all(os.path.exists(r["path"]) for r in rows)


def test_the_appearance_family_is_a_digit_moving_over_a_still_background(tmp_path):
    """Class = the digit: real scans (none shared between splits) in a small object that moves, bounces
    inside the frame, over a background that does not change; the motion says nothing of the label."""
    import pytest

    from pipeline.data.synthetic import OBJECT_SIDE, digit_scans, make_dataset

    with pytest.raises(ValueError, match="2 to 10 classes"):
        class_names(11, "appearance")
    scans = digit_scans(10)
    for digit in range(10):
        split_sets = [{s.tobytes() for s in scans[split][digit]} for split in ("train", "val", "test")]
        assert all(split_sets) and not (split_sets[0] & split_sets[1] or split_sets[0] & split_sets[2]
                                        or split_sets[1] & split_sets[2])
    root = make_dataset(str(tmp_path), videos_per_class=4, num_frames=24, size=(64, 64), seed=3,
                        num_classes=3, family="appearance")
    assert read_label_map(os.path.join(root, "labels.json")) == {"digit_0": 0, "digit_1": 1, "digit_2": 2}
    assert json.loads((tmp_path / "dataset.json").read_text())["family"] == "appearance"
    directions = []
    for row in read_manifest(os.path.join(root, "train.csv")):
        frames = decord.VideoReader(row["path"]).get_batch(list(range(24))).asnumpy().astype(np.float32)
        changed = np.abs(frames - np.median(frames, axis=0)).max(-1) > 40  # the object, wherever it is
        area = changed.sum((1, 2))
        side = OBJECT_SIDE * 64
        assert (area > 0).all() and area.max() < 1.3 * side * side  # one small object, in every frame
        ys, xs = zip(*(np.argwhere(c).mean(0) for c in changed), strict=True)
        assert max(np.ptp(ys), np.ptp(xs)) > 3  # it moves
        directions.append((np.sign(ys[-1] - ys[0]), np.sign(xs[-1] - xs[0]), row["label"]))
    # the background stays: pixels the object never covers are the same in the first and last frame
    still = ~changed.any(0)
    assert np.abs(frames[0][still] - frames[-1][still]).mean() < 4  # H.264 noise only
    assert len({d[:2] for d in directions}) > 1  # not one direction for every video
