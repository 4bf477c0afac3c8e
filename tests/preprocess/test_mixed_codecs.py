"""A folder mixing H.264, HEVC (open GOP, as x265 writes it), VP9 and AV1: it pretrains with the default
decoder and preprocesses for any training decoder, and no video is lost to its codec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.codec_videos import CODECS, OPEN_GOP, write_codec_video
from mlflow.tracking import MlflowClient

from pipeline import config as C
from pipeline.data import decoders
from pipeline.data.manifest import read_manifest
from pipeline.data.section import DataSection
from pipeline.preprocess.job import PreprocessConfig, run
from pipeline.preprocess.transcode import unreadable_by
from pipeline.train.pretrain import PretrainConfig, run_pretrain

pytestmark = pytest.mark.integration

MIX = ("h264", "hevc", "vp9", "av1")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    for codec in MIX:
        for i in range(2):
            write_codec_video(root / codec / f"{codec}_{i}.{CODECS[codec][0]}", codec, frames=40 + 8 * i)
    return root


def test_a_mixed_codec_folder_pretrains_with_the_default_decoder_and_loses_nothing(
    mixed_folder, tmp_path, ray_session
):
    assert DataSection().decoder == "auto"  # the default
    sets = {
        "run_name": "mixed-codecs", "storage_path": str(tmp_path / "runs"), "data.uri": str(mixed_folder),
        "data.clips_per_video": "2", "train.batch_size": "2", "train.max_steps": "8",
        "train.log_every_steps": "4", "checkpoint.every_steps": "8", "scaling.num_workers": "1",
        "scaling.cpus_per_worker": "1", "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "test-codecs", "tracking.recon_every_steps": "0",
    }  # fmt: skip
    result = run_pretrain(C.load(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()]))
    assert result.final_step == 8
    assert Path(result.error_report_uri).read_text() == ""  # no bad video, for any reason
    metrics = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    assert metrics["data/errors_total"] == 0 and metrics["data/videos_total"] >= 8
    read_by = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("data/decoded_by_total/")}
    assert read_by.get("pyav", 0) >= 2, read_by  # at least the open-GOP HEVC videos, which decord refuses
    # the videos another decoder read are named, with why the first could not
    fallbacks = [json.loads(line) for line in
                 (Path(result.run_dir) / "data_errors_fallbacks.jsonl").read_text().splitlines()]
    assert {Path(f["uri"]).parent.name for f in fallbacks} >= {"hevc"}
    assert all(f["failed"][0].startswith("decord: ") for f in fallbacks)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_preprocessing_points_the_manifest_only_at_videos_the_training_decoder_reads(
    mixed_folder, tmp_path, ray_session, decoder
):
    """Probe-only preprocessing: a video the training decoder cannot read exactly (open GOPs in decord, AV1
    in decord 0.6) gets an H.264 copy, and the manifest points there; every other video stays as it is."""
    out = tmp_path / "out"
    report = run(PreprocessConfig(input=str(mixed_folder), output=str(out), transcode=False, decoder=decoder,
                                  workers=2))
    assert report["status_counts"] == {"ok": 2 * len(MIX)}
    rows = read_manifest(str(out / "manifest.parquet"))
    assert len(rows) == 2 * len(MIX)
    for row in rows:
        original = next(mixed_folder.rglob(Path(row["path"]).stem + ".*"))
        needs_copy = unreadable_by(decoder, original.read_bytes()) is not None
        assert needs_copy == (row["path"] != str(original)), row
        assert unreadable_by(decoder, Path(row["path"]).read_bytes()) is None, row["path"]
        if decoder == "decord" and original.parent.name in OPEN_GOP:
            assert needs_copy, f"decord cannot seek {original.name} exactly, so it needs a copy"
        if decoder == "pyav":
            assert not needs_copy, "PyAV reads every codec of the mix"
    assert decoders.candidates(decoder) == [decoder]
