"""What a finished sweep reports: the trials table, the best config, the command that retrains it, true run states."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from clipzss.config import load_config, save_config
from clipzss.sweep.runner import Sweep
from clipzss.sweep.space import sample_overrides

METRIC, MODE = "val/hIoU", "max"
REPORTED = ("val/hIoU", "val/mIoU_S", "val/mIoU_U", "val/mIoU", "val/pAcc", "step")


def column(key: str) -> str:
    """A table column name without dots (MLflow's table view renders dotted JSON columns blank)."""
    return key.replace(".", "_")


def best_value(result) -> float:
    """The best ``val/hIoU`` a trial reported (an early-stopped trial included)."""
    history = result.metrics_dataframe
    return float(history[METRIC].max()) if history is not None and METRIC in history else float("nan")


def trials_table(results, keys: list[str]) -> dict[str, list]:
    """Column-oriented table of every trial (MLflow ``log_table`` format): sampled values, best and last metrics."""
    names = [column(k) for k in (*keys, *REPORTED)]
    table: dict[str, list] = {"trial": [], "status": [], **{n: [] for n in names}, "best_val_hIoU": []}
    for result in results:
        metrics = result.metrics or {}
        table["trial"].append(metrics.get("trial_id", Path(result.path).name))
        table["status"].append("ERROR" if result.error else "TERMINATED")
        for key in keys:
            table[column(key)].append(result.config.get(key))
        for key in REPORTED:
            table[column(key)].append(float(metrics.get(key, float("nan"))))
        table["best_val_hIoU"].append(best_value(result))
    return table


def save_best_config(sweep: Sweep, sample: dict[str, Any]) -> Path:
    """Write the config of ``sample`` to ``<local_dir>/best_config.yaml`` (training into ``runs/<name>_best``)."""
    cfg = load_config(sweep.config, [*sweep.fixed, *sample_overrides(sample), f"run.output_dir=runs/{sweep.name}_best"])
    sweep.local_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.local_dir / "best_config.yaml"
    save_config(cfg, path)
    if sweep.parent:
        sweep.parent.log_artifact(path)
    return path


def retrain_command(config_file: Path) -> str:
    """The command that retrains a saved config, from the user's working directory."""
    shown = os.path.relpath(config_file) if config_file.is_relative_to(Path.cwd()) else str(config_file)
    return f"accelerate launch -m clipzss.train {shown}"


def print_best(sweep: Sweep, label: str, value: float, sample: dict[str, Any], config_file: Path) -> str:
    """Print the best point and the retrain command; returns the command."""
    command = retrain_command(config_file)
    print(f"\nsweep {sweep.name}: results in {sweep.local_dir}")
    print(f"best {label}: {METRIC} = {value:.2f}")
    for key, item in sample.items():
        print(f"  {key} = {item}")
    print(f"retrain it: {command}")
    return command


def trial_run_name(result) -> str:
    """The MLflow run name of a trial: ``tune.get_context().get_trial_name()``, i.e. ``run_trial_<trial id>`` (the
    trial folder starts with it, then ``_<index>_<params>``, for a trial that never reported)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return f"run_trial_{trial_id}"
    found = re.match(r"(run_trial_.+?)_\d+_[A-Za-z]", Path(result.path).name)
    return found.group(1) if found else Path(result.path).name


def close_children(sweep: Sweep, parents: list[str], results) -> dict[str, int]:
    """Make every child run's state true after the sweep; returns the counts.

    A RUNNING run of no trial of ``results`` belonged to a trial Ray lost with its driver before saving the
    experiment state (``--resume`` samples it again as a new trial): it is deleted (MLflow keeps it in the trash),
    so each trial has one child run. Any other run still RUNNING (its trial process ended without closing it)
    ends KILLED, tagged so.
    """
    if not sweep.parent:
        return {"killed": 0, "deleted": 0}
    client = sweep.parent.client
    experiment = client.get_run(sweep.parent.run_id).info.experiment_id
    trials = {trial_run_name(r) for r in results}
    counts = {"killed": 0, "deleted": 0}
    for parent in parents:
        for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'"):
            if run.info.status != "RUNNING":
                continue
            if run.info.run_name not in trials:
                client.set_tag(run.info.run_id, "clipzss.stopped", "its trial was lost with the sweep's driver")
                client.delete_run(run.info.run_id)
                counts["deleted"] += 1
            else:
                client.set_tag(run.info.run_id, "clipzss.stopped", "its trial process ended without closing the run")
                client.set_terminated(run.info.run_id, status="KILLED")
                counts["killed"] += 1
    return counts
