"""The best model of a sweep, registered in MLflow's model registry.

Each finished sweep adds one version to a registered model (by default ``clipzss-<experiment>``): the logged
``student`` of its best trial that trained to the end (an ASHA-stopped trial logs no model). The version carries the
sweep, the trial's run and its ``val/hIoU`` as tags, and an alias named after the sweep, so
``models:/<model>@<sweep>`` loads it (``clipzss segment --model models:/...``, ``mlflow.pytorch.load_model``).
"""

from __future__ import annotations

import math
import re

from clipzss.engine.tracking import Tracker

STUDENT = "student"  # the name training logs its model under (Tracker.log_student)


def model_name(register_as: str, experiment: str) -> str:
    """The registered model a sweep adds its best student to: ``--register-as``, else ``clipzss-<experiment>``."""
    return register_as or f"clipzss-{experiment}"


def alias_for(sweep_name: str) -> str:
    """An MLflow alias from a sweep name (letters, digits, ``_`` and ``-``; never ``v<N>`` or ``latest``)."""
    alias = re.sub(r"[^\w-]", "_", sweep_name)
    return alias if not re.fullmatch(r"v\d+|latest", alias, flags=re.IGNORECASE) else f"sweep_{alias}"


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
        query = f"name = '{STUDENT}' AND source_run_id = '{run_id}'"
        logged = client.search_logged_models([experiment], filter_string=query, max_results=1)
        if not logged:
            continue  # stopped early: it never exported a model
        _ensure_registered_model(client, model)
        with parent.as_current_store():  # the registry looks the logged model up in MLflow's current store
            version = client.create_model_version(
                model,
                source=logged[0].model_uri,
                run_id=run_id,
                model_id=logged[0].model_id,
                tags={"clipzss.sweep": sweep_name, "clipzss.trial_run": run_name, "val/hIoU": f"{value:.2f}"},
                description=f"best of sweep {sweep_name}: {run_name}, val/hIoU {value:.2f}",
            )
        alias = alias_for(sweep_name)
        client.set_registered_model_alias(model, alias, version.version)
        uri = f"models:/{model}@{alias}"
        parent.set_tags({"clipzss.registered_model": uri})
        print(f"registered {run_name} as {model} version {version.version}: {uri}")
        return uri
    print(f"no trial of sweep {sweep_name} logged a model; nothing registered")
    return None


def _best_first(run: tuple[str, float]) -> float:
    return -run[1] if not math.isnan(run[1]) else math.inf  # a NaN metric ranks last


def _ensure_registered_model(client, name: str) -> None:
    """Create the registered model unless it exists (another sweep may create it at the same moment)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="CLIP-ZSS students: the best of each sweep")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
