"""Ray Tune + Optuna sweep over student backbones and the method's [choice] knobs, every trial a real ``train()``.

    python sweeps/backbones.py [--config PRESET_OR_YAML] [--set k=v ...] [--samples N] [--max-concurrent N]
        [--cpus-per-trial N] [--gpus-per-trial N] [--storage ABS_PATH] [--name NAME] [--resume] [--address auto]
        [--archs a,b,c] [--scales 4,8,16 8,16] [--grace-period N] [--max-failures N] [--smoke]
    ray submit cluster/cluster.yaml sweeps/backbones.py -- --config voc --set data.root=... --address auto

The search space is flat over the config's dotted keys (the names of the CLI and of MLflow params): Optuna
(TPE) samples it, ASHA stops weak trials early on ``val/hIoU`` (one rung unit = one evaluation). One MLflow parent
run holds the sweep (best config, table of all trials); each trial's training run is nested under it. This is the
only module of the project that imports Ray.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipzss.config import (
    Config,
    ConfigError,
    TrackingConfig,
    flatten,
    load_config,
    preset_path,
    save_config,
    set_value,
    to_dict,
)

METRIC, MODE = "val/hIoU", "max"
REPORTED = ("val/hIoU", "val/mIoU_S", "val/mIoU_U", "val/mIoU", "val/pAcc", "step")
ARCHS = ("segformer_b0", "segformer_b2", "swin_tiny", "resnet50", "convnext_tiny")
SCALES = ("4,8,16", "8,16", "4,8", "8", "16")  # windows in teacher tokens (32x32 grid for ViT-B/16 at 512 px)
TUPLE_KEYS = ("plm.kmeans.scales",)  # sampled as "4,8,16" strings (Optuna needs hashable choices)
# Relative paths would break inside trials (Ray moves each trial into its own working folder): made absolute.
PATH_KEYS = ("data.root", "data.eval_root", "teacher.model", "teacher.pretrained", "teacher.cache_dir",
             "student.pretrained")  # fmt: skip
SMOKE_ARCHS = ("segformer_tiny", "resnet_tiny")
SMOKE_SCALES = ("2", "2,4")
SMOKE_OVERRIDES = (
    "optim.max_iters=4",
    "optim.warmup_iters=1",
    "run.log_interval=2",
    "run.eval_interval=2",
    "run.checkpoint_interval=2",
    "data.max_eval_images=4",
    "data.num_workers=0",
    "run.device=cpu",
    "run.progress=false",
    "tracking.log_images=false",
)


@dataclass
class SweepOptions:
    """What the command line sets; ``run_sweep`` takes one of these."""

    config: str | None = "synthetic"  # preset name or YAML file; None = code defaults only
    overrides: list[str] = field(default_factory=list)  # fixed ``key=value`` for every trial
    samples: int = 16
    max_concurrent: int = 4
    cpus_per_trial: float = 4.0
    gpus_per_trial: float = 1.0  # at most 1: a trial is one Accelerate process (fractions share a GPU)
    storage: str = ""  # Ray's results: an absolute folder or a URI (s3://...); "" = <cwd>/runs/sweeps
    name: str = ""  # "" = backbones_<timestamp>; --resume needs the name of the sweep to continue
    resume: bool = False
    address: str = ""  # "auto" joins a running cluster (ray submit); "" starts Ray on this machine
    archs: tuple[str, ...] = ARCHS
    scales: tuple[str, ...] = SCALES
    grace_period: int = 2  # evaluations before ASHA may stop a trial
    max_failures: int = 1  # Ray restarts a failed trial this often, from its last reported checkpoint
    smoke: bool = False


def search_space(archs: tuple[str, ...] = ARCHS, scales: tuple[str, ...] = SCALES) -> dict[str, Any]:
    """The flat Tune search space over dotted config keys."""
    from ray import tune

    return {
        "student.arch": tune.choice(list(archs)),
        "plm.kmeans.scales": tune.choice(list(scales)),
        "optim.lr": tune.loguniform(5e-6, 2e-4),
        "plm.kmeans.fuse_threshold": tune.uniform(0.7, 0.95),
        "glm.weight": tune.choice([0.0, 0.5, 1.0, 2.0]),  # 0 = the GLM is not built (an ablation arm)
        "glm.tau": tune.loguniform(0.03, 0.2),
    }


def sample_overrides(sample: dict[str, Any]) -> list[str]:
    """``key=value`` overrides of one sampled point: ``{"plm.kmeans.scales": "4,8"}`` -> ``plm.kmeans.scales=[4,8]``."""
    return [f"{key}=[{value}]" if key in TUPLE_KEYS else f"{key}={value!r}" for key, value in sample.items()]


def space_corners(space: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of every categorical choice with each numeric range at its two bounds."""
    from ray.tune.search.sample import Categorical, Float, Integer

    options: dict[str, list[Any]] = {}
    for key, domain in space.items():
        if isinstance(domain, Categorical):
            options[key] = list(domain.categories)
        elif isinstance(domain, (Float, Integer)):
            options[key] = [domain.lower, domain.upper]
        else:
            raise TypeError(f"search space key {key!r}: unsupported domain {type(domain).__name__}")
    for values in itertools.product(*options.values()):
        yield dict(zip(options, values, strict=True))


def check_space(config: str | None, fixed: list[str], space: dict[str, Any]) -> int:
    """Build the config of every corner of ``space``; raises ConfigError naming the bad key. Returns the count."""
    from clipzss.models.students import STUDENTS

    base = load_config(config, fixed)
    count = 0
    for corner in space_corners(space):
        cfg = copy.deepcopy(base)
        for item in sample_overrides(corner):  # as load_config applies overrides, without re-reading the YAML
            key, _, raw = item.partition("=")
            set_value(cfg, key, yaml.safe_load(raw), source="search space")
        if cfg.student.arch not in STUDENTS:
            allowed = ", ".join(STUDENTS)
            raise ConfigError(f"student.arch: unknown architecture {cfg.student.arch!r}; allowed: {allowed}")
        count += 1
    return count


def _tune_report(metrics: dict[str, float], checkpoint: Path | None) -> None:
    """Report to Tune; a checkpoint travels as a folder holding only that one file."""
    from ray import tune

    if checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy2(checkpoint, folder)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # copied to storage before return


def _reattach_mlflow_run(cfg: Config, output_dir: Path) -> None:
    """A trial restarted in a fresh folder continues its own MLflow run (found by parent and run name)."""
    from mlflow.tracking import MlflowClient

    from clipzss.engine.tracking import RUN_ID_FILE

    id_file = output_dir / RUN_ID_FILE
    if id_file.exists() or not cfg.tracking.enabled:
        return
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return
    t = cfg.tracking
    query = f"tags.mlflow.parentRunId = '{t.parent_run_id}' and tags.`mlflow.runName` = '{t.run_name}'"
    runs = client.search_runs([experiment.experiment_id], query)
    if runs:
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(runs[0].info.run_id)


def run_trial(sample: dict[str, Any], config: str | None, fixed: list[str], parent_run_id: str) -> None:
    """The Tune function trainable: one real ``train()`` on the base config + fixed overrides + ``sample``.

    Its output folder is the trial's own Ray folder. When Ray restarts the trial, the checkpoint it last reported is
    copied back into ``<output_dir>/checkpoints`` and training continues exactly from there.
    """
    from ray import tune

    from clipzss.engine.checkpoint import CHECKPOINT_DIR, latest_checkpoint
    from clipzss.train import train

    context = tune.get_context()
    output_dir = Path(context.get_trial_dir()).resolve()
    cfg = load_config(config, [*fixed, *sample_overrides(sample)])
    set_value(cfg, "run.output_dir", str(output_dir))
    if cfg.tracking.enabled and parent_run_id:
        set_value(cfg, "tracking.parent_run_id", parent_run_id)
        set_value(cfg, "tracking.run_name", context.get_trial_name())

    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            for file in Path(folder).glob("step_*.pt"):
                target = output_dir / CHECKPOINT_DIR / file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    shutil.copy2(file, target)
        _reattach_mlflow_run(cfg, output_dir)

    final: list[tuple[dict[str, float], Path | None]] = []

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        # The last evaluation is held back until train() returns: ASHA answers a result at max_t with STOP, which
        # would end the trial before it exports model.pt and closes its MLflow run.
        if metrics["step"] >= cfg.optim.max_iters:
            final.append((metrics, checkpoint))
        else:
            _tune_report(metrics, checkpoint)

    train(cfg, report=report, resume=latest_checkpoint(output_dir) is not None)
    for metrics, checkpoint in final:
        _tune_report(metrics, checkpoint)


def evaluations_per_trial(cfg: Config) -> int:
    """How many times one trial reports (evaluations at every ``eval_interval`` and at the end)."""
    every, last = cfg.run.eval_interval, cfg.optim.max_iters
    return len(set(range(every, last + 1, every)) | {last}) if every else 1


def _absolute_paths(cfg: Config) -> list[str]:
    """Overrides that make the config's relative, existing paths absolute (trials run in other folders)."""
    flat = flatten(cfg)
    return [f"{key}={Path(flat[key]).resolve()}" for key in PATH_KEYS
            if flat[key] and not Path(flat[key]).is_absolute() and Path(flat[key]).exists()]  # fmt: skip


def trials_table(results, keys: list[str]) -> dict[str, list]:
    """Column-oriented table of every trial (MLflow ``log_table`` format): sampled values, best and last metrics."""
    table: dict[str, list] = {"trial": [], "status": [], **{k: [] for k in keys}, f"best {METRIC}": []}
    table.update({k: [] for k in REPORTED})
    for result in results:
        metrics, history = result.metrics or {}, result.metrics_dataframe
        table["trial"].append(metrics.get("trial_id", Path(result.path).name))
        table["status"].append("ERROR" if result.error else "TERMINATED")
        for key in keys:
            table[key].append(result.config.get(key))
        best = history[METRIC].max() if history is not None and METRIC in history else float("nan")
        table[f"best {METRIC}"].append(float(best))
        for key in REPORTED:
            table[key].append(float(metrics.get(key, float("nan"))))
    return table


def _close_stopped_children(tracker) -> int:
    """Mark as KILLED the child runs left RUNNING by trials that ASHA stopped early (their process was ended)."""
    parent = tracker.client.get_run(tracker.run_id)
    stale = tracker.client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{tracker.run_id}' and attributes.status = 'RUNNING'",
    )
    for run in stale:
        tracker.client.set_tag(run.info.run_id, "clipzss.stopped", "early stopping (ASHA)")
        tracker.client.set_terminated(run.info.run_id, status="KILLED")
    return len(stale)


def run_sweep(opts: SweepOptions) -> dict[str, Any]:
    """Run (or, with ``opts.resume``, continue) the sweep; returns the best trial, its config and the trials table."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from clipzss.engine.tracking import Tracker, default_uri

    if opts.gpus_per_trial > 1:
        raise ValueError(
            f"--gpus-per-trial {opts.gpus_per_trial}: a trial is one Accelerate process (one GPU at most); for "
            "several GPUs per run use `accelerate launch --multi_gpu` on clipzss/train.py"
        )
    storage = opts.storage or str(Path.cwd() / "runs" / "sweeps")
    remote = "://" in storage  # e.g. s3://bucket/path: the shared storage a multi-node cluster needs
    if not remote and not Path(storage).is_absolute():
        raise ValueError(f"--storage {opts.storage!r}: Ray needs an absolute path or a URI (s3://...)")
    if opts.resume and not opts.name:
        raise ValueError("--resume needs --name, the name of the sweep to continue (a folder in --storage)")
    name = opts.name or time.strftime("backbones_%Y%m%d_%H%M%S")
    experiment = f"{storage.rstrip('/')}/{name}"
    # the sweep's own files (MLflow parent id, best config) live beside Ray's results, or here for a URI storage
    experiment_dir = Path.cwd() / "runs" / "sweeps" / name if remote else Path(experiment)
    config = str(preset_path(opts.config).resolve()) if opts.config else None

    base = load_config(config, [*(SMOKE_OVERRIDES if opts.smoke else ()), *opts.overrides])
    uri = base.tracking.uri or default_uri()
    fixed = [*(SMOKE_OVERRIDES if opts.smoke else ()), *opts.overrides, *_absolute_paths(base), f"tracking.uri={uri}"]
    space = search_space(opts.archs, opts.scales)
    check_space(config, fixed, space)
    reports = evaluations_per_trial(base)

    parent = None
    if base.tracking.enabled:
        tracking = TrackingConfig(uri=uri, experiment=base.tracking.experiment)
        parent = Tracker(tracking, experiment_dir / "mlflow_parent", run_name=f"sweep {name}")
        parent.log_params({"sweep.config": opts.config, "sweep.samples": opts.samples, "sweep.archs": opts.archs,
                           "sweep.scales": opts.scales, "sweep.overrides": " ".join(opts.overrides)})  # fmt: skip

    started = not ray.is_initialized()
    if opts.address:
        ray.init(address=opts.address)
    elif started:
        ray.init(num_cpus=2 if opts.smoke else None)
    if __name__ != "__main__":  # trials unpickle this module by value: workers need clipzss, not `sweeps`
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, config=config, fixed=fixed, parent_run_id=parent.run_id if parent else ""),
            {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
        )
        if opts.resume:
            if not tune.Tuner.can_restore(experiment):
                raise FileNotFoundError(f"--resume: no Ray Tune experiment to restore in {experiment}")
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode=MODE,
                    search_alg=OptunaSearch(seed=base.run.seed),
                    scheduler=ASHAScheduler(
                        time_attr="training_iteration",
                        max_t=reports,
                        grace_period=reports if opts.smoke else min(opts.grace_period, reports),
                        reduction_factor=3,  # rungs at 1, 3, 9 evaluations of a 10-evaluation run
                    ),
                    num_samples=opts.samples,
                    max_concurrent_trials=opts.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
                    ),  # the latest checkpoint is always kept as well (what a restarted trial resumes from)
                    failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                    verbose=1,
                ),
            )
        results = tuner.fit()
    except BaseException:
        if parent:
            parent.finish("FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    return _summarise(results, config, fixed, list(space), name, experiment_dir, parent)


def _summarise(results, config, fixed, keys, name, experiment_dir, parent) -> dict[str, Any]:
    """Best trial and trials table: printed, saved beside the Ray results, logged to the MLflow parent run."""
    table = trials_table(results, keys)
    if results.num_errors == len(results):
        if parent:
            parent.log_table(table, "trials.json")
            parent.finish("FAILED")
        raise RuntimeError(f"sweep {name}: every trial failed; first error: {results.errors[0]!r}")
    best = results.get_best_result(METRIC, MODE, scope="all")
    best_sample = {k: best.config[k] for k in keys}
    best_value = float(best.metrics_dataframe[METRIC].max())
    best_cfg = load_config(config, [*fixed, *sample_overrides(best_sample), f"run.output_dir=runs/{name}_best"])
    experiment_dir.mkdir(parents=True, exist_ok=True)
    save_config(best_cfg, experiment_dir / "best_config.yaml")
    if parent:
        parent.log_table(table, "trials.json")
        parent.log_dict(to_dict(best_cfg), "best_config.yaml")
        parent.log_metrics({f"best/{METRIC}": best_value}, step=0)
        parent.set_tags({"clipzss.best_trial": str(best.metrics.get("trial_id", ""))})
        _close_stopped_children(parent)
        parent.finish()
    print(f"\nsweep {name}: {len(results)} trials, {results.num_errors} failed; results in {experiment_dir}")
    print(f"best trial {best.metrics.get('trial_id')}: {METRIC} = {best_value:.2f}")
    for key, value in best_sample.items():
        print(f"  {key} = {value}")
    print(f"retrain it: accelerate launch clipzss/train.py {experiment_dir / 'best_config.yaml'}")
    return {
        "name": name,
        "path": str(experiment_dir),
        "best_trial": best.metrics.get("trial_id"),
        "best_sample": best_sample,
        "best_value": best_value,
        "table": table,
        "parent_run_id": parent.run_id if parent else "",
    }


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = argparse.ArgumentParser(prog="sweeps/backbones.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="synthetic", help="preset name or YAML file (default: synthetic)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override for every trial")
    p.add_argument("--samples", type=int, help="number of trials (default 16; 2 with --smoke)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default 4; 2 with --smoke)")
    p.add_argument("--cpus-per-trial", type=float, help="default 4; 1 with --smoke")
    p.add_argument("--gpus-per-trial", type=float, help="0, a fraction, or 1 (default 1; 0 with --smoke)")
    p.add_argument("--storage", default="", help="absolute folder or URI of Ray's results (default <cwd>/runs/sweeps)")
    p.add_argument("--name", default="", help="sweep name (default backbones_<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue sweep --name (give the same --config, --set)")
    p.add_argument("--address", default="", help="'auto' to join the running cluster (under `ray submit`)")
    p.add_argument("--archs", help=f"comma-separated student.arch choices (default {','.join(ARCHS)})")
    p.add_argument("--scales", nargs="+", help=f"plm.kmeans.scales choices (default {' '.join(SCALES)})")
    p.add_argument("--grace-period", type=int, default=2, help="evaluations before ASHA may stop a trial")
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a failed trial from its checkpoint")
    p.add_argument("--smoke", action="store_true", help="2 tiny CPU trials of a few steps: proves the whole path")
    a = p.parse_args(argv)
    smoke = a.smoke

    def pick(value, default, smoke_default):
        return value if value is not None else (smoke_default if smoke else default)

    return SweepOptions(
        config=a.config,
        overrides=a.set,
        samples=pick(a.samples, 16, 2),
        max_concurrent=pick(a.max_concurrent, 4, 2),
        cpus_per_trial=pick(a.cpus_per_trial, 4.0, 1.0),
        gpus_per_trial=pick(a.gpus_per_trial, 1.0, 0.0),
        storage=a.storage,
        name=a.name,
        resume=a.resume,
        address=a.address,
        archs=tuple(a.archs.split(",")) if a.archs else (SMOKE_ARCHS if smoke else ARCHS),
        scales=tuple(a.scales) if a.scales else (SMOKE_SCALES if smoke else SCALES),
        grace_period=a.grace_period,
        max_failures=a.max_failures,
        smoke=smoke,
    )


def main(argv: list[str] | None = None) -> int:
    run_sweep(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
