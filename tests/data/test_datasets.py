"""The row contract of the pretrain / finetune / eval paths, locally and through Ray Data."""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from helpers.configs import tiny_data

from pipeline.data.clips import ClipMaker, torch_collate
from pipeline.data.datasets import build_dataset, resolve_rows
from pipeline.data.decode import read_and_decode
from pipeline.data.errors import ErrorLedger
from pipeline.data.sampling import DenseSampler
from pipeline.data.section import DataSection
from pipeline.data.transforms import to_model_input


def tiny(sample_videos, **kw) -> DataSection:
    return tiny_data(**{"uri": str(sample_videos), **kw})


def clip_batch(cfg: DataSection, mode: str, row: dict, ledger: ErrorLedger) -> dict:
    """What a decode task returns for one video: its clip rows as arrays, the ledger told."""
    maker = ClipMaker(cfg, mode, ledger)
    out = maker.clips(row)
    maker.flush_ok()
    return maker.to_batch(out)


def test_pretrain_rows(sample_videos):
    cfg = tiny(sample_videos, clips_per_video=3)
    ledger = ErrorLedger.local()
    batch = clip_batch(cfg, "pretrain", resolve_rows(cfg)[0], ledger)
    assert set(batch) == {"pixel_values", "bool_masked_pos", "video"}
    assert list(batch["video"]) == [resolve_rows(cfg)[0]["path"]] * 3  # named if its loss is not finite
    assert batch["pixel_values"].shape == (3, 4, 32, 32, 3) and batch["pixel_values"].dtype == np.uint8
    mask = batch["bool_masked_pos"]
    assert mask.shape == (3, 2 * 4 * 4) and mask.dtype == bool
    assert (mask.sum(1) == 2 * int(0.75 * 16)).all()  # tube: 12 of 16 per time slice
    assert (mask[:, :16] == mask[:, 16:]).all()  # the same spatial pattern in every slice
    assert not (mask[0] == mask[1]).all() or not (mask[1] == mask[2]).all()  # one mask per clip
    assert ledger.snapshot()["ok"] == 1


def test_finetune_and_eval_rows(sample_videos):
    cfg = tiny(sample_videos, split="val", eval_num_clips=2, eval_num_crops=3, finetune_sampling="segment")
    row = resolve_rows(cfg)[5]
    ft = clip_batch(cfg, "finetune", row, ErrorLedger.local())
    assert ft["pixel_values"].shape == (1, 4, 32, 32, 3) and ft["labels"].tolist() == [row["label"]]
    ev = clip_batch(cfg, "eval", row, ErrorLedger.local())
    assert ev["pixel_values"].shape == (6, 4, 32, 32, 3)
    assert ev["clip_index"].tolist() == [0, 0, 0, 1, 1, 1] and ev["crop_index"].tolist() == [0, 1, 2] * 2
    assert set(ev["video"].tolist()) == {row["path"]} and (ev["labels"] == row["label"]).all()
    again = clip_batch(cfg, "eval", row, ErrorLedger.local())  # evaluation is deterministic
    np.testing.assert_array_equal(ev["pixel_values"], again["pixel_values"])
    strong = dataclasses.replace(cfg, rand_augment="rand-m9-n4-p1.0")  # 4 operations, always applied
    augmented = clip_batch(strong, "finetune", row, ErrorLedger.local())
    assert augmented["pixel_values"].shape == ft["pixel_values"].shape
    assert augmented["pixel_values"].dtype == np.uint8
    assert not np.array_equal(augmented["pixel_values"], ft["pixel_values"])  # same seed, same crop


def test_clips_sharing_frames_decode_one_clip_and_differ_in_crop_and_mask(sample_videos):
    row = resolve_rows(tiny(sample_videos))[0]
    for mode in ("pretrain", "finetune"):
        maker = ClipMaker(tiny(sample_videos, clips_per_video=4, clips_share_frames=True), mode,
                          ErrorLedger.local())  # fmt: skip
        video = maker.decoder.decode(row["path"], maker.sampler, 0)
        assert video.frames.shape[0] == 4  # the union of 4 clips' frames is one clip's 4 frames
        pixels = maker.to_batch(maker.clips(row))["pixel_values"]
        assert pixels.shape[0] == 4 and len({p.tobytes() for p in pixels}) > 1  # own crop per clip
    maker = ClipMaker(tiny(sample_videos, clips_per_video=4, clips_share_frames=True), "pretrain",
                      ErrorLedger.local())  # fmt: skip
    masks = maker.to_batch(maker.clips(row))["bool_masked_pos"]
    assert masks.shape[0] == 4 and len({m.tobytes() for m in masks}) > 1  # own mask per clip


def test_labels_are_required_outside_pretraining(sample_videos):
    from pipeline.data.manifest import ManifestError

    with pytest.raises(ManifestError, match="needs labels"):
        build_dataset(tiny(sample_videos, uri=str(sample_videos / "videos")), "finetune", ErrorLedger.local())


def test_time_window_limits_the_frames(tmp_path):
    buf = io.BytesIO()  # frame i has intensity 10 * i, 25 fps
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt, s.options = 32, 32, "yuv420p", {"qp": "0"}
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (tmp_path / "v.mp4").write_bytes(buf.getvalue())
    video = read_and_decode(str(tmp_path / "v.mp4"), DenseSampler(8, 1, clips=5), 0, window=(0.2, 0.4))
    for i in range(5):
        values = video.frames[video.clips[i]][:, 0, 0, 0].astype(int)
        assert values.min() >= 45 and values.max() <= 105  # frames 5..10 only, last frame repeated


@pytest.mark.integration
def test_ray_builders_stream_the_row_contract(ray_session, sample_videos):
    cfg = tiny(sample_videos, clips_per_video=2, decode_isolation="process", decode_concurrency=2,
               decode_resources={"decode": 1})  # the session's Ray advertises 2, as a decode node would
    ds = build_dataset(cfg, "pretrain", run_name="test-builders")
    batches = list(ds.iter_torch_batches(batch_size=4, collate_fn=torch_collate))
    assert sum(len(b["pixel_values"]) for b in batches) == 2 * 8
    first = batches[0]
    assert first["pixel_values"].dtype == torch.uint8 and first["bool_masked_pos"].dtype == torch.bool
    assert to_model_input(first["pixel_values"], cfg.mean, cfg.std).shape == (4, 4, 3, 32, 32)

    ft = build_dataset(tiny(sample_videos, hflip=False), "finetune", run_name="test-builders")
    labels = torch.cat([b["labels"] for b in ft.iter_torch_batches(batch_size=8, collate_fn=torch_collate)])
    assert sorted(labels.tolist()) == list(range(8))

    ev = build_dataset(tiny(sample_videos, split="test", eval_num_clips=2), "eval", run_name="test-builders")
    rows = [b for b in ev.iter_torch_batches(batch_size=5, collate_fn=torch_collate)]
    videos = [v for b in rows for v in b["video"]]
    assert len(videos) == 16 and len(set(videos)) == 8 and isinstance(videos[0], str)
    assert ErrorLedger.get("test-builders").snapshot() == {
        "videos": 24,
        "ok": 24,
        "errors": 0,
        "error_fraction": 0.0,
        "by_reason": {},
        "by_backend": {"decord": 24},  # auto's first backend at this size read every video
    }


def test_a_video_repeated_within_an_epoch_gets_different_cuts_and_resumes_its_missing_clips(sample_videos):
    """With data.seed, a video's clips, crops and masks are drawn per (video, epoch, position): an
    up-weighted source repeats a video within an epoch, and each repetition is its own sample. A resumed
    epoch asks for the clips of a begun video not yet trained (clips_done), and gets exactly those."""
    cfg = tiny(sample_videos, clips_per_video=3)
    row = {**resolve_rows(cfg)[0], "epoch": 2, "source": 0}
    first = clip_batch(cfg, "pretrain", {**row, "position": 4}, ErrorLedger.local())
    again = clip_batch(cfg, "pretrain", {**row, "position": 4}, ErrorLedger.local())
    other = clip_batch(cfg, "pretrain", {**row, "position": 11}, ErrorLedger.local())
    np.testing.assert_array_equal(first["pixel_values"], again["pixel_values"])  # seeded: repeatable
    assert not np.array_equal(first["bool_masked_pos"], other["bool_masked_pos"])
    assert first["clip"].tolist() == [0, 1, 2] and first["position"].tolist() == [4, 4, 4]
    rest = clip_batch(cfg, "pretrain", {**row, "position": 4, "clips_done": 0b101}, ErrorLedger.local())
    assert rest["clip"].tolist() == [1]
    np.testing.assert_array_equal(rest["pixel_values"][0], first["pixel_values"][1])  # the same clip 1
    maker = ClipMaker(cfg, "pretrain", ErrorLedger.local())
    assert maker.clips({**row, "position": 4, "clips_done": 0b111}) is None
