"""MLflow tracking: one run per output folder (a resumed run continues the same MLflow run).

What a user of MLflow expects, where MLflow's own docs put it: model-training experiments (not GenAI ones), params as
the dotted config keys in the ``key=[4, 8, 16]`` form typed on the command line, flat scalar metrics rounded to 5
significant digits (``train/loss/total``, ``val/hIoU``, ``val/IoU/<class>``), git commit/source tags, a description,
the dataset as a run input, system metrics on request and the student as a clipzss MLflow model (weights and config,
no pickle).
The default store is a local SQLite file (MLflow 3 has retired the plain file store).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from clipzss.config import Config, TrackingConfig
from clipzss.engine.disk import is_disk_full, store_disk
from clipzss.engine.run_lock import waiting_lock
from clipzss.paths import resolve_path

RUN_ID_FILE = "mlflow_run_id"
HEADLINE = ("hIoU", "mIoU_U", "mIoU_S", "pAcc")  # the result, in the order a reader looks for it
VIEW_KEY = "clipzss"  # the experiment's shared view (``?viewStateShareKey=clipzss``): see runs_table_view


def runs_table_view() -> dict[str, Any]:
    """The runs table as it should open: the headline ``val/...`` metrics and an ablation's ``full/val/hIoU_mean``
    as columns, best hIoU first. MLflow's UI keeps its columns per browser; the one server-side default is a shared
    view, an experiment tag ``mlflow.sharedViewState.<key>`` that a ``?viewStateShareKey=<key>`` link opens."""
    metrics = [f"val/{m}" for m in HEADLINE] + ["full/val/hIoU_mean"]
    return {
        "selectedColumns": ["attributes.`Models`", *(f"metrics.`{m}`" for m in metrics), "params.`arm`"],
        "orderByKey": "metrics.`val/hIoU`",
        "orderByAsc": False,
    }


# MLflow's documented kind of an experiment. MLflow 3.17.2's own UI still opens every experiment in its GenAI view
# unless its "Model training" toggle (or ?workflowType=machine_learning in the URL) says otherwise.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "CLIP-ZSS runs: students distilled from a frozen CLIP teacher (clipzss).",
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(runs_table_view()),
}


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names the URI and the way out."""


def param_value(value: Any) -> str:
    """A config value as typed on the command line: ``[4, 8, 16]``, ``true``, ``null``, ``0.0001``."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(param_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def rounded(value: float) -> float:
    """5 significant digits: what a chart or a table can show, without float noise (``35.41237`` -> ``35.412``)."""
    return float(f"{float(value):.5g}")


def tracking_user() -> str:
    """Who MLflow records as the author of a run or a model version (``mlflow.user``): the login a tracking server
    authenticates (``MLFLOW_TRACKING_USERNAME``), else this machine's user."""
    import getpass

    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's ``mlflow.source.*`` tags for the clipzss checkout that runs (empty git tags outside a checkout)."""
    import sys

    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    package = str(Path(__file__).resolve().parents[1])
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.user": tracking_user()}  # fmt: skip
    found = {
        "mlflow.source.git.commit": get_git_commit(package),
        "mlflow.source.git.branch": get_git_branch(package),
        "mlflow.source.git.repoURL": get_git_repo_url(package),
    }
    return {**tags, **{k: v for k, v in found.items() if v}}


def run_name(cfg: Config) -> str:
    """``tracking.run_name``, else what tells runs apart: ``segformer_tiny synthetic scales=[4, 8, 16] seed=0``."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    parts = [cfg.student.arch, cfg.data.dataset]
    parts.append(f"scales={param_value(cfg.plm.kmeans.scales)}" if cfg.plm.enabled else "no PLM")
    if cfg.glm.weight == 0:
        parts.append("no GLM")
    return " ".join([*parts, f"seed={cfg.run.seed}"])


def result_line(metrics: dict, step: int) -> str:
    """The headline of an evaluation (``evaluate()`` metrics, percentages) as one Markdown line."""
    names = {"hIoU": "hIoU", "mIoU_U": "mIoU(U)", "mIoU_S": "mIoU(S)", "pAcc": "pAcc"}
    cells = [f"{names[m]} {float(metrics[m]):.2f}" for m in HEADLINE]
    return f"**{cells[0]}** · " + " · ".join(cells[1:]) + f" (val, step {step})"


def run_description(cfg: Config, metrics: dict | None = None, step: int = 0) -> str:
    """``tracking.description``, else a Markdown summary of what the run trains, on what, and where it writes;
    with ``metrics`` (an evaluation at ``step``), its :func:`result_line` first."""
    result = f"{result_line(metrics, step)}\n\n" if metrics is not None else ""
    if cfg.tracking.description:
        return result + cfg.tracking.description
    glm = f"GLM weight {cfg.glm.weight}" if cfg.glm.weight else "GLM off"
    plm = f"PLM with K-Means scales {param_value(cfg.plm.kmeans.scales)}" if cfg.plm.enabled else "PLM off"
    return result + (
        f"CLIP-ZSS: student `{cfg.student.arch}` distilled from the frozen CLIP teacher `{cfg.teacher.model}` on "
        f"`{cfg.data.dataset}` (zero-shot split `{cfg.data.split}`) for {cfg.optim.max_iters} steps; {glm}, {plm}. "
        f"Outputs in `{cfg.run.output_dir}`; the student is the logged model `student`."
    )


def eval_metrics(metrics: dict, class_names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """One evaluation's summary (``val/hIoU``, ...) and per-class IoU (``val/IoU/<class>``) as flat scalars."""
    flat = {f"val/{k}": float(metrics[k]) for k in ("pAcc", "mIoU", "mIoU_S", "mIoU_U", "hIoU")}
    return flat | {f"val/IoU/{name}": float(v) for name, v in zip(class_names, metrics["iou"], strict=True)}


def log_datasets(tracker: Tracker | NullTracker, cfg: Config, train_set, val_set) -> None:
    """The train and val datasets (name ``<dataset>/<split>``, their root, a digest of their files) as run inputs."""
    for context, data, root in (
        ("train", train_set, cfg.data.root),
        ("eval", val_set, cfg.data.eval_root or cfg.data.root),
    ):
        names = "\n".join([data.dataset, data.split.name, *(s.name for s in data.samples)])
        digest = hashlib.sha256(names.encode()).hexdigest()
        tracker.log_dataset(f"{data.dataset}/{data.split.name}", resolve_path(root), digest, context)


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


@contextmanager
def current_store(uri: str):
    """Make ``uri`` MLflow's current store inside (for the fluent APIs, and the registry, which resolves a logged
    model in the current store); then restore the previous one, and ``MLFLOW_TRACKING_URI``, which
    ``mlflow.set_tracking_uri`` also sets (child processes would inherit it)."""
    import mlflow

    previous, variable = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _unusable_store(uri: str, error: Exception) -> str:
    """What keeps a store from opening, and the way out: its full disk, or its absence."""
    what = f"({type(error).__name__}: {error})"
    if is_disk_full(error):
        return (f"MLflow tracking store {uri!r} cannot write: {store_disk(uri)} is full {what}. Free space there, "
                "or set tracking.uri to a store on another disk, or tracking.enabled=false.")  # fmt: skip
    return (f"MLflow tracking store {uri!r} is unreachable or unusable {what}. Start the server, or set "
            "tracking.uri='' for the local SQLite store, or tracking.enabled=false.")  # fmt: skip


def _store_opening(uri: str):
    """For a SQLite store, one process at a time opens it: MLflow creates a new file's schema (and the experiment) on
    first use, and two processes doing that at once fail ("duplicate column name")."""
    database = _sqlite_file(uri)
    return nullcontext() if database is None else waiting_lock(database.with_name(database.name + ".lock"))


class Tracker:
    """A thin, explicit MLflow client for one run (a training run, or the parent of an ablation or a sweep)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        output_dir: str | Path,
        run_name: str = "",
        tags: dict | None = None,
        description: str = "",
        mark_running: bool = True,
    ):
        """Create the run (or reopen the one whose id ``output_dir`` holds) in a model-training experiment.

        Args:
            cfg: the tracking section (store URI, experiment, run name, system metrics).
            output_dir: where the run id is kept, so that ``--resume`` continues the same MLflow run.
            run_name: shown in the UI; ``cfg.run_name`` wins when set, then this, then the folder's name.
            tags: extra run tags (``mlflow.parentRunId`` nests the run).
            description: the run's Markdown description (MLflow's ``mlflow.note.content``).
            mark_running: a reopened run is RUNNING again (a training session); False leaves its status to the
                records delivered (``clipzss sync``), so a delivery never makes an ended run look alive.

        Raises:
            TrackingError: the store cannot be used, or it does not hold the run whose id ``output_dir`` names.
        """
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = cfg.uri or default_uri()
        self.output_dir = Path(output_dir)
        with quick_http(), _store_opening(self.uri):
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment_id = self._experiment(cfg.experiment)
            except Exception as e:
                raise TrackingError(_unusable_store(self.uri, e)) from e
        id_file = self.output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if run_id:
            self._reopen(run_id, id_file, mark_running)
        else:
            run_tags = {**source_tags(), **(tags or {})}
            if description:
                run_tags["mlflow.note.content"] = description
            name = cfg.run_name or run_name or self.output_dir.name
            run_id = self.client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
            self.output_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        self.run_id, self.experiment_id = run_id, experiment_id
        self._mlflow = mlflow
        self._monitor = self._system_metrics() if cfg.system_metrics else None

    def _reopen(self, run_id: str, id_file: Path, mark_running: bool) -> None:
        try:
            self.client.get_run(run_id)
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise TrackingError(_unusable_store(self.uri, e)) from e
            raise TrackingError(
                f"{id_file} names MLflow run {run_id}, which the store {self.uri!r} does not hold (a run folder moved "
                "or copied to another store?). Resume with tracking.uri set to that run's store, or delete "
                f"{id_file} to continue in a new MLflow run of {self.uri!r}: it gets the full config and the step it "
                "resumed from."
            ) from None
        if mark_running:
            self.client.update_run(run_id, status="RUNNING")

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created as a model-training experiment (older ones are tagged so)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            database = _sqlite_file(self.uri)  # beside a SQLite file, its own mlruns/ (a store is one folder)
            location = (database.parent / "mlruns").resolve().as_uri() if database else None  # None: server's default
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        for key, value in EXPERIMENT_TAGS.items():
            if key not in experiment.tags:  # never override what a user chose in the UI
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def _system_metrics(self):
        """MLflow's own CPU / memory / GPU sampler (``system/...`` metrics), logging to this run every 10 s."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, tracking_uri=self.uri, resume_logging=True)
        monitor.start()
        return monitor

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, param_value(v)) for k, v in params.items() if k not in logged]
        for start in range(0, len(fresh), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """``timestamp_ms``: when the values were produced (a spooled redelivery keeps it, so MLflow dedups it)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        rows = [Metric(k, rounded(v), stamp, step) for k, v in metrics.items() if np.isfinite(v)]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB picture under ``key`` at ``step``: MLflow's image grid shows the latest, with a slider over steps."""
        self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_model_metrics(
        self, metrics: dict[str, float], step: int, name: str = "student", timestamps_ms: dict[str, int] | None = None
    ) -> None:
        """Metrics of the run's logged model ``name`` (MLflow 3 ranks and compares logged models by them), stamped
        with ``timestamps_ms`` where given: MLflow also files them under the run, and a metric the run already has
        at that step with the same stamp and value is dropped as a duplicate."""
        from mlflow.entities import Metric

        experiment = self.client.get_run(self.run_id).info.experiment_id
        query = f"name = '{name}' AND source_run_id = '{self.run_id}'"
        (model,) = self.client.search_logged_models([experiment], filter_string=query, max_results=1)
        now, stamps = int(time.time() * 1000), timestamps_ms or {}
        rows = [Metric(k, rounded(v), stamps.get(k, now), step, model_id=model.model_id) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=[r for r in rows if np.isfinite(r.value)])

    def register_student(self, model: str, alias: str, tags: dict[str, str], description: str) -> str | None:
        """Register this run's logged student as a version of ``model`` aliased ``alias``; returns its URI."""
        from clipzss.engine.registration import register_version

        uri = register_version(self, model, self.run_id, alias, tags, description)
        if uri is not None:
            self.set_tags({"clipzss.registered_model": uri})
            print(f"registered the student as {uri}")
        return uri

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_table(self, data: dict[str, list], name: str) -> None:
        """A column-oriented table; dots in column names become ``/`` (``optim.lr`` -> ``optim/lr``): MLflow's UI
        reads a dotted name as a nested field and shows the column blank. Floats are rounded like metrics."""

        def cell(v: Any) -> Any:
            return rounded(v) if isinstance(v, float) and np.isfinite(v) else v

        renamed = {column.replace(".", "/"): [cell(v) for v in values] for column, values in data.items()}
        if len(renamed) != len(data):
            raise ValueError(f"table {name!r}: columns {list(data)} collide once dots become '/'")
        self.client.log_table(self.run_id, renamed, name)

    def log_dataset(self, name: str, root: str | Path, digest: str, context: str) -> None:
        """Record a dataset (``name``, e.g. ``synthetic/default``, read from ``root``) as an input of this run."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        source = LocalArtifactDatasetSource(str(Path(root).resolve()))
        dataset = MetaDataset(source, name=name, digest=digest[:36])
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])

    def log_student(self, bundle: str | Path, name: str = "student") -> str:
        """Log the student of an exported ``model.pt`` as a clipzss MLflow model (safetensors weights + config,
        :mod:`clipzss.engine.mlflow_flavor`: nothing in it is pickled) with a signature (images [B, 3, H, W] ->
        R [B, C, h, w]) and, in the model's metadata, its config, alpha and embed_dim; returns its URI. A path, not
        a module: the call is journalled by the spool. A run that already has a model of that name keeps it (a
        completed run finished again logs no second copy)."""
        from importlib.metadata import version

        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from clipzss.config import from_dict
        from clipzss.engine.checkpoint import load_model_bundle
        from clipzss.engine.mlflow_flavor import log_student
        from clipzss.models.students import build_student

        uri = f"runs:/{self.run_id}/{name}"
        experiment = self.client.get_run(self.run_id).info.experiment_id
        query = f"name = '{name}' AND source_run_id = '{self.run_id}'"
        if self.client.search_logged_models([experiment], filter_string=query, max_results=1):
            return uri
        saved = load_model_bundle(bundle)
        student = build_student(from_dict(saved["config"]).student, saved["embed_dim"])
        student.load_state_dict(saved["student"])
        meta = {"config": saved["config"], "alpha": float(saved["alpha"]), "embed_dim": int(saved["embed_dim"])}
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "images")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["embed_dim"], -1, -1), "features")]),
        )
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"clipzss=={version('clipzss')}"]
        with (  # the active run decides the logged model's experiment
            self.as_current_store(),
            self._mlflow.start_run(run_id=self.run_id, nested=self._mlflow.active_run() is not None),
        ):
            log_student(self.run_id, name, student.eval(), meta, signature, requirements)
        return uri

    def as_current_store(self):
        """This run's store as MLflow's current one inside (:func:`current_store`)."""
        return current_store(self.uri)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)


class NullTracker:
    """Stands in for :class:`Tracker` when tracking is off or on non-main processes."""

    uri = ""
    run_id = ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
