"""Generated, labeled sample datasets of real H.264 mp4 files, in two families.

**motion** (the demo's sample data): a drifting scene, class = motion only.

Each video is a camera pan over a random scene: a smooth colour texture with a few solid shapes painted
on it, tiled (it wraps around), moving as a whole in one of four directions (and with 8 classes, at one
of two speeds). Texture, shapes, colours and start position are random; only the motion decides the
label, so a model must look at time to classify it.

Why the whole scene moves (sample version 2): masked video modelling learns what reconstruction needs.
With one small shape gliding over a static background (version 1), most masked tubes are static and the
reconstruction loss is won on the background, so a VideoMAE encoder pretrained on it carried appearance
only (frozen-feature kNN at chance, docs/finetune_eval.md). When the content of every tube moves, filling
in a masked tube means carrying visible content along the motion, and the encoder's features come to
encode the motion: the pretraining then pays, measurably (benchmarks/sample_efficiency.py).

**appearance**: class = what the one object in view is. A real handwritten digit scan (scikit-learn's
1,797 8x8 scans, upsampled to a fifth of the frame side, in an ink that contrasts with what is behind it)
glides in a random direction at a random speed, bouncing off the frame's edges, over a static smooth
background. Motion, position, colours and background are drawn independently of the label, so only the
object's shape tells the classes apart, as in footage where a small object moves over a still scene. The
scans are split between train, val and test: a test video shows a scan the training never saw.

Interface (used by the demo jobs and tests)::

    make_dataset(root, videos_per_class=8, num_frames=32, size=(64, 64), seed=0, num_classes=8,
                 family="motion") -> root
    ensure_sample_dataset(cache_dir) -> root     # idempotent, safe if interrupted or run concurrently

Layout below ``root``::

    videos/<class_name>/<split>_<i>.mp4
    train.csv, val.csv, test.csv     VideoMAE CSV: "<path relative to root> <label id>" per line
    labels.json                      {"<class_name>": <label id>} (the SSv2 label-map shape)
    dataset.json                     generation parameters and recommended data settings

Horizontal flips turn "left" into "right": finetune on this data with ``DataSection(hflip=False)``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from fractions import Fraction

import av
import numpy as np

DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
SPEEDS = {"slow": 0.022, "fast": 0.06}  # fraction of the frame side moved per frame
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
SAMPLE_VERSION = 2
SAMPLE_DEFAULTS = {"videos_per_class": 100, "num_frames": 48, "size": (64, 64), "num_classes": 8, "seed": 0}
FAMILIES = ("motion", "appearance")
OBJECT_SIDE = 0.2  # the appearance family's object: a fifth of the frame's short side
OBJECT_SPEED = (0.01, 0.03)  # fraction of the frame side the object moves per frame


def class_names(num_classes: int, family: str = "motion") -> list[str]:
    """motion: 2 -> left/right, 4 -> four directions, 8 -> four directions x two speeds;
    appearance: 2 to 10 -> digit_0, digit_1, ..."""
    if family == "appearance":
        if not 2 <= num_classes <= 10:
            raise ValueError(f"the appearance family has 2 to 10 classes (digits), got {num_classes}")
        return [f"digit_{d}" for d in range(num_classes)]
    if family != "motion":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if num_classes == 2:
        return ["right", "left"]
    if num_classes == 4:
        return list(DIRECTIONS)
    if num_classes == 8:
        return [f"{d}_{s}" for s in SPEEDS for d in DIRECTIONS]
    raise ValueError(f"num_classes must be 2, 4 or 8, got {num_classes}")


def _motion(name: str) -> tuple[tuple[int, int], float]:
    direction, _, speed = name.partition("_")
    step = SPEEDS[speed] if speed else (SPEEDS["slow"] + SPEEDS["fast"]) / 2
    return DIRECTIONS[direction], step


def _shape_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random circle, square or triangle centred at the origin (wrapping), as a bool (H, W) mask."""
    r = rng.uniform(0.14, 0.22) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = np.where(yy > h / 2, yy - h, yy)  # centred at (0, 0) with wrap-around, rolled into place later
    xx = np.where(xx > w / 2, xx - w, xx)
    kind = rng.integers(3)
    if kind == 0:
        return yy**2 + xx**2 <= r**2
    if kind == 1:
        return (np.abs(yy) <= r) & (np.abs(xx) <= r)
    return (yy <= r * 0.8) & (yy >= -r) & (np.abs(xx) <= (yy + r) * 0.6)


def _smooth_texture(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float colour noise, bilinear between random colours on a grid of ``cell``-pixel cells;
    periodic, so the scene tiles seamlessly when it wraps."""
    gh, gw = max(2, h // cell), max(2, w // cell)
    grid = rng.uniform(0, 255, (gh, gw, 3)).astype(np.float32)
    ys, xs = np.arange(h) * gh / h, np.arange(w) * gw / w
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    y1, x1 = (y0 + 1) % gh, (x0 + 1) % gw
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def render_scene(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One random scene (H, W, 3) float: smooth texture (cells of a fifth to a third of the short side)
    with 3-6 solid shapes on it."""
    scene = _smooth_texture(h, w, int(rng.integers(min(h, w) // 5, min(h, w) // 3 + 1)), rng)
    for _ in range(int(rng.integers(3, 7))):
        mask = np.roll(_shape_mask(h, w, rng), (rng.integers(h), rng.integers(w)), (0, 1))
        scene = np.where(mask[..., None], rng.integers(0, 256, 3).astype(np.float32), scene)
    return scene


def render_video(name: str, num_frames: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one video of class ``name``: the scene pans the class's way."""
    h, w = size
    (dy, dx), speed = _motion(name)
    speed *= rng.uniform(0.85, 1.15)
    scene = np.clip(render_scene(h, w, rng), 0, 255).astype(np.uint8)
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for t in range(num_frames):
        oy, ox = int(round(y0 + dy * speed * h * t)), int(round(x0 + dx * speed * w * t))
        frames[t] = np.roll(scene, (oy, ox), (0, 1))
    return frames


def digit_scans(num_classes: int) -> dict[str, dict[int, np.ndarray]]:
    """Per split, per digit: the (N, 8, 8) float scans in [0, 1] of scikit-learn's digits, 70/15/15% of
    each digit's scans in a fixed order, so no scan appears in two splits."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    out: dict[str, dict[int, np.ndarray]] = {split: {} for split, _ in SPLITS}
    for d in range(num_classes):
        scans = digits.images[digits.target == d] / 16.0
        n_train = round(len(scans) * SPLITS[0][1])
        n_val = round(len(scans) * SPLITS[1][1])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, None)}
        for split, (lo, hi) in bounds.items():
            out[split][d] = scans[lo:hi]
    return out


def _upsample(image: np.ndarray, side: int) -> np.ndarray:
    """(h, w) float -> (side, side) by bilinear interpolation between pixel centres."""
    h, w = image.shape
    ys = np.clip((np.arange(side) + 0.5) * h / side - 0.5, 0, h - 1)
    xs = np.clip((np.arange(side) + 0.5) * w / side - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def render_object_video(
    scan: np.ndarray, num_frames: int, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: ``scan`` (8x8 in [0, 1], the ink's opacity) in one colour gliding over a
    static smooth background, bouncing off the edges."""
    h, w = size
    background = _smooth_texture(h, w, int(rng.integers(min(h, w) // 2, min(h, w) + 1)), rng)
    background = 64 + background / 2  # mid tones, so a dark or a light ink always stands out
    side = max(4, round(OBJECT_SIDE * min(h, w) * rng.uniform(0.9, 1.1)))
    alpha = _upsample(scan, side)[..., None]
    ink = np.where(rng.random() < 0.5, rng.uniform(0, 40, 3), rng.uniform(215, 255, 3)).astype(np.float32)
    angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(*OBJECT_SPEED) * min(h, w)
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    y, x = rng.uniform(0, h - side), rng.uniform(0, w - side)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for t in range(num_frames):
        top, left = int(round(y)), int(round(x))
        frame = background.copy()
        patch = frame[top : top + side, left : left + side]
        frame[top : top + side, left : left + side] = patch * (1 - alpha) + ink * alpha
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
        y, x = y + vy, x + vx
        if not 0 <= y <= h - side:  # bounce: reflect the position back inside and reverse
            y, vy = float(np.clip(-y if y < 0 else 2 * (h - side) - y, 0, h - side)), -vy
        if not 0 <= x <= w - side:
            x, vx = float(np.clip(-x if x < 0 else 2 * (w - side) - x, 0, w - side)), -vx
    return frames


def write_mp4(path: str, frames: np.ndarray, fps: int = 25, crf: int = 20) -> None:
    """Encode (T, H, W, 3) uint8 frames as H.264 (yuv420p, even sizes) with PyAV."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {h}x{w}")
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_dataset(
    root: str,
    videos_per_class: int = 8,
    num_frames: int = 32,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    num_classes: int = 8,
    fps: int = 25,
    family: str = "motion",
) -> str:
    """Write the videos, the three split manifests and the label map below local folder ``root``."""
    names = class_names(num_classes, family)
    scans = digit_scans(num_classes) if family == "appearance" else {}
    rng = np.random.default_rng(seed)
    manifests: dict[str, list[str]] = {split: [] for split, _ in SPLITS}
    for label, name in enumerate(names):
        os.makedirs(os.path.join(root, "videos", name), exist_ok=True)
        n_val = max(1, round(videos_per_class * SPLITS[1][1])) if videos_per_class >= 3 else 0
        n_test = n_val
        n_train = videos_per_class - n_val - n_test
        splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
        for i, split in enumerate(splits):
            rel = f"videos/{name}/{split}_{i:04d}.mp4"
            if family == "appearance":
                pool = scans[split][label]
                frames = render_object_video(pool[rng.integers(len(pool))], num_frames, size, rng)
            else:
                frames = render_video(name, num_frames, size, rng)
            write_mp4(os.path.join(root, rel), frames, fps)
            manifests[split].append(f"{rel} {label}")
    for split, lines in manifests.items():
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("".join(line + "\n" for line in lines))
    with open(os.path.join(root, "labels.json"), "w") as f:
        json.dump({name: i for i, name in enumerate(names)}, f, indent=1)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        info = {
            "version": SAMPLE_VERSION,
            "videos_per_class": videos_per_class,
            "num_frames": num_frames,
            "size": list(size),
            "seed": seed,
            "num_classes": num_classes,
            "fps": fps,
            "family": family,
            "recommended": {"hflip": False},
        }
        json.dump(info, f, indent=1)
    return root


def ensure_sample_dataset(cache_dir: str, **overrides) -> str:
    """The demo dataset under ``cache_dir``, generated on first use (a few seconds).

    Idempotent and safe if interrupted or raced: it is written to a temporary sibling and renamed into
    place only when complete, so a half-written dataset is never used.
    """
    params = {**SAMPLE_DEFAULTS, **overrides}
    h, w = params["size"]
    tag = (
        f"sample-v{SAMPLE_VERSION}-c{params['num_classes']}-n{params['videos_per_class']}"
        f"-t{params['num_frames']}-{h}x{w}-s{params['seed']}"
    )
    root = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), tag)
    if os.path.exists(os.path.join(root, "dataset.json")):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        make_dataset(tmp, **params)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.exists(os.path.join(root, "dataset.json")):
                raise  # someone else's rename did not win either: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
