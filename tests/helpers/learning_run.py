"""The pretraining of tests/train/test_learning.py, run as a script of its own: conftest.py starts it under
SCHED_IDLE (the lowest CPU priority) as soon as that test is collected, so that its minutes of pure
compute use the CPU the rest of the suite leaves idle. Prints one ``RESULT {json}`` line with both kNN scores.

The demo's model and recipe (the ``demo`` preset, tube masks at 0.9, AdamW at 2e-3 after a warmup, 32 clips
a step) on 4 direction classes, on clips decoded once by the pipeline's own ClipMaker; frozen-feature kNN
on the test split against the same encoder at its random init.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data.clips import ClipMaker  # noqa: E402
from pipeline.data.errors import ErrorLedger  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.data.section import DataSection  # noqa: E402
from pipeline.data.synthetic import make_dataset  # noqa: E402
from pipeline.data.transforms import to_model_input  # noqa: E402
from pipeline.eval.frozen import knn_top1, pooled_features  # noqa: E402
from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel  # noqa: E402
from pipeline.models.videomae.masking import make_mask  # noqa: E402

NUM_CLASSES = 4
STEPS, BATCH, LR, WARMUP = 1500, 32, 2e-3, 100


def decoded(root: str, split: str, mode: str, clips_per_video: int,
            config: VideoMAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 clips, labels) of a split, cut by the pipeline's ClipMaker as the demo's data section does."""
    section = DataSection(uri=root, split=split, num_frames=config.num_frames, sampling_rate=2,
                          image_size=config.image_size, patch_size=config.patch_size,
                          clips_per_video=clips_per_video, decode_isolation="inline", seed=0, hflip=False)
    maker = ClipMaker(section, mode, ErrorLedger.local())
    clips, labels = [], []
    for row in read_manifest(root, None, split):
        made = maker.clips(row)["pixel_values"]
        clips += made
        labels += [row["label"]] * len(made)
    return torch.stack(clips), torch.tensor(labels)


def knn(encoder: VideoMAEModel, bank: tuple, queries: tuple, config: VideoMAEConfig) -> float:
    encoder.eval()
    with torch.inference_mode():
        def features(clips: torch.Tensor) -> torch.Tensor:
            return torch.cat([pooled_features(encoder, to_model_input(clips[i : i + 64], config.image_mean,
                                                                      config.image_std))
                              for i in range(0, len(clips), 64)])

        return knn_top1(features(bank[0]), bank[1], features(queries[0]), queries[1], NUM_CLASSES)


def main(work: Path) -> None:
    data = make_dataset(str(work / "motion-4"), videos_per_class=150, num_frames=48, size=(64, 64), seed=7,
                        num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    config = VideoMAEConfig.from_preset("demo", use_mean_pooling=False)
    train, _ = decoded(data, "train", "pretrain", 4, config)
    bank = decoded(data, "train", "eval", 1, config)
    test = decoded(data, "test", "eval", 1, config)
    model = VideoMAEForPreTraining(config)
    random_init = knn(model.videomae, bank, test, config)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.05)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        batch = torch.from_numpy(rng.choice(len(train), BATCH, replace=False))
        masks = torch.from_numpy(np.stack([make_mask("tube", config.grid, 0.9, rng) for _ in range(BATCH)]))
        pixels = to_model_input(train[batch], config.image_mean, config.image_std)
        model(pixels, bool_masked_pos=masks).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}", flush=True)
    pretrained = knn(model.videomae, bank, test, config)
    print("RESULT " + json.dumps({"pretrained": pretrained, "random_init": random_init,
                                  "test_videos": len(test[1])}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
