"""Frozen-feature probes: what an encoder's features already know about the labels, without training it.

A pretrained encoder is only worth its compute if its features carry what the labels need. Two probes,
both on the mean over tokens of the encoder's last hidden state (after its final LayerNorm when the
model has one, as a pretraining encoder does):

- ``knn_top1``: weighted k-nearest-neighbour vote (cosine similarity, k = 20, votes weighted by
  ``exp(similarity / 0.07)``), the monitor of DINO (Caron et al. 2021). No parameters, no tuning: cheap
  enough to run inside a pretraining job (pipeline/train/probe_monitor.py).
- ``linear_probe_top1``: multinomial logistic regression on standardised features, its weight decay
  chosen on a held-out fifth of the *training* features (never on the test set), then refit on all.

Embedding runs as Ray Data batch inference (``embed_views``): decode tasks make the views, a pool of
``ViewEmbedder`` actors loads the encoder once each and returns one vector per view; the driver averages
the views of each video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.eval.inference import ViewModel, map_views
from pipeline.eval.metrics import ViewAccumulator
from pipeline.models.videomae import VideoMAEConfig, VideoMAEModel
from pipeline.models.weights import model_dir

KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class KnnSection:
    k: int = KNN_K
    temperature: float = KNN_TEMPERATURE

    def validate(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(f"knn.k must be >= 1 and knn.temperature > 0, got {self.k}, {self.temperature}")


def pooled_features(encoder: VideoMAEModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) normalised clips -> (B, D): the mean over all tokens of the last hidden state."""
    return encoder(pixel_values).last_hidden_state.mean(1)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 of a weighted kNN vote: each query takes its ``k`` most cosine-similar bank features, each
    voting for its label with weight ``exp(similarity / temperature)``."""
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError(f"kNN needs features on both sides, got {len(bank)} bank and {len(queries)} queries")
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    similarity, index = (queries @ bank.T).topk(min(k, len(bank)), dim=1)  # (Q, k)
    votes = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, bank_labels.long()[index], (similarity.double() / temperature).exp())
    return (votes.argmax(1) == query_labels.long()).double().mean().item()


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float) -> torch.Tensor:
    """(D + 1, K) weights of an L2-regularised softmax regression, fitted by L-BFGS (deterministic)."""
    x = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), 1)
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w, y) + weight_decay * w[:-1].pow(2).sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def _logistic_top1(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), 1) @ w
    return (logits.argmax(1) == y).double().mean().item()


def linear_probe_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = LINEAR_WEIGHT_DECAYS,
    seed: int = 0,
) -> tuple[float, float]:
    """(test top-1, chosen weight decay) of a linear classifier on frozen features.

    Features are standardised with the training statistics; the weight decay is the one with the best
    top-1 on a random fifth of the training features held out from a fit on the rest.
    """
    train, test = train.double(), test.double()
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    y, y_test = train_labels.long(), test_labels.long()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held, fit = order[: len(train) // 5], order[len(train) // 5 :]
    best = weight_decays[0]
    if len(held) and len(weight_decays) > 1:
        scores = [
            _logistic_top1(_fit_logistic(train[fit], y[fit], num_classes, wd), train[held], y[held])
            for wd in weight_decays
        ]
        best = weight_decays[int(np.argmax(scores))]  # ties: the smallest weight decay
    w = _fit_logistic(train, y, num_classes, best)
    return _logistic_top1(w, test, y_test), best


def load_encoder(model_dir: str) -> VideoMAEModel:
    """The encoder of any VideoMAE model folder (pretraining, encoder or classifier checkpoint), with the
    final LayerNorm when its config has one; heads are dropped."""
    config = VideoMAEConfig.from_pretrained(model_dir)
    return VideoMAEModel.from_pretrained(model_dir, config=config).eval()


class ViewEmbedder(ViewModel):
    """Ray Data callable class: the encoder at ``model_uri`` (anything ``weights.model_dir`` reads, local or
    s3://), loaded once per actor, turns batches of views into pooled features."""

    def __init__(self, model_uri: str, mean: Sequence[float], std: Sequence[float], use_gpu: bool = False,
                 convert: dict[str, Any] | None = None):
        super().__init__(mean, std, use_gpu)
        self.encoder = load_encoder(str(model_dir(model_uri, convert))).to(self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = pooled_features(self.encoder, self.inputs(batch))
        return {
            "video": batch["video"],
            "labels": batch["labels"],
            "video_row": batch["video_row"],
            "features": features.float().cpu().numpy(),
        }


def embed_views(
    dataset: Any,
    model_uri: str,
    feature_dim: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 16,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    convert: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features (V, D), labels (V,), video URIs) for the videos of an eval-mode ``dataset``: the mean
    feature of each video's views."""

    embedded = map_views(dataset, ViewEmbedder,
                         {"model_uri": model_uri, "mean": mean, "std": std, "convert": convert},
                         batch_size, num_actors, cpus_per_actor, gpus_per_actor)
    views = ViewAccumulator(feature_dim)  # sums any per-view vector per video; here features, not scores
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        views.add([str(v) for v in batch["video"]], batch["labels"], batch["features"], batch["video_row"])
    result = views.result()
    return torch.from_numpy(result.probs).float(), torch.from_numpy(result.labels), result.videos
