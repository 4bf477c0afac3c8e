"""One VideoMAE pretraining step (forward, backward, AdamW) at 224 px, 16 frames, tube mask 0.9: ours against
transformers' VideoMAEForPreTraining with the same weights and inputs, in float32 and bf16 autocast.

    .venv/bin/python benchmarks/model_step.py            # ViT-S and ViT-B
    .venv/bin/python benchmarks/model_step.py --quick    # ViT-S only

Steps of the two implementations alternate, so load from other processes on the machine hits both alike;
the figure is the median over the timed steps. Needs transformers (a dev dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining
from pipeline.models.videomae.masking import make_mask


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast(
            device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16
        )
    return contextlib.nullcontext()


class Runner:
    """A model, its AdamW optimiser and a step function returning (seconds, loss)."""

    def __init__(self, model: torch.nn.Module, precision: str):
        self.model, self.precision = model.train(), precision
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(self.precision):
            loss = self.model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss.detach())


def bench(size: str, precision: str, batch: int, steps: int, compile_ours: bool) -> dict:
    from transformers import VideoMAEForPreTraining as HFPreTraining

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = VideoMAEConfig.from_preset(size, use_mean_pooling=False)  # pretraining layout: encoder norm
    ours = VideoMAEForPreTraining(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs, info = HFPreTraining.from_pretrained(
            tmp, output_loading_info=True, attn_implementation="sdpa"
        )
    assert not any(info.values()), f"transformers did not load our checkpoint cleanly: {info}"
    ours, theirs = ours.to(device), theirs.to(device)
    model = torch.compile(ours) if compile_ours else ours
    runners = {"transformers": Runner(theirs, precision), "ours": Runner(model, precision)}

    rng = np.random.default_rng(0)
    pixel_values = torch.randn(
        batch, config.num_frames, 3, config.image_size, config.image_size, device=device
    )
    mask = torch.from_numpy(np.stack([make_mask("tube", config.grid, 0.9, rng) for _ in range(batch)])).to(
        device
    )

    times: dict[str, list[float]] = {name: [] for name in runners}
    first_loss = {}
    for i in range(steps + 1):  # step 0 warms up (allocator, oneDNN primitives, compilation)
        for name, runner in runners.items():
            seconds, loss = runner.step(pixel_values, mask)
            if i == 0:
                first_loss[name] = loss
            else:
                times[name].append(seconds)
    rate = {name: batch / statistics.median(t) for name, t in times.items()}
    return dict(
        size=size,
        precision=precision,
        theirs=rate["transformers"],
        ours=rate["ours"],
        loss_theirs=first_loss["transformers"],
        loss_ours=first_loss["ours"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="ViT-S only")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    args = parser.parse_args(argv)
    sizes = ["vit-s"] if args.quick else ["vit-s", "vit-b"]
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    print(
        f"pretraining step, 16 x 224 x 224, tube mask 0.9, batch {args.batch}, median of {args.steps} steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    header = (
        f"{'model':6} {'precision':9} {'transformers clips/s':>20} {'ours clips/s':>12} {'ratio':>6} "
        f"{'loss (transformers / ours)':>28}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for size in sizes:
        for precision in precisions:
            r = bench(size, precision, args.batch, args.steps, args.compile)
            tolerance = 1e-4 if precision == "fp32" else 2e-2  # bf16 rounding of a ~1.0 loss
            same = abs(r["loss_theirs"] - r["loss_ours"]) <= tolerance * max(1.0, abs(r["loss_theirs"]))
            ok &= same
            ratio = r["ours"] / r["theirs"]
            print(
                f"{size:6} {precision:9} {r['theirs']:20.3f} {r['ours']:12.3f} {ratio:6.2f} "
                f"{r['loss_theirs']:13.5f} / {r['loss_ours']:.5f}{'' if same else '  LOSS DIFFERS'}",
                flush=True,
            )
    print("targets: ours/transformers >= 1.5 with bf16, >= 1.0 with fp32, at equal first-step loss")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
