"""Screen learning settings in one process, in minutes: which geometry and recipe can learn a family at all,
and does masked pretraining help there? Validation split only: this chooses settings, it claims nothing
(benchmarks/sample_efficiency.py makes the claims, with the real jobs, seeds and a test on the test split).

On a generated family (pipeline/data/synthetic.py), clips cut once by the pipeline's own ClipMaker
(``--clips-per-video`` random multi-scale crops per train video, one centre clip per val video), no Ray:

- **ceiling**: a classifier of the geometry trained from scratch on every train label (AdamW, warmup +
  cosine, label smoothing 0.1), val top-1 at six points of the run: can this geometry learn the task?
  A training loss that falls while val stays at chance is memorisation;
- **knn**: kNN top-1 (val queries, one clip per train video as the bank) of the encoder at its random init,
  then during ``--pretrain-steps`` of VideoMAE pretraining (tube masks at ``--mask-ratio``); beside it, how
  often two random clips of one val video are each other's nearest neighbours among all val clips (what
  the features tell apart: the video, by its background, or the class);
- **finetune** (with ``--finetune-steps``): ``--labeled-per-class`` labeled train videos per class, from the
  pretrained encoder and from scratch, same steps and LR.

    python benchmarks/learning_screen.py      # appearance, 64 px, patch 4, mask 0.75: every arm
    python benchmarks/learning_screen.py --image-size 32 --pretrain-steps 0 --ceiling-steps 1500 \\
        --videos-per-class 300                # the demo geometry's ceiling on three times the videos

Each run prints its table and appends one JSON line to ``--out`` (default .cache/learning_screen.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.clips import ClipMaker  # noqa: E402
from pipeline.data.errors import ErrorLedger  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.data.section import DataSection  # noqa: E402
from pipeline.data.synthetic import class_names, make_dataset  # noqa: E402
from pipeline.data.transforms import to_model_input  # noqa: E402
from pipeline.eval.frozen import knn_top1, pooled_features  # noqa: E402
from pipeline.models.videomae import (  # noqa: E402
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
    VideoMAEModel,
)
from pipeline.models.videomae.masking import make_mask  # noqa: E402

START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {message}", flush=True)


@dataclass
class Clips:
    """uint8 (N, T, H, W, C) clips, their labels and the index of the video each was cut from."""

    pixels: torch.Tensor
    labels: torch.Tensor
    videos: np.ndarray


def cut(root: Path, split: str, mode: str, clips_per_video: int, args: argparse.Namespace) -> Clips:
    section = DataSection(
        uri=str(root),
        split=split,
        num_frames=args.num_frames,
        sampling_rate=args.sampling_rate,
        image_size=args.image_size,
        patch_size=args.patch_size,
        tubelet_size=args.tubelet_size,
        clips_per_video=clips_per_video,
        decode_isolation="inline",
        seed=args.seed,
        hflip=False,
    )
    maker = ClipMaker(section, mode, ErrorLedger.local())
    pixels, labels, videos = [], [], []
    for index, row in enumerate(read_manifest(str(root), None, split)):
        made = maker.clips(row)["pixel_values"]
        pixels += made
        labels += [row["label"]] * len(made)
        videos += [index] * len(made)
    return Clips(torch.stack(pixels), torch.tensor(labels), np.asarray(videos))


class Screen:
    """The three arms on one family and geometry."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: VideoMAEConfig,
        train: Clips,
        bank: Clips,
        val: Clips,
        pairs: Clips,
    ):
        self.args, self.config, self.train, self.bank, self.val = args, config, train, bank, val
        self.pairs = pairs  # two random clips of each val video: what tells one video from another?
        self.classes = config.num_labels

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return to_model_input(pixels, self.config.image_mean, self.config.image_std)

    @torch.no_grad()
    def probe(self, encoder: VideoMAEModel) -> dict[str, float]:
        """kNN top-1 of the class, and how often a clip's nearest other clip comes from the same video (chance
        1 / (clips - 1)): features that find the video but not the class encode each video's background."""
        encoder.eval()

        def features(pixels: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [pooled_features(encoder, self.inputs(pixels[i : i + 64])) for i in range(0, len(pixels), 64)]
            )

        knn = knn_top1(
            features(self.bank.pixels),
            self.bank.labels,
            features(self.val.pixels),
            self.val.labels,
            self.classes,
        )
        pair = F.normalize(features(self.pairs.pixels), dim=1)
        similarity = (pair @ pair.T).fill_diagonal_(-2.0)
        same_video = (self.pairs.videos[similarity.argmax(1).numpy()] == self.pairs.videos).mean()
        encoder.train()
        return {"knn": round(100.0 * knn, 1), "same_video": round(100.0 * float(same_video), 1)}

    @torch.no_grad()
    def val_top1(self, model: VideoMAEForVideoClassification) -> float:
        model.eval()
        right = sum(
            int(
                (
                    model(self.inputs(self.val.pixels[i : i + 64])).logits.argmax(-1)
                    == self.val.labels[i : i + 64]
                ).sum()
            )
            for i in range(0, len(self.val.pixels), 64)
        )
        model.train()
        return 100.0 * right / len(self.val.pixels)

    @staticmethod
    def set_lr(optimizer: torch.optim.Optimizer, peak: float, step: int, steps: int) -> None:
        warmup = max(1, steps // 10)
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = peak * scale

    def supervise(
        self, name: str, rows: np.ndarray, steps: int, lr: float, encoder: VideoMAEModel | None = None
    ) -> dict:
        """Train a classifier on the clips ``rows``; its val top-1 at six points and its last loss."""
        model = VideoMAEForVideoClassification(self.config)
        if encoder is not None:
            model.videomae.load_state_dict(encoder.state_dict())
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        rng = np.random.default_rng(self.args.seed + 1)
        curve, loss = [], float("nan")
        for step in range(steps):
            self.set_lr(optimizer, lr, step, steps)
            batch = torch.from_numpy(
                rng.choice(rows, self.args.batch_size, replace=len(rows) < self.args.batch_size)
            )
            logits = model(self.inputs(self.train.pixels[batch])).logits
            loss_t = F.cross_entropy(logits, self.train.labels[batch], label_smoothing=0.1)
            loss_t.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_t.item()
            if (step + 1) % max(1, steps // 6) == 0 or step + 1 == steps:
                curve.append(round(self.val_top1(model), 1))
                log(f"{name}: step {step + 1}, training loss {loss:.3f}, val top-1 {curve[-1]:.1f}%")
        return {"val_top1_curve": curve, "best": max(curve), "last": curve[-1], "train_loss": round(loss, 4)}

    def pretrain(self) -> tuple[VideoMAEForPreTraining, dict]:
        args = self.args
        model = VideoMAEForPreTraining(self.config)
        start = self.probe(model.videomae)
        out = {"knn_random_init": start["knn"], "same_video_random_init": start["same_video"], "curve": []}
        log(f"at the random init: kNN {start['knn']:.1f}%, same video found {start['same_video']:.1f}%")
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.05
        )
        rng = np.random.default_rng(args.seed)
        for step in range(args.pretrain_steps):
            self.set_lr(optimizer, args.pretrain_lr, step, args.pretrain_steps)
            batch = torch.from_numpy(rng.choice(len(self.train.pixels), args.batch_size, replace=False))
            masks = np.stack(
                [make_mask("tube", self.config.grid, args.mask_ratio, rng) for _ in range(args.batch_size)]
            )
            loss = model(self.inputs(self.train.pixels[batch]), bool_masked_pos=torch.from_numpy(masks)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % max(1, args.pretrain_steps // 5) == 0:
                point = {"step": step + 1, "loss": round(loss.item(), 4), **self.probe(model.videomae)}
                out["curve"].append(point)
                log(
                    f"pretraining: step {step + 1}, loss {point['loss']:.4f}, kNN {point['knn']:.1f}%, "
                    f"same video found {point['same_video']:.1f}%"
                )
        out["knn_pretrained"] = out["curve"][-1]["knn"]
        out["same_video_pretrained"] = out["curve"][-1]["same_video"]
        return model, out

    def labeled_rows(self) -> np.ndarray:
        """The clips of ``labeled_per_class`` train videos per class, drawn by the seed."""
        rng = np.random.default_rng(self.args.seed + 2)
        labels = self.train.labels.numpy()
        chosen = set()
        for label in range(self.classes):
            videos = np.unique(self.train.videos[labels == label])
            chosen |= set(rng.choice(videos, self.args.labeled_per_class, replace=False).tolist())
        return np.flatnonzero(np.isin(self.train.videos, sorted(chosen)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=("motion", "appearance"), default="appearance")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 10 appearance, 4 motion")
    parser.add_argument("--videos-per-class", type=int, default=100)
    parser.add_argument("--source-size", type=int, default=64, help="the generated videos' side")
    parser.add_argument("--data-dir", default=".cache/learning_screen")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--tubelet-size", type=int, default=2)
    parser.add_argument("--sampling-rate", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--layers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--heads", type=int, default=None, help="default: the preset's")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--clips-per-video", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ceiling-steps", type=int, default=500, help="0: no ceiling arm")
    parser.add_argument("--ceiling-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-steps", type=int, default=2000, help="0: no kNN or finetune arms")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-steps", type=int, default=500, help="0: no finetune arms")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--labeled-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".cache/learning_screen.jsonl")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    classes = args.num_classes or (10 if args.family == "appearance" else 4)
    frames = 32 if args.family == "appearance" else 48
    root = Path(args.data_dir) / f"{args.family}-{classes}c-{args.videos_per_class}v-{args.source_size}px"
    if not (root / "dataset.json").exists():
        log(f"writing the {args.family} family's videos to {root}")
        make_dataset(
            str(root),
            videos_per_class=args.videos_per_class,
            num_frames=frames,
            size=(args.source_size, args.source_size),
            seed=0,
            num_classes=classes,
            family=args.family,
        )
    overrides = {
        key: value
        for key, value in (
            ("hidden_size", args.hidden_size),
            ("num_hidden_layers", args.layers),
            ("num_attention_heads", args.heads),
        )
        if value is not None
    }
    if "hidden_size" in overrides:
        overrides["intermediate_size"] = 4 * overrides["hidden_size"]
    config = VideoMAEConfig.from_preset(
        args.preset,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_frames=args.num_frames,
        tubelet_size=args.tubelet_size,
        num_labels=classes,
        use_mean_pooling=True,
        **overrides,
    )
    train = cut(root, "train", "pretrain", args.clips_per_video, args)
    bank, val = cut(root, "train", "eval", 1, args), cut(root, "val", "eval", 1, args)
    screen = Screen(args, config, train, bank, val, cut(root, "val", "pretrain", 2, args))
    log(
        f"{len(train.pixels)} train clips of {tuple(train.pixels.shape[1:])}, {len(screen.val.pixels)} val "
        f"videos, {len(class_names(classes, args.family))} classes (chance {100 / classes:.1f}%)"
    )

    result: dict = {"args": vars(args)}
    if args.ceiling_steps:
        result["ceiling"] = screen.supervise(
            "ceiling", np.arange(len(train.pixels)), args.ceiling_steps, args.ceiling_lr
        )
    if args.pretrain_steps:
        model, result["pretraining"] = screen.pretrain()
        if args.finetune_steps:
            rows = screen.labeled_rows()
            result["finetune_pretrained"] = screen.supervise(
                "finetune, pretrained", rows, args.finetune_steps, args.finetune_lr, model.videomae
            )
            result["finetune_scratch"] = screen.supervise(
                "finetune, scratch", rows, args.finetune_steps, args.finetune_lr
            )
    result["seconds"] = round(time.monotonic() - START)

    print(
        f"\n{args.family}, {args.image_size} px, patch {args.patch_size}, {args.num_frames} frames, "
        f"mask {args.mask_ratio} (val split; chance {100 / classes:.1f}%)"
    )
    print(f"{'arm':<44}{'val top-1':>12}")
    if "ceiling" in result:
        c = result["ceiling"]
        print(
            f"{'ceiling: scratch, every label (best / last)':<44}{c['best']:>7.1f} / {c['last']:.1f}%"
            f"   training loss {c['train_loss']}"
        )
    if "pretraining" in result:
        p = result["pretraining"]
        print(f"{'kNN, random init':<44}{p['knn_random_init']:>11.1f}%")
        print(
            f"{'kNN, pretrained':<44}{p['knn_pretrained']:>11.1f}%   "
            f"ratio {p['knn_pretrained'] / max(p['knn_random_init'], 1e-9):.2f}x"
        )
        chance = 100 / (len(screen.pairs.pixels) - 1)
        label = f"same video found, random init (chance {chance:.1f}%)"
        print(f"{label:<44}{p['same_video_random_init']:>11.1f}%")
        print(f"{'same video found, pretrained':<44}{p['same_video_pretrained']:>11.1f}%")
    for arm in ("finetune_pretrained", "finetune_scratch"):
        if arm in result:
            print(
                f"{arm.replace('_', ', ') + f' ({args.labeled_per_class}/class, best)':<44}"
                f"{result[arm]['best']:>11.1f}%"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
