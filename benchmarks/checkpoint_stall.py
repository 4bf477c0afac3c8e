"""Checkpoint stall: how long training waits at a checkpoint, uploads sync vs async, in the same run.

Two pretraining runs of the real job (Ray Data, Ray Train, one worker) that differ only in
``checkpoint.upload``: a ViT-B-sized model (the encoder and decoder of the paper's ViT-B, about 94M
parameters, so a checkpoint of model + AdamW moments is about 1.1 GB) on small clips, so that a step is
short and the checkpoint large, as on a GPU node where a step takes a fraction of a second and the
checkpoint gigabytes. Checkpoints go to S3 (a local ``moto_server``, started here), every
``--every`` steps. Per-step times come from the run's MLflow metrics (``step_time_s`` at every step);
the checkpoint's cost lands in the step after it. The stall is that step's time minus the median step;
"run s" is the whole job (start-up, training, the final upload), as a check that the stall is not just
moved elsewhere.

    python benchmarks/checkpoint_stall.py            # about 4 minutes here
    python benchmarks/checkpoint_stall.py --steps 24 --every 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from s3_server import start_moto  # noqa: E402 - benchmarks/ is the script's folder


def start_s3(root: Path) -> tuple[subprocess.Popen, str]:
    proc, port = start_moto()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")
    return proc, endpoint


def run(mode: str, steps: int, every: int, data: str, root: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from pipeline import config as C
    from pipeline import storage
    from pipeline.train.pretrain import PretrainConfig, run_pretrain

    sets = [
        "model.preset=vit-b", "model.image_size=64", "model.num_frames=4", f"run_name=stall-{mode}",
        "storage_path=s3://bench/runs", f"data.uri={data}", "data.decode_isolation=inline",
        "data.clips_per_video=2", "train.batch_size=2", "train.global_batch_size=null",
        f"train.max_steps={steps}", "train.log_every_steps=1",
        f"checkpoint.every_steps={every}", "checkpoint.keep_last=2", f"checkpoint.upload={mode}",
        "tracking.system_metrics=false", "tracking.experiment=bench", "tracking.recon_every_steps=0",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", "optim.warmup_steps=1", "probe.every_steps=0",
    ]
    cfg = C.load(PretrainConfig, C.CONFIG_DIR / "pretrain_tiny_demo.yaml", sets)
    started = time.time()
    result = run_pretrain(cfg)
    wall = time.time() - started
    client = MlflowClient(result.tracking_uri)
    times = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "step_time_s")}
    after = [s + 1 for s in range(every, steps, every) if s + 1 in times]  # the steps that paid a checkpoint
    others = [t for s, t in times.items() if s not in after and s > 2]  # the first steps warm up
    median = statistics.median(others)
    stalls = [times[s] - median for s in after]
    size = sum(n for _, n in storage.list_files(result.checkpoint_uri))
    return {"mode": mode, "median_step_s": median, "stall_s": statistics.mean(stalls), "stalls": stalls,
            "checkpoint_gb": size / 1e9, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, endpoint = start_s3(root)
        try:
            import boto3

            from pipeline.data.synthetic import make_dataset

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            make_dataset(str(root / "videos"), videos_per_class=2, num_frames=24, size=(64, 64), seed=0)
            data = str(root / "videos")
            results = [run(mode, args.steps, args.every, data, root) for mode in ("sync", "async")]
        finally:
            proc.terminate()
    sync = next(r for r in results if r["mode"] == "sync")
    print(f"\ncheckpoint stall ({os.cpu_count()} CPUs; ViT-B-sized model, 1 worker, checkpoints to S3 every "
          f"{args.every} of {args.steps} steps)")
    header = (f"{'upload':8} {'checkpoint GB':>13} {'median step s':>13} {'stall s':>8} "
              f"{'per checkpoint':>22} {'vs sync':>8} {'run s':>6}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        per = ", ".join(f"{s:.1f}" for s in r["stalls"])
        print(f"{r['mode']:8} {r['checkpoint_gb']:>13.2f} {r['median_step_s']:>13.2f} {r['stall_s']:>8.1f} "
              f"{per:>22} {r['stall_s'] / sync['stall_s']:>7.2f}x {r['wall_s']:>6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
