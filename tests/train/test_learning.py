"""It learns, honestly: masked video reconstruction gives an encoder whose frozen features tell held-out
videos apart by their motion, far better than the same encoder at its random init.

The pretraining is the demo's model and recipe (the ``demo`` preset, tube masks at 0.9, AdamW at 2e-3 after
a warmup, 32 clips a step) on 4 direction classes, run in this process on clips decoded once by the
pipeline's own ClipMaker: the model, masking and loss are what is tested here, in about two minutes.
That the whole job (Ray Data, Ray Train DDP, the probe job) gives the same gain is
benchmarks/sample_efficiency.py's claim, over seeds and with finetuning. The step count was chosen on the
validation split; the score is taken on the test split. The bar is not a fixed figure but a margin no
broken pretraining reaches: 2.5 standard errors of the difference between two kNN top-1 scores on the
test split if the pretraining had taught nothing (both at chance).
"""

import math

import numpy as np
import pytest
import torch

from pipeline.data.clips import ClipMaker
from pipeline.data.errors import ErrorLedger
from pipeline.data.manifest import read_manifest
from pipeline.data.section import DataSection
from pipeline.data.synthetic import make_dataset
from pipeline.data.transforms import to_model_input
from pipeline.eval.frozen import knn_top1, pooled_features
from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel
from pipeline.models.videomae.masking import make_mask

NUM_CLASSES = 4
STEPS, BATCH, LR, WARMUP = 1500, 32, 2e-3, 100


@pytest.fixture(scope="module")
def motion_data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("motion-4")
    return make_dataset(str(root), videos_per_class=150, num_frames=48, size=(64, 64), seed=7,
                        num_classes=NUM_CLASSES)


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


def test_pretrained_features_beat_the_random_init_on_held_out_videos(motion_data):
    torch.manual_seed(0)
    config = VideoMAEConfig.from_preset("demo", use_mean_pooling=False)
    train, _ = decoded(motion_data, "train", "pretrain", 4, config)
    bank = decoded(motion_data, "train", "eval", 1, config)
    test = decoded(motion_data, "test", "eval", 1, config)
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
    pretrained = knn(model.videomae, bank, test, config)

    chance = 1 / NUM_CLASSES
    margin = 2.5 * math.sqrt(2 * chance * (1 - chance) / len(test[1]))
    print({"pretrained": pretrained, "random init": random_init, "test videos": len(test[1]),
           "margin": margin})
    assert pretrained - random_init >= margin, (pretrained, random_init)
    assert pretrained >= chance + margin
