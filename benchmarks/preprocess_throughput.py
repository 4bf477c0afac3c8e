"""Preprocessing throughput, and the training-read speed-up it buys, measured in one run.

1. The preprocessing job (pipeline.preprocess.job.run, real local Ray) on generated 1280x720 H.264
   originals: videos/s and videos/s per core for inspect-only and for transcode to short side 320,
   with 1 and 2 Ray workers.
2. What training gains: decord clips/s (open the video from bytes, decode one 16-frame clip at
   stride 4, as the pretraining data path does) on the same clips of the originals and of their
   320-short-side outputs. The ratio is the speed-up.

    python benchmarks/preprocess_throughput.py            # ~1 minute on 2 cores (measured 43 s, quiet)
    python benchmarks/preprocess_throughput.py --quick    # fewer, shorter videos
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.preprocess.job import PreprocessConfig, run  # noqa: E402

CLIP_FRAMES, STRIDE = 16, 4


def write_original(
    path: Path, frames: int, rng: np.random.Generator, size=(720, 1280), fps: int = 30
) -> None:
    """A camera-like 720p video: smooth textured background panning, a moving object, sensor noise.

    Encoded as uploads usually are (x264 "veryfast", default keyframe interval of 250 frames)."""
    h, w = size
    width = w + 4 * frames
    coarse = (rng.random((h // 24, width // 24, 3)) * 255).astype(np.uint8)
    background = av.VideoFrame.from_ndarray(coarse, format="rgb24")
    background = background.reformat(width=width, height=h, interpolation="BICUBIC").to_ndarray()
    noise = rng.integers(-6, 7, (4, h, w, 3), dtype=np.int16)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = background[:, 4 * i : 4 * i + w].copy()
            y, x = (h // 3 + int(80 * np.sin(i / 9))), (i * 11) % (w - 120)
            img[y : y + 120, x : x + 120] = (240, 60, 30)
            img = np.clip(img.astype(np.int16) + noise[i % len(noise)], 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))


def clips_per_second(paths: list[Path], starts: list[list[int]]) -> float:
    """Decode rate of one 16x4 clip per open, from bytes (one GET per video in training)."""
    blobs = [p.read_bytes() for p in paths]
    n, t0 = 0, time.perf_counter()
    for data, video_starts in zip(blobs, starts, strict=True):
        for start in video_starts:
            reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            reader.get_batch(list(range(start, start + CLIP_FRAMES * STRIDE, STRIDE))).asnumpy()
            n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter videos")
    parser.add_argument("--videos", type=int, help="number of 1280x720 originals (default 6, quick 4)")
    parser.add_argument(
        "--seconds", type=float, help="length of each original in seconds (default 4, quick 3)"
    )
    parser.add_argument(
        "--clips", type=int, default=3, help="random clips decoded per video for the read test"
    )
    args = parser.parse_args()
    n_videos = args.videos or (4 if args.quick else 6)
    n_frames = int(30 * (args.seconds or (3 if args.quick else 4)))
    logging.basicConfig(level=logging.WARNING)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        t0 = time.perf_counter()
        for i in range(n_videos):
            write_original(root / "raw" / f"video_{i:03d}.mp4", n_frames, rng)
        took = time.perf_counter() - t0
        print(f"generated {n_videos} originals, 1280x720, {n_frames} frames at 30 fps, in {took:.1f}s; "
              f"Ray with 2 CPUs; machine: {os.cpu_count()} cores")  # fmt: skip

        # Warm-up: start Ray's worker processes (and their video children) outside the measurements.
        warm_up = PreprocessConfig(str(root / "raw"), str(root / "warm-up"), transcode=False, workers=2)
        run(warm_up)
        results = []
        for transcode in (False, True):
            for workers in (1, 2):
                out = root / f"out-{'transcode' if transcode else 'inspect'}-{workers}"
                cfg = PreprocessConfig(input=str(root / "raw"), output=str(out), transcode=transcode,
                                       workers=workers, progress_s=1e9)  # fmt: skip
                report = run(cfg)
                assert report["ok"] == n_videos, report["status_counts"]
                results.append((transcode, workers, report))

        print()
        print(f"{'stage':<28}{'workers':>8}{'videos':>8}{'seconds':>9}{'videos/s':>10}{'videos/s/core':>15}")
        for transcode, workers, r in results:
            stage = "inspect + decode check" if not transcode else "transcode to 320p H.264"
            print(f"{stage:<28}{workers:>8}{r['processed']:>8}{r['seconds']:>9.2f}"
                  f"{r['videos_per_s']:>10.2f}{r['videos_per_s_per_worker']:>15.2f}")  # fmt: skip
        by = {(t, w): r for t, w, r in results}
        print(f"2 workers vs 1: inspect x{by[False, 2]['videos_per_s'] / by[False, 1]['videos_per_s']:.2f}, "
              f"transcode x{by[True, 2]['videos_per_s'] / by[True, 1]['videos_per_s']:.2f}")  # fmt: skip
        one = by[True, 1]
        print(f"transcode, 1 worker: {one['hours'] * 3600 / one['seconds']:.1f} s of video per second; "
              f"{one['bytes_in'] / 1e6:.1f} MB in -> {one['bytes_out'] / 1e6:.1f} MB out")  # fmt: skip

        originals = sorted((root / "raw").glob("*.mp4"))
        outputs = [root / "out-transcode-1" / p.name for p in originals]
        starts = [rng.integers(0, n_frames - CLIP_FRAMES * STRIDE, args.clips).tolist() for _ in originals]
        clips_per_second(outputs[:1], starts[:1])  # warm-up: decord's first open loads its codecs
        slow = clips_per_second(originals, starts)
        fast = clips_per_second(outputs, starts)
        print()
        print(f"{'training read (decord, 16 frames, stride 4)':<46}{'clips/s (1 core)':>18}")
        print(f"{'originals 1280x720':<46}{slow:>18.2f}")
        print(f"{'preprocessed 568x320':<46}{fast:>18.2f}")
        print(f"speed-up: x{fast / slow:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
