"""One video -> its clip rows: decode, sample frames, crop, augment and mask (``ClipMaker``).

The one place a clip is made, for the training stream (pipeline/data/stream.py) and for the datasets
listed on the driver (pipeline/data/datasets.py) alike. Rows leave here as uint8; the trainer normalises.
The columns:

=================  ==========================  =========================================================
column             dtype, shape                present in
=================  ==========================  =========================================================
pixel_values       uint8 (T, H, W, C)          all (normalise on the trainer: ``transforms.to_model_input``)
bool_masked_pos    bool (N,)                   pretrain (N = T/tubelet * (S/patch)^2, True = masked)
labels             int64 ()                    finetune, eval
video              str (URI)                   all: the video's URI (training: named when a batch's loss is
                                               not finite, and in the audit; eval: the per-video results)
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
``to_model_input(batch["pixel_values"].to(device), cfg.mean, cfg.std)``. Rows of every mode carry the
string column ``video``, which Ray's default collation cannot convert: pass ``collate_fn=torch_collate``.

A ClipMaker runs inside the decode tasks of both (``decode_num_cpus`` each, at most ``decode_concurrency``
at once): it decodes each video (its own GET, or its bytes from a shard the task streams) once, only the
sampled frames, and makes ``clips_per_video`` clips of it. Bad videos are skipped and recorded in the
run's ``ErrorLedger`` (see errors.py); the dataset fails with ``ErrorBudgetExceeded`` only past
``max_error_fraction``.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections import Counter
from typing import Any

import numpy as np
import torch

from pipeline.cache import ProcessCache
from pipeline.data import transforms
from pipeline.data.decode import Decoder, DecodeSettings
from pipeline.data.errors import ErrorLedger, VideoError
from pipeline.data.randaugment import RandAugment, parse_spec
from pipeline.data.sampling import MultiViewSampler, make_sampler
from pipeline.data.section import MODES, DataSection
from pipeline.models.videomae.masking import make_mask, token_grid

log = logging.getLogger(__name__)
STREAM_COLUMNS = ("epoch", "position", "source", "clip")  # the training stream's (pipeline/data/stream.py)
INT_COLUMNS = ("labels", "clip_index", "crop_index", "video_row", *STREAM_COLUMNS)

_DECODERS: ProcessCache[Decoder] = ProcessCache(4)  # one decode helper serves every dataset of a process


def shared_decoder(limits: DecodeSettings, isolation: str) -> Decoder:
    return _DECODERS.get((limits, isolation), lambda: Decoder(limits, isolation))


class ClipMaker:
    """Turns one manifest row into a batch of clip rows (or none, recording why); used by every builder."""

    def __init__(self, cfg: DataSection, mode: str, ledger: ErrorLedger):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.mode, self.ledger = cfg, mode, ledger
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

    @property
    def decoder(self) -> Decoder:
        """This process's decode helper for these settings, looked up at each use: the cache may have
        closed an older one."""
        return shared_decoder(self.cfg.limits(), self.cfg.decode_isolation)

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


_MAKERS: ProcessCache[ClipMaker] = ProcessCache(8)  # per decode worker process, reused by its tasks


def clip_maker(cfg: DataSection, mode: str, ledger: ErrorLedger) -> ClipMaker:
    """This process's ClipMaker for (cfg, mode, ledger): its decode helper and sampler live on."""
    return _MAKERS.get((repr(cfg), mode, ledger.name), lambda: ClipMaker(cfg, mode, ledger))


def clips_of_block(block: dict[str, np.ndarray], cfg: DataSection, mode: str, ledger: ErrorLedger):
    maker = clip_maker(cfg, mode, ledger)
    rows = [dict(zip(block, values, strict=True)) for values in zip(*block.values(), strict=True)]
    merged: dict[str, list] = {}
    for made in (maker.clips(r) for r in rows):
        for key, values in (made or {}).items():
            merged.setdefault(key, []).extend(values)
    maker.flush_ok()  # counted before the block's clips reach the trainer
    return maker.to_batch(merged) if merged else maker.empty_batch()



def torch_collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """``iter_torch_batches(collate_fn=torch_collate)``: tensors, but string columns (eval's ``video``)
    as lists of str, which Ray's default collation cannot convert."""
    return {k: v.tolist() if v.dtype.kind in "OUS" else torch.as_tensor(v) for k, v in batch.items()}
