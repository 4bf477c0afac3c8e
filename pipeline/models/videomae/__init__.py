"""The VideoMAE model family, state-dict and config.json compatible with transformers' classes."""

from .configuration import VideoMAEConfig
from .modeling import (
    CheckpointError,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
    VideoMAEModel,
    VideoMAEPreTrainedModel,
)
from .processing import VideoMAEFeatureExtractor, VideoMAEImageProcessor  # noqa: F401 - re-exported

__all__ = [
    "CheckpointError",
    "VideoMAEConfig",
    "VideoMAEForPreTraining",
    "VideoMAEForVideoClassification",
    "VideoMAEModel",
    "VideoMAEPreTrainedModel",
]
