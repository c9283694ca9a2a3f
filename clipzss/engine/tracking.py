"""MLflow tracking: one run per output folder (a resumed run continues the same MLflow run).

Only flat scalars are logged as metrics (``train/loss/total``, ``val/hIoU``); params are the dotted config keys.
The default store is a local SQLite file (MLflow 3 has retired the plain file store).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from clipzss.config import TrackingConfig

RUN_ID_FILE = "mlflow_run_id"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names the URI and the way out."""


def default_uri() -> str:
    """``sqlite:///<working directory>/mlflow.db`` (MLflow's own default store): every run shares one store."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def quick_http():
    """Fail within seconds, not minutes, when a server does not answer (MLflow retries 7 times by default)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Tracker:
    """A thin, explicit MLflow client for one training run."""

    def __init__(self, cfg: TrackingConfig, output_dir: str | Path, run_name: str = "", tags: dict | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = cfg.uri or default_uri()
        self.output_dir = Path(output_dir)
        with quick_http():
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment = self.client.get_experiment_by_name(cfg.experiment)
                experiment_id = (
                    experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
                )
            except Exception as e:
                raise TrackingError(
                    f"MLflow tracking store {self.uri!r} is unreachable or unusable ({type(e).__name__}: {e}). "
                    "Start the server, or set tracking.uri='' for the local SQLite store, "
                    "or tracking.enabled=false."
                ) from e
        id_file = self.output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=run_name or cfg.run_name or self.output_dir.name, tags=tags or {}
            )
            run_id = run.info.run_id
            self.output_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        self.run_id = run_id
        self._mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in logged]
        for start in range(0, len(fresh), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """``timestamp_ms``: when the values were produced (a spooled redelivery keeps it, so MLflow dedups it)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        rows = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if np.isfinite(v)]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=name, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_table(self, data: dict[str, list], name: str) -> None:
        self.client.log_table(self.run_id, data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class NullTracker:
    """Stands in for :class:`Tracker` when tracking is off or on non-main processes."""

    uri = ""
    run_id = ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
