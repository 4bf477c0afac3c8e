"""Pretraining throughput: end-to-end (Ray Data decode + Ray Train) against the model alone, same run.

For each config the benchmark

1. trains ``--steps`` optimizer steps through the real job (``run_pretrain``: Ray Data reads and decodes
   the generated sample videos, Ray Train runs the loop) and reads the per-window clips/s, data-wait
   fraction and peak worker memory that rank 0 logged to MLflow (the first window, which includes
   start-up, is left out);
2. times forward + backward + AdamW step of the same model on one batch taken from the same dataset, in
   this process with as many torch threads as a training worker gets (``scaling.cpus_per_worker``).

The ratio end-to-end / model-only says how much the data path costs: 1.0 means the model never waits.
Target: >= 0.8 when decode workers suffice. On a 2-core machine decoding and training share the cores,
so a small model is decode-bound by construction; the table shows it.

    python benchmarks/pretrain_throughput.py [--steps 40] [--configs tiny,vit-s] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    # name: config overrides on top of configs/pretrain_tiny_demo.yaml
    "tiny": ["model.preset=tiny"],
    # ViT-S width and depth (and decoder) at 112 px x 8 frames: the full 224 x 16 clip takes seconds per
    # step on a laptop CPU; the encoder/decoder shapes per token are the paper's.
    "vit-s": ["model.preset=vit-s", "model.image_size=112", "model.num_frames=8"],
}


def model_only_clips_per_s(cfg, batch: dict, steps: int, threads: int) -> float:
    import torch

    from pipeline.data.transforms import to_model_input
    from pipeline.models.videomae import VideoMAEForPreTraining
    from pipeline.train.optim import build_adamw

    torch.set_num_threads(threads)
    model = VideoMAEForPreTraining(cfg.model.build())
    opt = build_adamw(model, 1e-4, cfg.optim.weight_decay, cfg.optim.betas)
    frames = torch.as_tensor(batch["pixel_values"])
    mask = torch.as_tensor(batch["bool_masked_pos"])
    timings = []
    for i in range(steps + 2):
        started = time.perf_counter()
        pixel_values = to_model_input(frames, cfg.data.mean, cfg.data.std)  # the loop normalises per step too
        model(pixel_values, mask).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up steps excluded
            timings.append(time.perf_counter() - started)
    return frames.shape[0] / statistics.median(timings)


def bench(name: str, steps: int, workers: int, batch_size: int, root: str) -> dict:
    from mlflow.tracking import MlflowClient

    from pipeline import config as C
    from pipeline.data.datasets import build_dataset, resolve_rows
    from pipeline.data.errors import ErrorLedger
    from pipeline.train.pretrain import PretrainConfig, run_pretrain

    sets = CONFIGS[name] + [
        f"run_name=bench-{name}-{int(time.time())}", f"storage_path={root}/runs",
        "data.decode_isolation=inline",
        f"train.batch_size={batch_size}", "train.global_batch_size=null",
        f"train.max_steps={steps}", "train.log_every_steps=5",
        f"checkpoint.every_steps={steps}", "tracking.system_metrics=false", "tracking.experiment=bench",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"scaling.num_workers={workers}",
        "scaling.cpus_per_worker=1", "optim.warmup_steps=1", "tracking.recon_every_steps=0",
    ]
    cfg = C.load(PretrainConfig, C.CONFIG_DIR / "pretrain_tiny_demo.yaml", sets)
    result = run_pretrain(cfg)
    client = MlflowClient(result.tracking_uri)
    history = {key: [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, key),
                                             key=lambda m: m.step)]
               for key in ("clips_per_s", "data_wait_fraction", "peak_rss_mb_max_worker")}
    e2e = statistics.median(history["clips_per_s"][1:] or history["clips_per_s"])
    wait = statistics.median(history["data_wait_fraction"][1:] or history["data_wait_fraction"])

    rows = resolve_rows(cfg.data)
    dataset = build_dataset(cfg.data, "pretrain", ErrorLedger.get_or_create(cfg.run_name), rows=rows)
    batch = dataset.take_batch(batch_size, batch_format="numpy")
    alone = model_only_clips_per_s(cfg, batch, steps=10, threads=1) * workers
    return {"config": name, "workers": workers, "batch": batch_size, "e2e": e2e, "model": alone,
            "ratio": e2e / alone, "wait": wait, "peak_mb": max(history["peak_rss_mb_max_worker"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--configs", default="tiny,vit-s")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.configs.split(","):
            results.append(bench(name, args.steps, args.workers, args.batch_size, root))
    print(f"\npretraining throughput ({os.cpu_count()} CPUs; end-to-end = Ray Data + Ray Train, model-only = "
          "forward/backward/step on one batch of the same data)")
    header = f"{'config':8} {'workers':>7} {'batch':>5} {'e2e clips/s':>11} {'model clips/s':>13} " \
             f"{'ratio':>6} {'data wait':>9} {'peak MB/worker':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['config']:8} {r['workers']:>7} {r['batch']:>5} {r['e2e']:>11.1f} {r['model']:>13.1f} "
              f"{r['ratio']:>6.2f} {100 * r['wait']:>8.0f}% {r['peak_mb']:>14.0f}")
    print("target: ratio >= 0.80 when decode workers suffice")


if __name__ == "__main__":
    main()
