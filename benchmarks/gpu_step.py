"""One VideoMAE pretraining step on an accelerator: clips/s, peak memory and MFU, ours against transformers',
eager against torch.compile, with and without activation checkpointing; and the decode cores one GPU needs.

    python benchmarks/gpu_step.py                  # a GPU: ViT-B, ViT-L, ViT-g at 16x224x224, bf16
    python benchmarks/gpu_step.py --sizes vit-b    # one size
    python benchmarks/gpu_step.py --cpu-smoke      # anywhere: small sizes, to prove the script runs

Needs only torch (transformers optional: its arm is skipped without it) and this repository on the path, as on
a bare GPU node. A step is forward, backward and AdamW at tube mask 0.9 in bf16 autocast. Each arm runs
``--warmup`` steps (compilation included), then ``--steps`` timed ones; the arms alternate in rounds so
drift hits them alike. MFU counts the model's FLOPs (forward x 3: activation checkpointing's extra
forward is not counted, as is usual) against the accelerator's dense bf16 peak. A size or arm that runs out
of memory halves its batch and retries, down to 1.

Decode cores per GPU: the step rate divided by the clips one CPU core decodes per second through the training
path (``--decode-clips-per-core``; default: docs/data.md's table from benchmarks/decoders.py, short side 320,
one clip and four clips per decoded video).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a bare node: the repository, not installed

from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining  # noqa: E402
from pipeline.models.videomae.masking import make_mask  # noqa: E402

# Dense bf16 peak of known accelerators, TFLOP/s (vendor data sheets; SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
BATCH = {"vit-s": 64, "vit-b": 32, "vit-l": 16, "vit-h": 8, "vit-g": 8, "demo": 64, "tiny": 64}


@dataclass
class Arm:
    impl: str  # ours | transformers
    compiled: bool
    checkpointing: bool

    @property
    def name(self) -> str:
        return (f"{self.impl}, {'compiled' if self.compiled else 'eager'}"
                f"{', act. ckpt' if self.checkpointing else ''}")


@dataclass
class Result:
    size: str
    arm: Arm
    batch: int
    clips_per_s: float
    peak_gib: float
    mfu: float | None


def model_flops_per_clip(c: VideoMAEConfig, mask_ratio: float) -> float:
    """Training FLOPs of one clip (3 x forward): matmuls 2 x in x out per token, attention 4 x N^2 x D
    per layer; the encoder sees the visible tokens, the decoder all of them."""
    t, h, w = c.grid
    tokens = t * h * w
    visible = tokens - int(mask_ratio * tokens)
    patch = c.num_channels * c.tubelet_size * c.patch_size**2

    def blocks(n: int, d: int, mlp: int, layers: int) -> float:
        return layers * (2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d)

    forward = (2 * visible * patch * c.hidden_size
               + blocks(visible, c.hidden_size, c.intermediate_size, c.num_hidden_layers)
               + 2 * tokens * c.hidden_size * c.decoder_hidden_size
               + blocks(tokens, c.decoder_hidden_size, c.decoder_intermediate_size,
                        c.decoder_num_hidden_layers)
               + 2 * (tokens - visible) * c.decoder_hidden_size * patch)
    return 3.0 * forward


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(arm: Arm, config: VideoMAEConfig, device: torch.device) -> torch.nn.Module:
    if arm.impl == "ours":
        model = VideoMAEForPreTraining(config)
        if arm.checkpointing:
            model.gradient_checkpointing_enable()
    else:
        import transformers

        hf = transformers.VideoMAEConfig(**{k: v for k, v in config.to_dict().items()
                                            if k in transformers.VideoMAEConfig().to_dict()})
        model = transformers.VideoMAEForPreTraining(hf)
        if arm.checkpointing:
            model.gradient_checkpointing_enable()
    model = model.to(device).train()
    return torch.compile(model) if arm.compiled else model


def run_arm(arm: Arm, config: VideoMAEConfig, batch: int, device: torch.device, warmup: int,
            steps: int, mask_ratio: float) -> tuple[list[float], float]:
    """(seconds per timed step, peak GiB) of ``steps`` steps after ``warmup``."""
    torch.manual_seed(0)
    model = build(arm, config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    pixels = torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size, device=device)
    rng = np.random.default_rng(0)
    masks = [make_mask("tube", config.grid, mask_ratio, rng) for _ in range(batch)]
    mask = torch.from_numpy(np.stack(masks)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            loss = model(pixels, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    return times, peak


def measure(size: str, arm: Arm, config: VideoMAEConfig, batch: int, device: torch.device, args,
            peak: float | None) -> Result | None:
    while batch >= 1:
        try:
            times, peak_gib = run_arm(arm, config, batch, device, args.warmup, args.steps, args.mask_ratio)
            step_s = statistics.median(times)
            clips = batch / step_s
            mfu = clips * model_flops_per_clip(config, args.mask_ratio) / (peak * 1e12) if peak else None
            return Result(size, arm, batch, clips, peak_gib, mfu)
        except torch.OutOfMemoryError:
            batch //= 2
            print(f"  {size} / {arm.name}: out of memory, batch {batch}", flush=True)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=None, help="presets (default: vit-b vit-l vit-g)")
    parser.add_argument("--cpu-smoke", action="store_true", help="small sizes on the CPU: the script runs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of an unknown GPU")
    parser.add_argument("--no-compile", action="store_true", help="eager arms only")
    parser.add_argument("--decode-clips-per-core", type=float, nargs=2, default=(30.7, 62.5),
                        metavar=("ONE_CLIP", "FOUR_CLIPS"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if args.cpu_smoke:
        sizes = args.sizes or ["tiny", "demo"]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    else:
        sizes = args.sizes or ["vit-b", "vit-l", "vit-g"]
    try:
        import transformers  # noqa: F401

        impls = ["ours", "transformers"]
    except ImportError:
        impls = ["ours"]
        print("transformers is not installed: its arms are skipped", flush=True)
    arms = [Arm(impl, compiled, ckpt) for impl in impls for compiled in ((False,) if args.no_compile
                                                                          else (False, True))
            for ckpt in (False, True)]
    peak = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {where}; torch {torch.__version__}; bf16 autocast; mask {args.mask_ratio}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per arm", flush=True)

    results: list[Result] = []
    for size in sizes:
        config = VideoMAEConfig.from_preset(size)
        if config.num_frames != 16 and not args.cpu_smoke:
            print(f"note: {size} clips are {config.num_frames}x{config.image_size}^2", flush=True)
        for arm in arms:
            with contextlib.suppress(KeyboardInterrupt):
                result = measure(size, arm, config, BATCH.get(size, 8), device, args, peak)
                if result:
                    results.append(result)
                    print(f"  {size:6} {arm.name:34} batch {result.batch:3}  "
                          f"{result.clips_per_s:8.2f} clips/s", flush=True)

    one, four = args.decode_clips_per_core
    print("\n| size | arm | batch | clips/s | vs ours eager | peak GiB | MFU | decode cores (1 / 4 clips "
          "per video) |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next((b for b in results if b.size == r.size and b.arm == Arm("ours", False, False)), None)
        ratio = f"{r.clips_per_s / base.clips_per_s:.2f}x" if base else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        peak_gib = "-" if r.peak_gib != r.peak_gib else f"{r.peak_gib:.1f}"  # NaN: no CUDA allocator to ask
        print(f"| {r.size} | {r.arm.name} | {r.batch} | {r.clips_per_s:.1f} | {ratio} | {peak_gib} | "
              f"{mfu} | {r.clips_per_s / one:.0f} / {r.clips_per_s / four:.0f} |")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
