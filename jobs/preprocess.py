"""Preprocess a video dataset once: inspect, check, transcode to a short side, write a Parquet manifest.

    python jobs/preprocess.py --input s3://bucket/raw-videos --output s3://bucket/videos-320
    ray job submit --working-dir . -- python jobs/preprocess.py --input ... --output ...

See docs/preprocessing.md for the manifest's columns, the annotation formats and resuming.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.data.shards import parse_size
from pipeline.preprocess.annotations import FORMATS, AnnotationError
from pipeline.preprocess.job import PreprocessConfig, run
from pipeline.storage import StorageError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the meaningless ones of flags and unset options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> tuple[PreprocessConfig, float]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    io_ = p.add_argument_group("input and output")
    io_.add_argument(
        "--input", required=True, help="folder or s3:// prefix holding the videos (searched recursively)"
    )
    io_.add_argument(
        "--output",
        required=True,
        help="folder or s3:// prefix for the videos, manifest.parquet and report.json",
    )
    io_.add_argument("--limit", type=int, help="only the first N videos (sorted by path): a trial run")
    v = p.add_argument_group("videos")
    v.add_argument(
        "--no-transcode",
        dest="transcode",
        action="store_false",
        help="inspect and check only; the manifest then points at the original files, except those the "
        "training decoder cannot read, which are transcoded",
    )
    v.add_argument(
        "--decoder",
        default="auto",
        choices=("auto", "decord", "pyav", "torchcodec"),
        help="the training data's data.decoder: every video the manifest marks ok opens with it",
    )
    v.add_argument(
        "--short-side", type=int, default=320, help="short side of the output in pixels (never upscaled)"
    )
    v.add_argument(
        "--crf", type=int, default=23, help="x264 constant rate factor: lower is better quality, bigger files"
    )
    v.add_argument("--preset", default="veryfast", help="x264 preset: slower presets make smaller files")
    v.add_argument(
        "--gop-seconds",
        type=float,
        default=1.0,
        help="keyframe interval in seconds: a random clip read decodes from the keyframe before it",
    )
    v.add_argument(
        "--max-pixels",
        type=int,
        help="refuse larger frames (default: 7680*4320 when transcoding, else the training decoder's limit)",
    )
    v.add_argument("--min-frames", type=int, default=2, help="refuse videos with fewer frames")
    v.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=600.0,
        help="seconds per video before its worker process is killed and the video marked 'timeout'",
    )
    s = p.add_argument_group("shards (WebDataset tars for streaming training)")
    s.add_argument(
        "--shards",
        action="store_true",
        help="also pack the ok videos into WebDataset tar shards (<output>/shards/<split>-NNNNNN.tar) with "
        "an index.parquet of each video's byte range",
    )
    s.add_argument(
        "--shard-size",
        dest="shard_bytes",
        type=parse_size,
        default="1GiB",
        metavar="SIZE",
        help="target size of one shard: 1GiB, 256MiB, 500MB or bytes",
    )
    a = p.add_argument_group("annotations (labels and splits into the manifest)")
    a.add_argument(
        "--annotations",
        action="append",
        default=[],
        metavar="URI",
        help="annotation file, or the split folder for ucf101/hmdb51; repeat for train/val/test files",
    )
    a.add_argument("--annotation-format", choices=FORMATS, default="auto", help="format of --annotations")
    a.add_argument("--labels", help="Something-Something V2 labels.json (class name -> index)")
    a.add_argument(
        "--split-index", type=int, default=1, choices=(1, 2, 3), help="UCF101 / HMDB51 split number"
    )
    r = p.add_argument_group("running")
    r.add_argument(
        "--workers", type=int, help="parallel worker processes (default: every CPU in the Ray cluster)"
    )
    r.add_argument(
        "--retry-failed",
        action="store_true",
        help="also redo videos that failed in an earlier run for a reason of the file itself",
    )
    r.add_argument(
        "--max-error-fraction",
        type=float,
        default=1.0,
        help="exit with status 3 when more than this fraction of the videos failed",
    )
    r.add_argument(
        "--progress-every", dest="progress_s", type=float, default=10.0, help="seconds between progress lines"
    )
    r.add_argument(
        "--mlflow",
        metavar="TRACKING_URI",
        help="log a summary to this MLflow server (default: $MLFLOW_TRACKING_URI when set)",
    )
    r.add_argument("--experiment", default="preprocess", help="MLflow experiment name")
    args = vars(p.parse_args(argv))
    max_error_fraction = args.pop("max_error_fraction")
    return PreprocessConfig(**args), max_error_fraction


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg, max_error_fraction = parse_args(argv)
    try:
        report = run(cfg)
    except (StorageError, AnnotationError, ValueError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    if report["videos"] and report["failed"] / report["videos"] > max_error_fraction:
        print(
            f"preprocess: {report['failed']} of {report['videos']} videos failed (more than "
            f"--max-error-fraction {max_error_fraction}); see {cfg.output}/report.json",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
