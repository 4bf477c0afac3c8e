"""What a pretrained encoder hands to finetuning, beside a random init of the same config: why a start can
be worse than random (issue 25's negative transfer).

For one exported pretraining run and a labeled dataset (a generated family, pipeline/data/synthetic.py),
on one eval clip of every train and val video (the pipeline's ClipMaker), frozen, no Ray:

- what ``load_for_finetuning`` keeps and drops of the checkpoint (the finetuning start);
- the pooled features' geometry: the share of their energy in the mean over videos (a large shared
  component makes every cosine similarity near 1), the mean cosine similarity between videos, the
  effective rank of the centred features (exp of the singular values' entropy), their scale;
- kNN top-1 (val queries, train bank) on the mean-pooled features as the probe job computes them, after
  removing the bank's mean, and on max-pooled tokens (is the class in the tokens but averaged away?);
- weight RMS per block (has pretraining grown the weights, so that a finetuning LR moves them less?).

    python benchmarks/feature_diagnostics.py --model runs/.../pretrain/export --data runs/.../data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.clips import ClipMaker  # noqa: E402
from pipeline.data.errors import ErrorLedger  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.data.section import DataSection  # noqa: E402
from pipeline.data.synthetic import OBJECT_SIDE  # noqa: E402
from pipeline.data.transforms import to_model_input  # noqa: E402
from pipeline.eval.frozen import knn_top1, load_encoder  # noqa: E402
from pipeline.models.videomae import VideoMAEConfig, VideoMAEModel  # noqa: E402
from pipeline.models.weights import load_for_finetuning  # noqa: E402


def load_split(root: Path, split: str, config: VideoMAEConfig, sampling_rate: int):
    """(uint8 clips, labels): one clip per video, cut by the pipeline's ClipMaker in eval mode, as the
    probe job sees them."""
    section = DataSection(
        uri=str(root),
        split=split,
        num_frames=config.num_frames,
        sampling_rate=sampling_rate,
        image_size=config.image_size,
        patch_size=config.patch_size,
        eval_num_clips=1,
        eval_num_crops=1,
        decode_isolation="inline",
        hflip=False,
    )
    maker = ClipMaker(section, "eval", ErrorLedger.local())
    clips, labels = [], []
    for row in read_manifest(str(root), None, split):
        made = maker.clips(row)["pixel_values"]
        clips += made
        labels += [row["label"]] * len(made)
    return torch.stack(clips), torch.tensor(labels)


@torch.no_grad()
def tokens(encoder: VideoMAEModel, clips: torch.Tensor, config: VideoMAEConfig) -> torch.Tensor:
    """(N, tokens, D) last hidden states, in batches."""
    out = []
    for i in range(0, len(clips), 64):
        pixels = to_model_input(clips[i : i + 64], config.image_mean, config.image_std)
        out.append(encoder(pixels).last_hidden_state)
    return torch.cat(out)


def geometry(features: torch.Tensor) -> dict[str, float]:
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    s = torch.linalg.svdvals(centred)
    p = s / s.sum()
    normed = F.normalize(x, dim=1)
    cos = normed @ normed.T
    n = len(x)
    return {
        "mean_energy_share": float(mean.pow(2).sum() / x.pow(2).sum(1).mean()),
        "mean_cosine": float((cos.sum() - n) / (n * (n - 1))),
        "effective_rank": float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())),
        "feature_norm": float(x.norm(dim=1).mean()),
    }


def knn(bank, bank_y, query, query_y, classes: int, centre: bool) -> float:
    if centre:
        mean = bank.mean(0)
        bank, query = bank - mean, query - mean
    return knn_top1(bank, bank_y, query, query_y, classes)


def object_tokens(image_size: int, patch: int, mask_ratio: float, trials: int = 4000) -> tuple[float, float]:
    """(tokens per time slice that the appearance family's object covers by at least a quarter, of them
    visible under a tube mask of ``mask_ratio``), by Monte Carlo over the object's position."""
    rng = np.random.default_rng(0)
    grid = image_size // patch
    side = OBJECT_SIDE * image_size
    edges = np.arange(grid) * patch
    covered = []
    for _ in range(trials):
        y, x = rng.uniform(0, image_size - side, 2)
        oy = np.clip(np.minimum(edges + patch, y + side) - np.maximum(edges, y), 0, None)
        ox = np.clip(np.minimum(edges + patch, x + side) - np.maximum(edges, x), 0, None)
        covered.append(int((np.outer(oy, ox) >= patch * patch / 4).sum()))
    mean = float(np.mean(covered))
    visible = grid * grid - int(mask_ratio * grid * grid)  # the tube mask's visible tokens per slice
    return mean, mean * visible / (grid * grid)


def weight_rms(encoder: VideoMAEModel) -> dict[str, float]:
    weight = encoder.embeddings.patch_embeddings.projection.weight.detach()
    out = {"patch_embed": float(weight.pow(2).mean().sqrt())}
    for i, layer in enumerate(encoder.encoder.layer):
        weights = [p.detach() for p in layer.parameters() if p.dim() == 2]
        out[f"block{i}"] = float(torch.cat([w.flatten() for w in weights]).pow(2).mean().sqrt())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported pretraining run (transformers folder)")
    parser.add_argument("--data", required=True, help="a generated dataset folder (train.csv, val.csv)")
    parser.add_argument("--sampling-rate", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    root = Path(args.data)
    classes = len(json.loads((root / "labels.json").read_text()))
    pretrained = load_encoder(args.model)
    config = pretrained.config
    random_init = VideoMAEModel(VideoMAEConfig.from_dict(config.to_dict())).eval()

    start = load_for_finetuning(args.model, {i: str(i) for i in range(classes)}, use_mean_pooling=True)
    new = sorted(k for k in start.state_dict() if k.startswith(("fc_norm", "classifier")))
    probe_clip = torch.randn(2, config.num_frames, 3, config.image_size, config.image_size)
    with torch.no_grad():  # the finetuning start's encoder against the pretrained one, before its final norm
        ours = start.videomae(probe_clip).last_hidden_state
        theirs = pretrained(probe_clip, output_hidden_states=True).hidden_states[-1]
    print(
        f"finetuning start: its encoder's outputs equal the pretrained encoder's up to "
        f"{(ours - theirs).abs().max():.2e} "
        f"(the final LayerNorm is replaced by mean pooling and a new fc_norm); new: {new}"
    )

    train_x, train_y = load_split(root, "train", config, args.sampling_rate)
    val_x, val_y = load_split(root, "val", config, args.sampling_rate)
    print(f"{len(train_x)} train / {len(val_x)} val eval clips of {tuple(train_x.shape[1:])}")
    rows = {}
    for name, encoder in (("pretrained", pretrained), ("random init", random_init)):
        train_t, val_t = tokens(encoder, train_x, config), tokens(encoder, val_x, config)
        mean_train, mean_val = train_t.mean(1), val_t.mean(1)
        max_train, max_val = train_t.amax(1), val_t.amax(1)
        row = geometry(mean_train)
        row["knn_mean_pool"] = knn(mean_train, train_y, mean_val, val_y, classes, centre=False)
        row["knn_mean_pool_centred"] = knn(mean_train, train_y, mean_val, val_y, classes, centre=True)
        row["knn_max_pool_centred"] = knn(max_train, train_y, max_val, val_y, classes, centre=True)
        row.update({f"rms/{k}": v for k, v in weight_rms(encoder).items()})
        rows[name] = row
    names = list(rows)
    header = f"{'measure':<28}" + "".join(f"{n:>16}" for n in names)
    print(header)
    print("-" * len(header))
    for key in rows[names[0]]:
        values = [rows[n][key] for n in names]
        cells = "".join(f"{100 * v:>15.1f}%" if key.startswith("knn") else f"{v:>16.4g}" for v in values)
        print(f"{key:<28}{cells}")
    print(f"(chance {100 / classes:.1f}%)")
    print("\nthe object (a fifth of the frame side) in tokens per time slice: covered by >= 1/4, visible")
    for size, patch, ratio in (
        (32, 4, 0.9),
        (32, 4, 0.75),
        (64, 8, 0.9),
        (48, 4, 0.9),
        (64, 4, 0.9),
        (64, 4, 0.75),
    ):
        mean, seen = object_tokens(size, patch, ratio)
        print(f"  {size:>3} px, patch {patch}, mask {ratio:.2f}: {mean:5.2f} covered, {seen:5.2f} visible")
    if not all(math.isfinite(v) for r in rows.values() for v in r.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
