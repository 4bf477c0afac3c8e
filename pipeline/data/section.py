"""The ``data:`` section of every job's config: where the videos are, how clips are cut, decoded,
augmented and masked, and how the training stream reads its sources. Every field has a default."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data import transforms
from pipeline.data.decode import DecodeSettings
from pipeline.data.decoders import BACKENDS
from pipeline.data.randaugment import parse_spec
from pipeline.data.sources import source_specs
from pipeline.models.videomae.masking import token_grid

MODES = ("pretrain", "finetune", "eval")


@dataclass
class DataSection:
    # where the videos are
    uri: str = ""  # videos folder/prefix, or manifest (.csv .txt .json .jsonl .parquet); "" = sample data
    data_root: str | None = None  # relative manifest paths resolve here (default: the manifest's folder)
    split: str = "train"  # a folder holding <split>.csv uses that manifest (the sample dataset does)
    label_map: str | None = None  # SSv2 labels.json (template -> id) if not next to the manifest
    video_ext: str = ".webm"  # SSv2: video file suffix for the ids in the JSON
    sample_cache_dir: str = ".cache/sample-data"  # where uri="" generates the sample dataset (local runs)
    limit: int | None = None  # use only the first N videos of the manifest (smoke tests)
    # clips
    num_frames: int = 16  # frames per clip
    sampling_rate: int = 4  # stride between sampled frames (4 Kinetics-like, 2 SSv2-like)
    image_size: int = 224  # square output side
    clips_per_video: int = 1  # repeated sampling: clips cut from one decoded video (num_sample)
    clips_share_frames: bool = False  # True: those clips share one set of frames and differ in crop, flip and
    # mask, as the original's num_sample (decode cost of one clip); False: each its own random start
    finetune_sampling: str = "dense"  # dense (random start, fixed stride) | segment (TSN, for SSv2-like)
    pretrain_scales: tuple[float, ...] = transforms.PRETRAIN_SCALES  # multi-scale crop, short-side fractions
    finetune_crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop area fraction
    hflip: bool = True  # finetune: random horizontal flip; off when left/right matters (SSv2, sample data)
    rand_augment: str = ""  # finetune: timm-style RandAugment spec, e.g. rand-m7-n4-mstd0.5-inc1 ("" = off)
    random_erasing: float = 0.0  # finetune: chance each frame gets a noise box (VideoMAE's reprob 0.25);
    # applied on the trainer after normalisation (transforms.random_erasing)
    eval_num_clips: int = 1  # evaluation: temporal views per video (K400 protocol: 5 or 7)
    eval_num_crops: int = 1  # evaluation: spatial views per clip, 1 (centre) or 3
    eval_short_side: int | None = None  # evaluation: short side before cropping (None = image_size)
    # masks (pretraining); patch/tubelet must match the model config
    mask_type: str = "tube"  # tube | random
    mask_ratio: float = 0.9
    patch_size: int = 16
    tubelet_size: int = 2
    # normalisation, applied on the trainer by to_model_input
    mean: tuple[float, float, float] = transforms.IMAGENET_MEAN
    std: tuple[float, float, float] = transforms.IMAGENET_STD
    # decoding and robustness
    decode_num_cpus: float = 1.0  # CPUs reserved per decode task
    light_num_cpus: float = 0.25  # CPUs reserved per light task of the stream (expanding the epoch plan into
    # rows, cutting them into decode tasks, hashing pieces, counting shards, reading manifests): Ray's
    # default of 1 would need a whole free CPU beside the training workers (docs/cluster.md)
    decode_concurrency: int | None = None  # max decode tasks at once (None = as many as CPUs allow)
    decode_resources: dict[str, float] = field(default_factory=dict)  # custom resources per decode task,
    # e.g. {decode: 1} pins decoding to nodes that advertise a `decode` resource (infra/, docs/cluster.md)
    videos_per_block: int = 4  # videos per Ray Data block (one decode task handles a block)
    decoder: str = "auto"  # auto | decord | pyav | torchcodec; auto: the next one when one fails a video
    decode_device: str = "cpu"  # cpu | cuda (torchcodec on NVDEC, GPU decode nodes)
    decode_isolation: str = "process"  # process (hard time limit, survives decoder crashes) | inline
    decode_timeout_s: float = 60.0  # per-video decode limit (an S3 read retrying through an outage is
    # outside it: pipeline/storage.py, pipeline/data/decode.py)
    max_pixels: int = 4096 * 2160  # refuse larger frames (too_large) before decoding
    min_frames: int = 2  # refuse videos with fewer frames (too_short)
    max_error_fraction: float = 0.05  # fail when clearly more than this fraction of videos is bad ...
    min_videos_for_error_check: int = 20  # ... judged once at least this many have been tried
    # sources and order (training modes; pipeline/data/sources.py, plan.py, stream.py)
    sources: list = field(default_factory=list)  # a weighted mixture instead of uri: [{uri, weight, name,
    # data_root, split}, ...]; each epoch draws from them in proportion to the weights
    epoch_videos: int | None = None  # videos per epoch (default: every source's videos, once)
    piece_rows: int | None = None  # manifest rows per piece in the object store, the unit of the epoch
    # shuffle; None: about 1 MiB of rows (sources.PIECE_BYTES)
    group_pieces: int = 16  # pieces read (and shuffled together) by one task
    decode_task_videos: int | None = None  # videos per decode task of the stream; None: 64 to 2048,
    # about four tasks per CPU of the cluster per epoch
    shard_shuffle_buffer: int = 32  # videos held while streaming a shard, drawn from at random
    shuffle: bool = True  # shuffle video order every epoch (training modes)
    seed: int | None = None  # None: fresh randomness every epoch; an int makes sampling repeatable

    def validate(self) -> None:
        if self.sources:
            if self.uri:
                raise ValueError("set data.uri (one dataset) or data.sources (a mixture), not both")
            source_specs(self)  # raises naming the entry
        for name in ("piece_rows", "group_pieces", "decode_task_videos", "shard_shuffle_buffer"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epoch_videos is not None and self.epoch_videos < 1:
            raise ValueError(f"epoch_videos must be >= 1 (null: every video once), got {self.epoch_videos}")
        if self.rand_augment:
            parse_spec(self.rand_augment)  # raises naming the spec
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {self.random_erasing}")
        if self.decoder not in (*BACKENDS, "auto"):
            raise ValueError(f"decoder must be one of {[*BACKENDS, 'auto']}, got {self.decoder!r}")
        if self.decode_device not in ("cpu", "cuda"):
            raise ValueError(f"decode_device must be 'cpu' or 'cuda', got {self.decode_device!r}")
        for name in ("decode_num_cpus", "light_num_cpus"):
            if not 0 < getattr(self, name) <= 1024:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        bad = {k: v for k, v in self.decode_resources.items() if not isinstance(v, int | float) or v <= 0}
        if bad:
            raise ValueError(f"decode_resources must map resource names to amounts > 0, got {bad}")

    def limits(self) -> DecodeSettings:
        return DecodeSettings(self.decode_timeout_s, self.max_pixels, self.min_frames, decoder=self.decoder,
                              device=self.decode_device)

    def num_tokens(self) -> int:
        t, h, w = token_grid(self.num_frames, self.image_size, self.patch_size, self.tubelet_size)
        return t * h * w

