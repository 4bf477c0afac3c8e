"""One VideoMAE pretraining step (forward, backward, AdamW) at 224 px, 16 frames, tube mask 0.9: ours against
transformers' VideoMAEForPreTraining with the same weights and inputs, in float32 and bf16 autocast.

    .venv/bin/python benchmarks/model_step.py            # ViT-S and ViT-B
    .venv/bin/python benchmarks/model_step.py --quick    # ViT-S only
    .venv/bin/python benchmarks/model_step.py --quick --levers   # + our model with each speed-up undone

Steps of all implementations alternate, so load from other processes hits them alike. Reported: clips/s
from the median wall time, and CPU seconds per clip (process time, steadier on a shared machine); the
ratios use both. Needs transformers (a dev dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining
from pipeline.models.videomae import modeling as ours_modeling
from pipeline.models.videomae.masking import make_mask


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast(
            device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16
        )
    return contextlib.nullcontext()


# --- our model with one speed-up undone (benchmark-only patches, applied around that model's step) --------


def _full_patch_embedding(self, patches, visible):
    """transformers' order: embed every tubelet, then keep the visible ones."""
    x = self.patch_embeddings(patches) + self.position_embeddings[0]
    return x if visible is None else ours_modeling.gather_tokens(x, visible)


def _separate_qkv(self, x, output_attentions=False):
    b, n, d = x.shape
    wq, wk, wv = self.qkv.weight.chunk(3)
    heads = [
        ours_modeling.linear(x, w, bias).view(b, n, self.num_heads, -1).transpose(1, 2)
        for w, bias in ((wq, self.q_bias), (wk, None), (wv, self.v_bias))
    ]
    out = ours_modeling.attention(*heads, 0.0)
    return out.transpose(1, 2).reshape(b, n, d), None


def _eager_attention(q, k, v, dropout):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def _native_bf16(x, weight, bias=None):
    return F.linear(x, weight, bias)


LEVERS: dict[str, list[tuple[object, str, Callable]]] = {
    "- visible-only patch embed": [(ours_modeling.VideoMAEEmbeddings, "forward", _full_patch_embedding)],
    "- fused qkv": [(ours_modeling.VideoMAESelfAttention, "forward", _separate_qkv)],
    "- SDPA (eager softmax)": [(ours_modeling, "attention", _eager_attention)],
    "- fp32 kernels for bf16": [
        (ours_modeling, "linear", _native_bf16),
        (ours_modeling, "attention", lambda q, k, v, p: F.scaled_dot_product_attention(q, k, v, dropout_p=p)),
    ],
}


@contextlib.contextmanager
def patched(patches: list[tuple[object, str, Callable]]):
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


class Runner:
    """A model, its AdamW optimiser and a timed step; ``patches`` undo one of our speed-ups."""

    def __init__(self, model: torch.nn.Module, precision: str, patches=()):
        self.model, self.precision, self.patches = model.train(), precision, list(patches)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_loss = float("nan")

    def step(self, pixel_values: torch.Tensor, mask: torch.Tensor, timed: bool) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        with patched(self.patches), autocast(self.precision):
            loss = self.model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if timed:
            self.wall.append(time.perf_counter() - start)
            self.cpu.append(time.process_time() - cpu_start)
        else:
            self.first_loss = float(loss.detach())


def bench(size: str, precision: str, batch: int, steps: int, compile_ours: bool, levers: bool) -> dict:
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
        variants = {name: VideoMAEForPreTraining.from_pretrained(tmp) for name in (LEVERS if levers else ())}
        twin = VideoMAEForPreTraining.from_pretrained(tmp) if compile_ours else None
    compiled = torch.compile(twin.to(device)) if twin is not None else None
    assert not any(info.values()), f"transformers did not load our checkpoint cleanly: {info}"
    runners = {
        "transformers": Runner(theirs.to(device), precision),
        "ours": Runner(ours.to(device), precision),
    }
    if compiled is not None:  # the same weights, compiled: eager and compiled timed in the same run
        runners["ours, torch.compile"] = Runner(compiled, precision)
    for name, model in variants.items():
        if precision == "fp32" and name == "- fp32 kernels for bf16":
            continue
        runners["ours " + name] = Runner(model.to(device), precision, LEVERS[name])

    rng = np.random.default_rng(0)
    pixel_values = torch.randn(
        batch, config.num_frames, 3, config.image_size, config.image_size, device=device
    )
    mask = torch.from_numpy(np.stack([make_mask("tube", config.grid, 0.9, rng) for _ in range(batch)]))
    for i in range(
        steps + 1
    ):  # step 0 warms up (allocator, oneDNN primitives, compilation) and gives the loss
        for runner in runners.values():
            runner.step(pixel_values, mask.to(device), timed=i > 0)
    return {
        name: dict(
            clips_per_s=batch / statistics.median(r.wall),
            cpu_s_per_clip=statistics.median(r.cpu) / batch,
            loss=r.first_loss,
        )
        for name, r in runners.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="ViT-S only")
    parser.add_argument("--models", default="vit-s,vit-b", help="comma-separated presets")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--levers", action="store_true", help="also time our model with each speed-up undone")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--threads", type=int, help="torch threads (1: exact CPU time on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ["vit-s"] if args.quick else args.models.split(",")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    native = "native" if ours_modeling._NATIVE_BF16_CPU else "emulated (no bf16 GEMM instructions)"
    print(
        f"pretraining step (forward, backward, AdamW), 16 x 224 x 224, tube mask 0.9, batch {args.batch}, "
        f"median of {args.steps} steps; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU bf16 {native}",
        flush=True,
    )
    header = (
        f"{'model':6} {'precision':9} {'implementation':34} {'clips/s':>8} {'x':>6} {'CPU s/clip':>10} "
        f"{'x':>6} {'first loss':>10}"
    )
    print(header + "\n" + "-" * len(header))
    ok = True
    for size in sizes:
        for precision in precisions:
            rows = bench(size, precision, args.batch, args.steps, args.compile, args.levers)
            base = rows["transformers"]
            tolerance = 1e-4 if precision == "fp32" else 2e-2  # bf16 rounding of a ~1.0 loss
            for name, r in rows.items():
                same = abs(r["loss"] - base["loss"]) <= tolerance * max(1.0, abs(base["loss"]))
                ok &= same or name not in ("ours", "ours, torch.compile")
                print(
                    f"{size:6} {precision:9} {name:34} {r['clips_per_s']:8.3f} "
                    f"{r['clips_per_s'] / base['clips_per_s']:6.2f} {r['cpu_s_per_clip']:10.2f} "
                    f"{base['cpu_s_per_clip'] / r['cpu_s_per_clip']:6.2f} {r['loss']:10.5f}"
                    f"{'' if same else '  LOSS DIFFERS'}",
                    flush=True,
                )
    print(
        "x = speed relative to transformers. Targets: ours >= 1.5x with bf16, >= 1.0x with fp32, equal loss"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
