"""Decoder speed: clips/s per core of every backend on the same clips, with the ratio to decord 0.6.0.

Videos: H.264 and AV1 at 320x240, 640x360 and 1280x720 (8 s at 25 fps, a keyframe every second, as
preprocessing writes them). Clips: 16 frames at stride 4, one and four per video (each its own random
start, the same starts for every backend). Every column decodes through the training path
(pipeline/data/decode.py ``decode_bytes``: header checks, the backend, exact frames), one thread, in its
own process; "per core" is clips per CPU-second of that process. ``auto (default)`` is ``data.decoder``'s
default with the decord module pyproject installs (decord2); the line below the table says which backends
it used.

decord 0.6.0 (the baseline) and decord2 install the same ``decord`` module, so each is installed into
its own folder under ``.cache/bench-decoders`` (pip, first run only) and measured in a process that
imports it from there. Target (issue 16): the default backend no slower than decord 0.6.0 on H.264 by more
than 5%, and AV1 decoding instead of failing.

    python benchmarks/decoders.py            # about 5 minutes here
    python benchmarks/decoders.py --quick    # 320x240 and 640x360 only, fewer videos
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-decoders"
PACKAGES = {"decord 0.6.0": "decord==0.6.0", "decord2": "decord2==3.4.0"}
SIZES = {"320x240": (240, 320), "640x360": (360, 640), "1280x720": (720, 1280)}
CODECS = {
    "h264": ("libx264", {"preset": "veryfast", "g": "25"}),
    "av1": ("libsvtav1", {"preset": "10", "g": "25"}),
}


def write_video(path: Path, codec: str, size: tuple[int, int], seconds: int = 8, fps: int = 25) -> Path:
    import av
    import numpy as np

    os.environ.setdefault("SVT_LOG", "1")
    h, w = size
    encoder, options = CODECS[codec]
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (h, w * 2, 3), np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream(encoder, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt, stream.options = w, h, "yuv420p", dict(options)
        for i in range(seconds * fps):
            x = (i * 4) % w
            out.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, x : x + w]), format="rgb24")
                )
            )
        out.mux(stream.encode(None))
    return path


def install(name: str) -> Path | None:
    """A folder holding the ``decord`` module of ``name`` (pip --target, once); None if pip cannot."""
    target = CACHE / name.replace(" ", "-")
    if (target / "decord").is_dir():
        return target
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               PACKAGES[name]]
    done = subprocess.run(command, capture_output=True, text=True)
    return target if done.returncode == 0 else None


WORKER = r"""
import json, sys, time, numpy as np
from pipeline.data.decode import DecodeSettings, decode_bytes
decoder, spec = sys.argv[1], json.loads(sys.argv[2])
settings = DecodeSettings(decoder=decoder)
results = {}
for video in spec["videos"]:
    data = open(video["path"], "rb").read()
    t0 = time.process_time()
    try:
        clips, used = 0, set()
        for starts in video["starts"]:
            sampler = lambda length, rng, starts=starts: [np.arange(s, s + 64, 4) for s in starts]
            decoded = decode_bytes(video["path"], data, sampler, 0, settings)
            clips += len(starts)
            used.add(decoded.backend)
        results[video["key"]] = {"clips": clips, "cpu_s": time.process_time() - t0, "backends": sorted(used)}
    except Exception as e:
        results[video["key"]] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
print(json.dumps(results))
"""


def measure(decoder: str, videos: list[dict], pythonpath: Path | None) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (pythonpath, REPO) if p), OMP_NUM_THREADS="1"
    )
    done = subprocess.run(
        [sys.executable, "-c", WORKER, decoder, json.dumps({"videos": videos})],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if done.returncode:
        return {v["key"]: {"error": done.stderr.strip().splitlines()[-1][:80]} for v in videos}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--videos", type=int, default=4, help="videos per (size, codec)")
    parser.add_argument("--rounds", type=int, default=8, help="opens per video, each with new clip starts")
    args = parser.parse_args()
    import numpy as np

    sizes = {k: v for k, v in SIZES.items() if not args.quick or k != "1280x720"}
    per_cell = 2 if args.quick else args.videos
    work = CACHE / "videos"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    groups: dict[tuple, list[dict]] = {}
    started = time.time()
    for size_name, size in sizes.items():
        for codec in CODECS:
            for i in range(per_cell):
                path = work / f"{codec}-{size_name}-{i}.mp4"
                if not path.exists():
                    write_video(path, codec, size)
                for clips in (1, 4):
                    starts = [rng.integers(0, 200 - 61, clips).tolist() for _ in range(args.rounds)]
                    groups.setdefault((size_name, codec, clips), []).append(
                        {"key": f"{path.name}:{clips}", "path": str(path), "starts": starts}
                    )
    videos = [v for group in groups.values() for v in group]
    columns: dict[str, dict] = {}
    for name in PACKAGES:
        target = install(name)
        columns[name] = measure("decord", videos, target) if target else {}
    for backend in ("pyav", "torchcodec"):
        columns[backend] = measure(backend, videos, None)
    # the default, data.decoder auto, with the decord module pyproject installs (decord2)
    columns["auto (default)"] = measure("auto", videos, install("decord2"))

    header = f"{'clips':<26}" + "".join(f"{name:>16}" for name in columns)
    print(
        f"\nclips/s per core (16 frames, stride 4; {per_cell} videos x {args.rounds} rounds per row); in "
        f"brackets: ratio to decord 0.6.0\n{header}\n{'-' * len(header)}"
    )
    table = {}
    for (size_name, codec, clips), group in groups.items():
        cells, base = [], None
        for name, results in columns.items():
            got = [results.get(v["key"], {"error": "not run"}) for v in group]
            if any("error" in g for g in got):
                err = next(g["error"] for g in got if "error" in g)
                cells.append("n/a" if err.startswith(("DecoderUnavailable", "not run")) else "fails")
                table[f"{size_name} {codec} x{clips} {name}"] = err
                continue
            rate = sum(g["clips"] for g in got) / sum(g["cpu_s"] for g in got)
            base = rate if name == "decord 0.6.0" else base
            ratio = f" ({rate / base:.2f}x)" if base and name != "decord 0.6.0" else "        "
            cells.append(f"{rate:7.1f}{ratio}")
            table[f"{size_name} {codec} x{clips} {name}"] = rate
        print(f"{size_name + ' ' + codec + f' {clips} clip(s)':<26}" + "".join(f"{c:>16}" for c in cells))
    def rate(codec: str, size: str, clips: int, column: str) -> float | None:
        value = table.get(f"{size} {codec} x{clips} {column}")
        return value if isinstance(value, float) else None

    cells_of = [(size, clips) for size in sizes for clips in (1, 4)]
    h264 = [rate("h264", *c, "auto (default)") / rate("h264", *c, "decord 0.6.0") for c in cells_of
            if rate("h264", *c, "auto (default)") and rate("h264", *c, "decord 0.6.0")]
    av1 = [rate("av1", *c, "auto (default)") is not None for c in cells_of]
    used = Counter(b for v in videos for b in columns["auto (default)"].get(v["key"], {}).get("backends", []))
    print(f"auto (default) read the videos with: {dict(used)}")
    if h264:
        print(f"default vs decord 0.6.0 on H.264: {min(h264):.2f}x to {max(h264):.2f}x (target: >= 0.95x); "
              f"AV1 rows the default decodes: {sum(av1)}/{len(av1)}")
    print(f"({(time.time() - started) / 60:.1f} min)")
    (CACHE / "result.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
