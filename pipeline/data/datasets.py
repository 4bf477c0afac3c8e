"""Ray Data builders: manifest -> decode -> sample -> augment -> mask, streamed to Ray Train workers.

``DataConfig`` holds every data setting with a default; the training job composes it into its config.
The builders return a *streaming* ``ray.data.Dataset`` (nothing is materialised) of clip rows:

=================  ==========================  =========================================================
column             dtype, shape                present in
=================  ==========================  =========================================================
pixel_values       uint8 (T, H, W, C)          all (normalise on the trainer: ``transforms.to_model_input``)
bool_masked_pos    bool (N,)                   pretrain (N = T/tubelet * (S/patch)^2, True = masked)
labels             int64 ()                    finetune, eval
video              str (URI)                   eval
clip_index         int64 ()                    eval: temporal view 0..eval_num_clips-1
crop_index         int64 ()                    eval: spatial view 0..eval_num_crops-1
video_row          int64 ()                    eval: the video's row in the manifest (views are grouped by
                                               it: one file listed with several start/end windows is
                                               several videos)
epoch, position,   int64 ()                    the training stream's (pipeline/data/stream.py): where in
source, clip                                   the epoch plan the video is, which source it came from,
                                               which of its clips_per_video clips this is
=================  ==========================  =========================================================

A Ray Train worker consumes it with
``ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B)`` and calls
``to_model_input(batch["pixel_values"].to(device), cfg.mean, cfg.std)``. Eval rows carry a string column:
pass ``collate_fn=torch_collate`` there.

Decoding runs in Ray tasks (``decode_num_cpus`` each, at most ``decode_concurrency`` at once); each task
reads one video per GET, decodes only the sampled frames once, and makes ``clips_per_video`` clips of it.
Bad videos are skipped and recorded in the run's ``ErrorLedger`` (see errors.py); the dataset fails with
``ErrorBudgetExceeded`` only past ``max_error_fraction``.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.data import manifest, transforms
from pipeline.data.decode import Decoder, DecodeSettings
from pipeline.data.decoders import BACKENDS
from pipeline.data.errors import ErrorLedger, VideoError
from pipeline.data.randaugment import RandAugment, parse_spec
from pipeline.data.sampling import MultiViewSampler, make_sampler
from pipeline.models.videomae.masking import make_mask, token_grid

log = logging.getLogger(__name__)
MODES = ("pretrain", "finetune", "eval")
STREAM_COLUMNS = ("epoch", "position", "source", "clip")  # the training stream's (pipeline/data/stream.py)
INT_COLUMNS = ("labels", "clip_index", "crop_index", "video_row", *STREAM_COLUMNS)


@dataclass
class DataConfig:
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
    decode_timeout_s: float = 60.0  # per-video decode limit (reads retry through outages: storage.py)
    max_pixels: int = 4096 * 2160  # refuse larger frames (too_large) before decoding
    min_frames: int = 2  # refuse videos with fewer frames (too_short)
    max_error_fraction: float = 0.05  # fail when clearly more than this fraction of videos is bad ...
    min_videos_for_error_check: int = 20  # ... judged once at least this many have been tried
    # sources and order (training modes; pipeline/data/stream.py)
    sources: list = field(default_factory=list)  # a weighted mixture instead of uri: [{uri, weight, name,
    # data_root, split}, ...]; each epoch draws from them in proportion to the weights
    epoch_videos: int | None = None  # videos per epoch (default: every source's videos, once)
    piece_rows: int | None = None  # manifest rows per piece in the object store, the unit of the epoch
    # shuffle; None: about 1 MiB of rows (stream.PIECE_BYTES)
    group_pieces: int = 16  # pieces read (and shuffled together) by one task
    decode_task_videos: int | None = None  # videos per decode task of the stream; None: 64 to 2048,
    # about four tasks per CPU of the cluster per epoch
    shard_shuffle_buffer: int = 32  # videos held while streaming a shard, drawn from at random
    shuffle: bool = True  # shuffle video order every epoch (training modes)
    seed: int | None = None  # None: fresh randomness every epoch; an int makes sampling repeatable

    def validate(self) -> None:
        if self.sources:
            from pipeline.data.stream import source_specs

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


def resolve_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """The manifest rows of ``cfg`` (generating the sample dataset when ``uri`` is empty)."""
    uri = cfg.uri
    if not uri:
        from pipeline.data.synthetic import ensure_sample_dataset

        uri = ensure_sample_dataset(cfg.sample_cache_dir)
    rows = manifest.read_manifest(uri, cfg.data_root, cfg.split, cfg.label_map, cfg.video_ext)
    return rows[: cfg.limit] if cfg.limit else rows


_DECODERS: dict[tuple, Decoder] = {}  # per worker process: one decode helper serves every dataset


def shared_decoder(limits: DecodeSettings, isolation: str) -> Decoder:
    key = (limits, isolation)
    if key not in _DECODERS:
        _DECODERS[key] = Decoder(limits, isolation)
    return _DECODERS[key]


class ClipMaker:
    """Turns one manifest row into a batch of clip rows (or none, recording why); used by every builder."""

    def __init__(self, cfg: DataConfig, mode: str, ledger: ErrorLedger):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.mode, self.ledger = cfg, mode, ledger
        self.decoder = shared_decoder(cfg.limits(), cfg.decode_isolation)
        if mode == "eval":
            self.sampler = MultiViewSampler(
                cfg.num_frames, cfg.sampling_rate, cfg.eval_num_clips, cfg.finetune_sampling
            )
        else:
            sampling = cfg.finetune_sampling if mode == "finetune" else "dense"
            self.sampler = make_sampler(
                sampling, cfg.num_frames, cfg.sampling_rate, cfg.clips_per_video, cfg.clips_share_frames
            )
        self.grid = token_grid(cfg.num_frames, cfg.image_size, cfg.patch_size, cfg.tubelet_size)
        self.rand_augment = RandAugment(parse_spec(cfg.rand_augment)) if cfg.rand_augment else None
        self._ok: Counter[str] = Counter()  # decoded videos by backend, not yet reported to the ledger
        self._fallbacks: list[dict] = []  # videos a later decoder read after the first failed

    def _rng(self, path: str, epoch: int = 0, position: int = -1) -> np.random.Generator:
        """Per video, epoch and position in the epoch: a seeded run cuts other clips, crops and masks every
        epoch, and a video listed twice in an epoch (an up-weighted small source) gets two different cuts."""
        if self.cfg.seed is None and self.mode != "eval":
            return np.random.default_rng()
        key = [self.cfg.seed or 0, zlib.crc32(path.encode()), epoch]
        return np.random.default_rng(key if position < 0 else [*key, position])

    def flush_ok(self) -> None:
        """Report the videos decoded since the last flush (one round trip per block, not per video)."""
        if self._ok:
            self.ledger.record_ok(sum(self._ok.values()), wait=True, by_backend=dict(self._ok),
                                  fallbacks=self._fallbacks)
            self._ok, self._fallbacks = Counter(), []

    def clips(self, row: dict[str, Any]) -> dict[str, list] | None:
        """The clip rows of one video as lists per column (uint8 tensors for pixels), or None."""
        path = row["path"]
        rng = self._rng(path, int(row.get("epoch", 0)), int(row.get("position", -1)))
        try:
            window = (row.get("start", -1.0), row.get("end", -1.0))
            video = self.decoder.decode(path, self.sampler, int(rng.integers(2**31)), window, row.get("data"))
        except VideoError as e:
            log.warning("skipping video %s", e)
            self.flush_ok()  # the budget check must see every success so far
            snap = self.ledger.record(e.uri, e.reason, e.detail)
            self.ledger.check(self.cfg.max_error_fraction, self.cfg.min_videos_for_error_check, snap, z=3.0)
            return None
        self._ok[video.backend] += 1
        if video.fallback_from:
            self._fallbacks.append({"uri": path, "backend": video.backend,
                                    "failed": list(video.fallback_from)})
        size = (self.cfg.image_size, self.cfg.image_size)
        with warnings.catch_warnings():  # read-only frames (decord's or the shared buffer): we only read
            warnings.simplefilter("ignore", UserWarning)
            frames = torch.from_numpy(video.frames)  # (U, H, W, C)
        _, h, w, _ = frames.shape
        out: dict[str, list] = {"pixel_values": []}
        for i, positions in enumerate(video.clips):
            index = torch.from_numpy(positions)
            if self.mode == "pretrain":
                top, left, ch, cw = transforms.multi_scale_crop_box(
                    h, w, self.cfg.image_size, rng, self.cfg.pretrain_scales
                )
                clip = frames[index, top : top + ch, left : left + cw]  # gathers only the crop: a copy
                out["pixel_values"].append(transforms.resize(clip, size))
                mask = make_mask(self.cfg.mask_type, self.grid, self.cfg.mask_ratio, rng)
                out.setdefault("bool_masked_pos", []).append(mask)
                out.setdefault("video", []).append(path)  # named when a batch's loss is not finite
            elif self.mode == "finetune":
                top, left, ch, cw = transforms.random_resized_crop_box(
                    h, w, rng, self.cfg.finetune_crop_scale
                )
                clip = transforms.resize(frames[index, top : top + ch, left : left + cw], size)
                if self.cfg.hflip and rng.random() < 0.5:
                    clip = transforms.hflip(clip).contiguous()
                if self.rand_augment is not None:
                    clip = self.rand_augment(clip, rng)
                out["pixel_values"].append(clip)
                out.setdefault("labels", []).append(row["label"])
                out.setdefault("video", []).append(path)
            else:
                short = transforms.short_side_resize(
                    frames[index], self.cfg.eval_short_side or self.cfg.image_size
                )
                crops = transforms.spatial_crops(short, self.cfg.image_size, self.cfg.eval_num_crops)
                if crops[0].shape[1:3] != size:  # eval_short_side < image_size would leave small crops
                    crops = [transforms.resize(c, size) for c in crops]
                for j, c in enumerate(crops):
                    out["pixel_values"].append(c)
                    out.setdefault("labels", []).append(row["label"])
                    out.setdefault("video", []).append(path)
                    out.setdefault("clip_index", []).append(i)
                    out.setdefault("crop_index", []).append(j)
                    out.setdefault("video_row", []).append(int(row.get("row", -1)))
        if "position" in row:  # the training stream's: which video of which epoch (exact resume)
            n = len(out["pixel_values"])
            for key in ("epoch", "position", "source"):
                out[key] = [int(row[key])] * n
            out["clip"] = list(range(n))  # which of the video's clips (exact resume, the audit)
            trained = int(row.get("clips_done", 0))
            if trained:  # a resumed epoch: the clips of this video trained before the checkpoint are not made
                keep = [i for i in range(n) if not trained >> i & 1]
                if not keep:
                    return None
                out = {key: [values[i] for i in keep] for key, values in out.items()}
        return out

    @staticmethod
    def to_batch(out: dict[str, list]) -> dict[str, np.ndarray]:
        """Lists per column -> arrays; the pixels are copied once, into one (N, T, H, W, C) array."""
        batch = {"pixel_values": torch.stack(out["pixel_values"]).numpy()}
        for key, values in out.items():
            if key != "pixel_values":
                dtype = np.int64 if key in INT_COLUMNS else None
                batch[key] = np.asarray(values, dtype=dtype)
        return batch

    def empty_batch(self, streamed: bool = False) -> dict[str, np.ndarray]:
        """No clips, with the columns the clips would have (``streamed``: the training stream's)."""
        t, s = self.cfg.num_frames, self.cfg.image_size
        batch = {"pixel_values": np.zeros((0, t, s, s, 3), np.uint8), "video": np.zeros((0,), object)}
        if self.mode == "pretrain":
            batch["bool_masked_pos"] = np.zeros((0, self.cfg.num_tokens()), bool)
        else:
            batch["labels"] = np.zeros((0,), np.int64)
        if self.mode == "eval":
            batch.update(
                clip_index=np.zeros((0,), np.int64),
                crop_index=np.zeros((0,), np.int64),
                video_row=np.zeros((0,), np.int64),
            )
        if streamed:
            batch.update({key: np.zeros((0,), np.int64) for key in STREAM_COLUMNS})
        return batch


_MAKERS: dict[tuple, ClipMaker] = {}  # per decode worker process, reused by the tasks it runs


def clip_maker(cfg: DataConfig, mode: str, ledger: ErrorLedger) -> ClipMaker:
    """This process's ClipMaker for (cfg, mode, ledger): its decode helper and sampler live on."""
    key = (repr(cfg), mode, ledger.name)
    if key not in _MAKERS:
        _MAKERS[key] = ClipMaker(cfg, mode, ledger)
    return _MAKERS[key]


def _clips_of_block(block: dict[str, np.ndarray], cfg: DataConfig, mode: str, ledger: ErrorLedger):
    maker = clip_maker(cfg, mode, ledger)
    rows = [dict(zip(block, values, strict=True)) for values in zip(*block.values(), strict=True)]
    merged: dict[str, list] = {}
    for made in (maker.clips(r) for r in rows):
        for key, values in (made or {}).items():
            merged.setdefault(key, []).extend(values)
    maker.flush_ok()  # counted before the block's clips reach the trainer
    return maker.to_batch(merged) if merged else maker.empty_batch()


def build_dataset(
    cfg: DataConfig,
    mode: str,
    ledger: ErrorLedger | None = None,
    run_name: str | None = None,
    rows: list[dict[str, Any]] | None = None,
):
    """A streaming ``ray.data.Dataset`` of clip rows for ``mode`` (pretrain | finetune | eval)."""
    import ray

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if rows is None:
        rows = resolve_rows(cfg)
    if mode != "pretrain" and any(r["label"] < 0 for r in rows):
        missing = next(r["path"] for r in rows if r["label"] < 0)
        raise manifest.ManifestError(f"{mode} needs labels, but e.g. {missing} has none (uri={cfg.uri!r})")
    if ledger is None:
        ledger = ErrorLedger.get_or_create(run_name) if run_name else ErrorLedger.create("data")
    keys = ("path", "label", "start", "end")
    items = [{**{k: r.get(k, -1.0) for k in keys}, "row": i} for i, r in enumerate(rows)]
    shuffle = cfg.shuffle and mode != "eval"
    if shuffle:  # shuffle videos once here, and the order of the small blocks every epoch below
        random.Random(cfg.seed).shuffle(items)
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.videos_per_block)))
    if shuffle:
        ds = ds.randomize_block_order(seed=cfg.seed)
    return ds.map_batches(
        _clips_of_block,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"cfg": cfg, "mode": mode, "ledger": ledger},
        num_cpus=cfg.decode_num_cpus,
        resources=cfg.decode_resources or None,
        compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
    )


def torch_collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """``iter_torch_batches(collate_fn=torch_collate)``: tensors, but string columns (eval's ``video``)
    as lists of str, which Ray's default collation cannot convert."""
    return {k: v.tolist() if v.dtype.kind in "OUS" else torch.as_tensor(v) for k, v in batch.items()}
