"""A logged student in MLflow's model registry: a version of a registered model, pointed at by an alias.

``models:/<model>@<alias>`` then loads it (``clipzss segment --model models:/...``, ``mlflow.pyfunc.load_model``).
Training (``--register-as``), ``clipzss ablate`` and the sweeps register through :func:`register_version`.
"""

from __future__ import annotations

import re

STUDENT = "student"  # the name training logs its model under (Tracker.log_student)


def alias_for(name: str) -> str:
    """An MLflow alias from a name (letters, digits, ``_`` and ``-``; never ``v<N>`` or ``latest``, which MLflow
    reserves)."""
    alias = re.sub(r"[^\w-]", "_", name)
    return alias if not re.fullmatch(r"v\d+|latest", alias, flags=re.IGNORECASE) else f"sweep_{alias}"


def register_version(
    tracker, model: str, run_id: str, alias: str, tags: dict[str, str], description: str
) -> str | None:
    """Register the student that run ``run_id`` logged as a new version of ``model`` and point ``alias`` at it.

    Args:
        tracker: a :class:`~clipzss.engine.tracking.Tracker` of the run's store.
        model: the registered model (created when missing).
        run_id: the run that logged the student.
        alias: made a valid alias by :func:`alias_for`.
        tags, description: the version's.

    Returns:
        ``models:/<model>@<alias>``, or None when the run logged no student (a run stopped early exports none).
    """
    from clipzss.engine.tracking import tracking_user

    client = tracker.client
    experiment = client.get_run(run_id).info.experiment_id
    query = f"name = '{STUDENT}' AND source_run_id = '{run_id}'"
    logged = client.search_logged_models([experiment], filter_string=query, max_results=1)
    if not logged:
        return None
    ensure_registered_model(client, model)
    with tracker.as_current_store():  # the registry looks the logged model up in MLflow's current store
        version = client.create_model_version(
            model,
            source=logged[0].model_uri,
            run_id=run_id,
            model_id=logged[0].model_id,
            tags={**tags, "mlflow.user": tracking_user()},  # who registered it
            description=description,
        )
    alias = alias_for(alias)
    client.set_registered_model_alias(model, alias, version.version)
    return f"models:/{model}@{alias}"


def ensure_registered_model(client, name: str) -> None:
    """Create the registered model unless it exists (another run may create it at the same moment)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="CLIP-ZSS students (clipzss)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
