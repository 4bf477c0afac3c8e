"""The probe job on real videos through Ray Data: its kNN equals the in-process computation on the same
views, results land in probe.json and MLflow, a random init is probed as the baseline, bad input fails
before Ray work starts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config as config_lib
from pipeline.data.clips import ClipMaker
from pipeline.data.errors import ErrorLedger
from pipeline.data.manifest import read_manifest
from pipeline.data.transforms import to_model_input
from pipeline.eval.frozen import knn_top1, load_encoder, pooled_features
from pipeline.eval.probing import ProbeConfig, main, run_probe
from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel

pytestmark = pytest.mark.integration


def _sets(tmp_path: Path, sample_videos: Path, *more: str) -> list[str]:
    return [
        f"storage_path={tmp_path / 'runs'}",
        f"data.uri={sample_videos}",
        "data.sampling_rate=4",
        "data.decode_isolation=inline",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}",
        "tracking.system_metrics=false",
        "model.preset=tiny",
        *more,
    ]


def _in_process_features(model_dir: Path, cfg, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = dataclasses.replace(cfg.data, split=split, num_frames=4, image_size=32, patch_size=8)
    maker = ClipMaker(data, "eval", ErrorLedger.local())
    encoder = load_encoder(str(model_dir))
    features, labels = [], []
    for row in read_manifest(str(data.uri), split=split):
        clips = maker.clips(row)
        x = to_model_input(torch.stack(clips["pixel_values"]), data.mean, data.std)
        with torch.no_grad():
            features.append(pooled_features(encoder, x).mean(0))
        labels.append(row["label"])
    return torch.stack(features), torch.tensor(labels)


def test_probe_of_a_checkpoint_matches_the_in_process_computation(ray_session, sample_videos, tmp_path):
    torch.manual_seed(0)
    VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny", use_mean_pooling=False)).save_pretrained(
        tmp_path / "pre"
    )
    cfg = config_lib.load(
        ProbeConfig,
        None,
        _sets(tmp_path, sample_videos, "run_name=probe-ckpt", f"model_uri={tmp_path / 'pre'}"),
    )
    result = run_probe(cfg)
    assert (result.num_train, result.num_test, result.num_classes) == (8, 8, 8)
    bank, bank_labels = _in_process_features(tmp_path / "pre", cfg, "train")
    queries, query_labels = _in_process_features(tmp_path / "pre", cfg, "test")
    assert result.knn_top1 == pytest.approx(knn_top1(bank, bank_labels, queries, query_labels, 8))
    assert 0.0 <= result.linear_top1 <= 1.0 and result.linear_weight_decay in (1e-4, 1e-3, 1e-2, 1e-1)

    record = json.loads((tmp_path / "runs" / "probe-ckpt" / "probe.json").read_text())
    assert record["knn_top1"] == result.knn_top1 and record["num_test"] == 8 and record["k"] == 20
    run = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}").get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.job"] == "probe"
    assert run.data.metrics["probe/knn_top1"] == pytest.approx(result.knn_top1)
    assert run.data.metrics["probe/linear_top1"] == pytest.approx(result.linear_top1)


def test_a_random_init_is_probed_as_the_baseline_and_bad_input_fails_first(
    ray_session, sample_videos, tmp_path, capsys
):
    result = run_probe(
        config_lib.load(
            ProbeConfig, None, _sets(tmp_path, sample_videos, "run_name=probe-rand", "model_uri=", "seed=3")
        )
    )
    assert result.model == "random init (seed 3)"
    saved = tmp_path / "runs" / "probe-rand" / "random_init"
    torch.manual_seed(3)
    expected = VideoMAEModel(VideoMAEConfig.from_preset("tiny", use_mean_pooling=False))
    assert torch.equal(
        load_encoder(str(saved)).encoder.layer[0].output.dense.weight,
        expected.encoder.layer[0].output.dense.weight,
    )

    base = _sets(tmp_path, sample_videos)
    assert main([*(f"--set={s}" for s in base), "--set", f"model_uri={tmp_path / 'nothing'}"]) == 2
    assert "model_uri: no model at" in capsys.readouterr().err
    assert main([*(f"--set={s}" for s in base), "--set", "test_split=train"]) == 2
    assert "must name another split" in capsys.readouterr().err
    assert main([*(f"--set={s}" for s in base), "--set", "data.num_frames=8"]) == 2
    assert "data.num_frames is taken from the model" in capsys.readouterr().err
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    (unlabeled / "a.mp4").write_bytes(
        (sample_videos / "videos" / "right_slow" / "train_0000.mp4").read_bytes()
    )
    assert main([*(f"--set={s}" for s in base), "--set", "model_uri=", "--set", f"data.uri={unlabeled}"]) == 2
    assert "have no label" in capsys.readouterr().err
