"""MLflow runs for the jobs: one run per job, parent/child runs for chained pipelines, resumable by name.

Who logs what (and why):

- The **driver** opens the run (:func:`start_run`), logs the flattened resolved config as params and the
  config file, and at the end logs the error report and the exported model, then closes the run. It
  knows the final outcome, so it is the one to mark the run FINISHED or FAILED.
- **Rank 0 of the Ray Train workers** logs per-step metrics (loss, lr, clips/s, data-wait fraction,
  decode errors by reason), reconstruction pictures and system metrics *into the same run* by id
  (:class:`RunLogger`), because Train V2 does not stream reported metrics to the driver while training
  runs. The other ranks log nothing: their losses are averaged into rank 0's over DDP.

So the tracking URI must be reachable from the worker: a local store works on one machine; on a
multi-node cluster use an MLflow server (``MLFLOW_TRACKING_URI=http://...``).

A rerun of a job with the same run name reopens the MLflow run with that name in the experiment (tag
``pipeline.run_name``) instead of starting a second one, so resumed curves continue in one place.
Nothing logged here contains credentials: params are scrubbed (``config.flatten``), URIs redacted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.storage import redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# mlflow is imported where a run is opened or written, not with this module: every Ray Train worker and
# job driver imports this module, most of them never log (ranks other than 0), and mlflow's import is
# among the heaviest of a worker's start.

RUN_NAME_TAG = "pipeline.run_name"
JOB_TAG = "pipeline.job"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # mlflow's limit on a param value (older servers: 500)
PARAMS_PER_BATCH = 100


@dataclass
class TrackingSection:
    """Where a job's MLflow run goes; every job's ``tracking`` section."""

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under the local storage folder
    experiment: str = "videomae-pretrain"
    parent_run_id: str | None = None  # make this job's run a child of another (the chained pipeline)
    recon_every_steps: int = 0  # pretraining: reconstruction PNG every N steps (0 = only at the end)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) of rank 0's node
    system_metrics_interval_s: float = 10.0

    def validate(self) -> None:
        if self.recon_every_steps < 0:
            raise ConfigError(f"tracking.recon_every_steps must be >= 0, got {self.recon_every_steps}")

    def resolved_uri(self, storage_path: str) -> str:
        """The tracking URI, defaulting to a SQLite store under ``storage_path`` (``runs/`` when that is
        in S3: the store is a local file)."""
        return self.tracking_uri or default_tracking_uri(
            "runs" if storage.is_s3(storage_path) else storage_path
        )


@contextmanager
def job_run(
    run_name: str, section: TrackingSection, storage_path: str, job: str, interrupted_hint: str = ""
) -> Iterator[Run]:
    """The job's MLflow run, (re)opened by name: closed FINISHED when the block ends, KILLED on Ctrl-C or
    SIGTERM (``ray job stop``; a rerun resumes it, as ``interrupted_hint`` tells the user), FAILED on any
    other error."""
    uri = section.resolved_uri(storage_path)
    run = start_run(run_name, section.experiment, uri, job=job, parent_run_id=section.parent_run_id)
    print(
        f"MLflow: {redact(uri)} experiment {section.experiment!r} run {run.run_id}"
        f"{' (resumed)' if run.resumed else ''}",
        flush=True,
    )
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        if interrupted_hint:
            print(f"interrupted: {interrupted_hint}", flush=True)
        raise
    finally:
        run.end(status)


def default_tracking_uri(root: str | os.PathLike = "runs") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ``root`` (mlflow 3 deprecates the plain
    file store; SQLite is its own default backend)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def _artifact_location(tracking_uri: str) -> str | None:
    """Local stores put artifacts next to the database, not in the current directory."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client.tracking_uri))
    except Exception:  # noqa: BLE001 - created concurrently by another job: read it back
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(client: MlflowClient, experiment_id: str, run_name: str, parent_run_id: str | None = None):
    """The newest run of ``experiment_id`` started for ``run_name`` (and parent, if given), or None."""
    query = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs = client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


@dataclass
class Run:
    """A handle on one MLflow run, picklable into Ray workers (only the URI and ids travel)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool = False

    @property
    def client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a resumed run, values that already exist are skipped (MLflow forbids changes)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = []
        for key, value in params.items():
            if key not in existing:
                items.append(Param(key, redact("" if value is None else str(value))[:MAX_PARAM_LENGTH]))
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED (interrupted: a rerun resumes it)."""
        self.client.set_terminated(self.run_id, status=status)


def start_run(
    run_name: str,
    experiment: str,
    tracking_uri: str | None = None,
    job: str = "",
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    resume: bool = True,
) -> Run:
    """Open the job's MLflow run: the existing run for ``run_name`` when ``resume``, else a new one; a
    child of ``parent_run_id`` when given (the chained pipeline's stages)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    existing = find_run(client, experiment_id, run_name, parent_run_id) if resume else None
    if existing is not None:
        client.update_run(existing.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return Run(uri, experiment_id, existing.info.run_id, resumed=True)
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    if job:
        all_tags[JOB_TAG] = job
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    created = client.create_run(
        experiment_id, run_name=run_name, tags={k: redact(str(v)) for k, v in all_tags.items()}
    )
    return Run(uri, experiment_id, created.info.run_id)


class RunLogger:
    """Logging from a training worker into a run opened by the driver, plus MLflow's system metrics
    (CPU, memory, GPU, network of the worker's node, sampled in a background thread)."""

    def __init__(self, run: Run, system_metrics: bool = True, sampling_interval: float = 10.0,
                 node_id: str | None = None):
        self.run = run
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run.run_id, sampling_interval=sampling_interval,
                                                 resume_logging=True, node_id=node_id,
                                                 tracking_uri=run.tracking_uri)
            self._monitor.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log_metrics(metrics, step)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.run.log_artifact(local_path, artifact_path)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
