"""The preprocessing job end to end on real local Ray, the moto S3 server and an MLflow server."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.preprocess_videos import HUGE_MAX_PIXELS, write_broken_set, write_video

from pipeline import storage
from pipeline.data.manifest import read_manifest
from pipeline.preprocess import job as preprocess_module
from pipeline.preprocess.job import PreprocessConfig, run

_spec = importlib.util.spec_from_file_location(
    "preprocess_job", Path(__file__).parents[2] / "jobs/preprocess.py"
)
preprocess_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_job)

pytestmark = pytest.mark.integration


@pytest.fixture
def raw_dataset(tmp_path: Path, sample_videos: Path) -> tuple[Path, dict[str, str]]:
    """The labeled sample videos plus every broken kind and odd codecs; relative path -> expected status."""
    root = tmp_path / "raw"
    shutil.copytree(sample_videos / "videos", root / "videos")
    expected = {str(p.relative_to(root)): "ok" for p in (root / "videos").rglob("*.mp4")}
    expected.update(write_broken_set(root))
    return root, expected


def manifest_rows(output: str) -> dict[str, dict]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, "manifest.parquet"))))
    return {r["relative_path"]: r for r in table.to_pylist()}


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_local_transcode_with_labels_then_rerun_skips_done_work(
    raw_dataset, sample_videos, tmp_path, ray_session
):
    raw, expected = raw_dataset
    out = tmp_path / "out"
    cfg = PreprocessConfig(
        input=str(raw), output=str(out), short_side=32, max_pixels=HUGE_MAX_PIXELS, workers=2,
        annotations=[str(sample_videos / f"{s}.csv") for s in ("train", "val", "test")],
    )  # fmt: skip
    report = run(cfg)

    rows = manifest_rows(str(out))
    assert {rel: r["status"] for rel, r in rows.items()} == expected
    for rel, r in rows.items():
        if r["status"] == "ok":
            assert r["path"] == rel.rsplit(".", 1)[0] + ".mp4" and r["original_path"] == str(raw / rel)
            assert (out / r["path"]).stat().st_size == r["out_bytes"] and min(
                r["out_width"], r["out_height"]
            ) <= 32
        else:
            assert r["path"] == str(raw / rel) and r["error"]
    sample = next(r for rel, r in rows.items() if rel.startswith("videos/"))  # generated at 48x64
    assert (sample["width"], sample["height"], sample["out_width"], sample["out_height"]) == (64, 48, 42, 32)
    # labels and splits come from the VideoMAE lists; the broken files have none
    labeled = {rel: (r["label"], r["split"]) for rel, r in rows.items() if r["label"] is not None}
    listed = {}
    for split in ("train", "val", "test"):
        for line in (sample_videos / f"{split}.csv").read_text().splitlines():
            path, label = line.split()
            listed[path] = (int(label), split)
    assert labeled == listed
    # only finished videos, the manifest and the reports: no temporary or partial files
    ok_outputs = sorted(r["path"] for r in rows.values() if r["status"] == "ok")
    assert files_below(out) == sorted(
        [*ok_outputs, "manifest.parquet", "report.json", "unmatched_annotations.csv"]
    )

    assert report["status_counts"] == dict(Counter(expected.values()))
    assert report["processed"] == len(expected) and report["ok"] == Counter(expected.values())["ok"]
    assert report["codec_counts"]["vp9"] == 1 and report["codec_counts"]["mpeg4"] == 1
    assert report["annotations"]["matched"] == len(listed) and report["annotations"]["unmatched_rows"] == 0
    assert report["annotations"]["videos_without_annotation"] == len(expected) - len(listed)
    assert report["bytes_in"] == sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    assert report["bytes_out"] == sum(r["out_bytes"] or 0 for r in rows.values() if r["status"] == "ok")
    assert report["hours"] > 0 and report["videos_per_s"] > 0
    assert json.loads((out / "report.json").read_text())["status_counts"] == report["status_counts"]

    # The training jobs take the manifest directly: ok rows only, paths below the output root.
    train_rows = read_manifest(str(out / "manifest.parquet"))
    assert sorted(r["path"] for r in train_rows) == sorted(str(out / p) for p in ok_outputs)
    assert {r["path"]: r["label"] for r in train_rows if r["label"] >= 0} == {
        str(out / (p.rsplit(".", 1)[0] + ".mp4")): label for p, (label, _) in listed.items()
    }

    # A rerun does nothing; a removed output (and only it) is made again.
    again = run(cfg)
    assert again["processed"] == 0 and again["status_counts"] == report["status_counts"]
    assert manifest_rows(str(out)) == rows
    (out / ok_outputs[0]).unlink()
    third = run(cfg)
    assert third["processed"] == 1 and (out / ok_outputs[0]).exists()


def test_interrupted_probe_run_resumes_from_partial_manifests(
    raw_dataset, tmp_path, ray_session, monkeypatch
):
    raw, expected = raw_dataset
    out = tmp_path / "out"
    cfg = PreprocessConfig(input=str(raw), output=str(out), transcode=False, max_pixels=HUGE_MAX_PIXELS,
                           workers=2, flush_s=0.0)  # fmt: skip
    write = preprocess_module._write_parquet

    def interrupted_before_the_final_manifest(uri: str, rows: list[dict]) -> None:
        if uri.endswith("/manifest.parquet"):
            raise KeyboardInterrupt
        write(uri, rows)

    monkeypatch.setattr(preprocess_module, "_write_parquet", interrupted_before_the_final_manifest)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert list((out / "_preprocess/parts").glob("*.parquet"))
    monkeypatch.undo()

    report = run(cfg)
    assert report["processed"] == 0 and report["videos"] == len(expected)
    rows = manifest_rows(str(out))
    assert {rel: r["status"] for rel, r in rows.items()} == expected
    assert all(r["path"] == r["original_path"] for r in rows.values())  # probe-only: originals are read
    assert not (out / "_preprocess/parts").exists()


def test_s3_job_with_kinetics_annotations_and_mlflow(tmp_path, s3_bucket, ray_session, mlflow_server):
    import mlflow

    names = {"abseiling": ["aaa", "bbb"], "zumba": ["ccc"]}
    for label_name, ids in names.items():
        for yid in ids:
            src = write_video(tmp_path / f"{yid}.mp4", frames=8, size=(96, 128))
            storage.upload_file(str(src), f"{s3_bucket}/raw/{label_name}/{yid}_000010_000020.mp4")
    storage.write_text(f"{s3_bucket}/raw/zumba/notes.mp4", "not a video")
    csv_path = tmp_path / "kinetics_train.csv"
    csv_path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,aaa,10,20,train\nabseiling,bbb,10,20,train\nzumba,ccc,10,20,val\nzumba,gone,0,10,train\n"
    )
    code = preprocess_job.main([
        "--input", f"{s3_bucket}/raw", "--output", f"{s3_bucket}/k-64", "--short-side", "64",
        "--workers", "1",
        "--annotations", str(csv_path), "--mlflow", mlflow_server, "--experiment", "preprocess-test",
    ])  # fmt: skip
    assert code == 0

    rows = manifest_rows(f"{s3_bucket}/k-64")
    assert {rel: (r["status"], r["label"], r["split"]) for rel, r in rows.items()} == {
        "abseiling/aaa_000010_000020.mp4": ("ok", 0, "train"),
        "abseiling/bbb_000010_000020.mp4": ("ok", 0, "train"),
        "zumba/ccc_000010_000020.mp4": ("ok", 1, "val"),
        "zumba/notes.mp4": ("not_a_video", None, None),
    }
    outputs = dict(storage.list_files(f"{s3_bucket}/k-64", (".mp4",)))
    assert {
        f"{s3_bucket}/k-64/{r['path']}": r["out_bytes"] for r in rows.values() if r["status"] == "ok"
    } == outputs
    report = json.loads(storage.read_text(f"{s3_bucket}/k-64/report.json"))
    assert report["annotations"]["unmatched_rows"] == 1 and report["annotations"]["unmatched_examples"] == [
        "gone_000000_000010"
    ]
    assert "gone_000000_000010" in storage.read_text(f"{s3_bucket}/k-64/unmatched_annotations.csv")

    # a rerun has nothing to do; too many failures for the bound exit with status 3
    args = ["--input", f"{s3_bucket}/raw", "--output", f"{s3_bucket}/k-64", "--short-side", "64"]
    assert preprocess_job.main([*args, "--max-error-fraction", "0.1"]) == 3

    client = mlflow.MlflowClient(mlflow_server)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("preprocess-test").experiment_id])
    assert mlrun.data.metrics["videos"] == 4 and mlrun.data.metrics["ok"] == 3
    assert (
        mlrun.data.metrics["status_not_a_video"] == 1
        and mlrun.data.metrics["annotations_unmatched_rows"] == 1
    )
    assert mlrun.data.params["input"] == f"{s3_bucket}/raw"
    assert "report.json" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def test_job_fails_clearly_on_bad_arguments(tmp_path, capsys):
    assert preprocess_job.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "nothing to list" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in/a.mp4", frames=4)
    assert preprocess_job.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "in")]) == 2
    assert preprocess_job.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                                "--short-side", "7"]) == 2  # fmt: skip
    assert "short_side" in capsys.readouterr().err
