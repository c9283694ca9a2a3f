"""The sweep driver: where results go, the MLflow parent run, Ray started or joined, the Tuner fitted or restored.

A sweep is ``<storage>/<name>`` for Ray (trials, checkpoints, experiment state) plus a local folder for its own files
(the MLflow parent's id, best config, tables): the same folder for a local storage, ``<cwd>/runs/sweeps/<name>``
for a URI storage (s3://...). Started again with ``--resume`` after its driver died, a sweep continues the same
parent run (tagged ``clipzss.resumed``), the unfinished trials continue their own runs, and the parent ends FINISHED.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipzss.config import Config, TrackingConfig, flatten, load_config, preset_path
from clipzss.engine.tracking import Tracker, default_uri
from clipzss.sweep.options import SMOKE_OVERRIDES, SweepOptions
from clipzss.sweep.shape import check_shape
from clipzss.sweep.trainable import run_trial

# Relative paths would break inside trials (Ray moves each trial into its own working folder): made absolute.
PATH_KEYS = ("data.root", "data.eval_root", "teacher.model", "teacher.pretrained", "teacher.cache_dir",
             "student.pretrained")  # fmt: skip


@dataclass
class Sweep:
    """What the driver resolved before any trial runs."""

    name: str
    experiment: str  # Ray's experiment: <storage>/<name> (a folder or a URI)
    local_dir: Path  # the sweep's own files
    config: str | None  # the base preset or YAML, as an absolute path
    base: Config  # the base config with every fixed override applied
    fixed: list[str]  # the overrides every trial gets (smoke sizes, --set, absolute paths, tracking URI)
    parent: Tracker | None  # the MLflow parent run (None when tracking is off)


def _absolute_paths(cfg: Config) -> list[str]:
    """Overrides that make the config's relative, existing paths absolute (trials run in other folders)."""
    flat = flatten(cfg)
    return [f"{key}={Path(flat[key]).resolve()}" for key in PATH_KEYS
            if flat[key] and not Path(flat[key]).is_absolute() and Path(flat[key]).exists()]  # fmt: skip


def prepare(opts: SweepOptions, kind: str) -> Sweep:
    """Check the options, resolve names and paths, open (or, resuming, reopen) the MLflow parent run."""
    check_shape(opts.shape, opts.archs)
    storage = opts.storage or str(Path.cwd() / "runs" / "sweeps")
    remote = "://" in storage  # e.g. s3://bucket/path: the shared storage a multi-node cluster needs
    if not remote and not Path(storage).is_absolute():
        raise ValueError(f"--storage {opts.storage!r}: Ray needs an absolute path or a URI (s3://...)")
    if opts.resume and not opts.name:
        raise ValueError("--resume needs --name, the name of the sweep to continue (a folder in --storage)")
    name = opts.name or time.strftime(f"{kind}_%Y%m%d_%H%M%S")
    experiment = f"{storage.rstrip('/')}/{name}"
    local_dir = Path.cwd() / "runs" / "sweeps" / name if remote else Path(experiment)
    config = str(preset_path(opts.config).resolve()) if opts.config else None
    smoke = list(SMOKE_OVERRIDES) if opts.smoke else []
    base = load_config(config, [*smoke, *opts.overrides])
    uri = base.tracking.uri or _cluster_uri(opts) or default_uri()
    fixed = [*smoke, *opts.overrides, *_absolute_paths(base), f"tracking.uri={uri}"]
    base = load_config(config, fixed)

    parent = None
    if base.tracking.enabled:
        tracking = TrackingConfig(uri=uri, experiment=base.tracking.experiment)
        parent = Tracker(tracking, local_dir / "mlflow_parent", run_name=f"{kind} {name}")
        parent.log_params({"sweep.kind": kind, "sweep.config": opts.config, "sweep.archs": opts.archs,
                           "sweep.scales": opts.scales, "sweep.overrides": " ".join(opts.overrides),
                           "sweep.workers_per_trial": opts.shape.spec(),
                           "sweep.cpus_per_worker": opts.shape.cpus_per_worker,
                           "sweep.gpus_per_worker": opts.shape.gpus_per_worker,
                           "sweep.placement": opts.shape.placement})  # fmt: skip
        if opts.resume:
            parent.set_tags({"clipzss.resumed": time.strftime("%Y-%m-%d %H:%M:%S")})
    return Sweep(name, experiment, local_dir, config, base, fixed, parent)


def _cluster_uri(opts: SweepOptions) -> str | None:
    """With ``--address``: the MLflow server the cluster's head publishes (``clipzss.sweep.endpoints``), so trials on
    every node log to it; None on one machine or on a cluster without one."""
    if not opts.address:
        return None
    from clipzss.sweep.endpoints import cluster_tracking_uri

    _connect(opts)
    return cluster_tracking_uri()


def _connect(opts: SweepOptions) -> bool:
    """Join the cluster at ``--address``, or start a private Ray (even next to a running ``ray start`` cluster,
    which a bare ``ray.init()`` would join and then refuse ``num_cpus``). Returns whether Ray was started here."""
    import ray

    if ray.is_initialized():
        return False
    if opts.address:
        ray.init(address=opts.address)
    else:
        ray.init(address="local", num_cpus=2 if opts.smoke else None)
    return True


def fit(sweep: Sweep, opts: SweepOptions, space: dict[str, Any], tune_config, **trial_kwargs):
    """Run (or, with ``opts.resume``, continue) the trials; returns Ray's ResultGrid.

    The parent run ends KILLED on an interrupt and FAILED on an error; the summary closes it otherwise.
    """
    import ray
    from ray import tune

    started = False
    try:
        started = _connect(opts)
        shape = opts.shape
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, config=sweep.config, fixed=sweep.fixed, shape=shape,
                                 max_failures=opts.max_failures,
                                 parent_run_id=sweep.parent.run_id if sweep.parent else "", **trial_kwargs),
            lambda sample: tune.PlacementGroupFactory([shape.resources(sample)]),
        )  # fmt: skip
        if opts.resume:
            if not tune.Tuner.can_restore(sweep.experiment):
                raise FileNotFoundError(f"--resume: no Ray Tune experiment to restore in {sweep.experiment}")
            tuner = tune.Tuner.restore(sweep.experiment, trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune_config,
                run_config=tune.RunConfig(
                    name=sweep.name,
                    storage_path=sweep.experiment.rsplit("/", 1)[0],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # the latest two (restarts need one)
                    failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                    verbose=1,
                ),
            )
        return tuner.fit()
    except BaseException as e:
        if sweep.parent:
            sweep.parent.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
