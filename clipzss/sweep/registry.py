"""The best model of a sweep, registered in MLflow's model registry.

Each finished sweep adds one version to a registered model (by default ``clipzss-<experiment>``): the logged
``student`` of its best trial that trained to the end (an ASHA-stopped trial logs no model). The version carries the
sweep, the trial's run and its ``val/hIoU`` as tags, and an alias named after the sweep, so
``models:/<model>@<sweep>`` loads it (``clipzss segment --model models:/...``, ``mlflow.pyfunc.load_model``).
"""

from __future__ import annotations

import math

from clipzss.engine.registration import alias_for, register_version
from clipzss.engine.tracking import Tracker

__all__ = ["alias_for", "model_name", "register_best"]  # alias_for: the sweeps' alias rule


def model_name(register_as: str, experiment: str) -> str:
    """The registered model a sweep adds its best student to: ``--register-as``, else ``clipzss-<experiment>``."""
    return register_as or f"clipzss-{experiment}"


def register_best(
    parent: Tracker,
    parents: list[str],
    runs: list[tuple[str, float]],
    model: str,
    sweep_name: str,
) -> str | None:
    """Register the best of ``runs`` (child run name, ``val/hIoU``; nested under one of ``parents``) that logged a
    student as a version of ``model``; returns its ``models:/<model>@<alias>`` URI, or None when none did."""
    client = parent.client
    experiment = client.get_run(parent.run_id).info.experiment_id
    run_ids = {}
    for parent_id in parents:
        for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'"):
            run_ids.setdefault(run.info.run_name, run.info.run_id)
    for run_name, value in sorted(runs, key=_best_first):
        run_id = run_ids.get(run_name)
        if run_id is None:
            continue
        tags = {"clipzss.sweep": sweep_name, "clipzss.trial_run": run_name, "val/hIoU": f"{value:.2f}"}
        description = f"best of sweep {sweep_name}: {run_name}, val/hIoU {value:.2f}"
        uri = register_version(parent, model, run_id, sweep_name, tags, description)
        if uri is None:
            continue  # stopped early: it never exported a model
        parent.set_tags({"clipzss.registered_model": uri})
        print(f"registered {run_name} as {uri}")
        return uri
    print(f"no trial of sweep {sweep_name} logged a model; nothing registered")
    return None


def _best_first(run: tuple[str, float]) -> float:
    return -run[1] if not math.isnan(run[1]) else math.inf  # a NaN metric ranks last
