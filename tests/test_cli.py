"""The shared job CLI: a relative storage_path inside a `ray job submit --working-dir` copy is refused
at start, for every config-driven job, since Ray deletes that copy (and the checkpoints in it) later."""

from pathlib import Path

import pytest

from pipeline.chain import main as pipeline_main
from pipeline.cli import check_outputs_outlive_job, in_ray_job_copy
from pipeline.config import ConfigError
from pipeline.eval.evaluate import main as evaluate_main
from pipeline.train.finetune import main as finetune_main
from pipeline.train.pretrain import main as pretrain_main


@pytest.fixture
def job_copy(tmp_path: Path) -> Path:
    """A folder laid out as Ray 2.60 unpacks a job's working dir."""
    folder = tmp_path / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_29c54c7c"
    folder.mkdir(parents=True)
    return folder


def test_only_relative_paths_inside_a_job_copy_are_refused(job_copy, tmp_path):
    assert in_ray_job_copy(job_copy) and not in_ray_job_copy(tmp_path)
    with pytest.raises(ConfigError, match="storage_path 'runs' is relative.*Ray's temporary copy"):
        check_outputs_outlive_job("runs", job_copy)
    for fine in (str(tmp_path / "runs"), "s3://bucket/runs", "file:///shared/runs"):
        check_outputs_outlive_job(fine, job_copy)
    check_outputs_outlive_job("runs", tmp_path)  # a local run keeps its relative default


@pytest.mark.parametrize("main", [pretrain_main, finetune_main, evaluate_main, pipeline_main])
def test_every_job_refuses_before_starting(main, job_copy, monkeypatch, capsys):
    monkeypatch.chdir(job_copy)
    assert main(["--set", "storage_path=runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: storage_path 'runs' is relative") and "s3://" in err
    assert list(job_copy.iterdir()) == []  # nothing written, no sample data generated


def test_run_names_name_folders_and_mlflow_runs():
    from pipeline import runtime

    runtime.check_run_name("pretrain-vit-b_k400.v2")
    for bad in ("a/b", "", "-leading-dash", "x" * 129, "spaces here"):
        with pytest.raises(ConfigError, match="run_name"):
            runtime.check_run_name(bad)
