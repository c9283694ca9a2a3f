"""Optuna's own plots of a TPE sweep (history, parameter importances, parallel coordinates) for the parent run.

The study is rebuilt from the trials table with Optuna's public API (``create_trial``): it works the same after a
resumed sweep, whose searcher lives inside Ray's restored state. A trial's value is the best ``val/hIoU`` it
reported, so early-stopped trials count with what they reached.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clipzss.sweep.summary import column

PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_parallel_coordinate")


def _distribution(domain: Any):
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from ray.tune.search.sample import Categorical, LogUniform

    if isinstance(domain, Categorical):
        return CategoricalDistribution(list(domain.categories))
    return FloatDistribution(domain.lower, domain.upper, log=isinstance(domain.get_sampler(), LogUniform))


def study_from_table(table: dict[str, list], space: dict[str, Any]):
    """An Optuna study (maximise) holding every trial of the table that reported a value."""
    import optuna

    distributions = {key: _distribution(domain) for key, domain in space.items()}
    study = optuna.create_study(direction="maximize", study_name="clipzss sweep")
    for row, value in enumerate(table["best_val_hIoU"]):
        if math.isfinite(value):
            params = {key: table[column(key)][row] for key in space}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    return study


def log_optuna_plots(table: dict[str, list], space: dict[str, Any], folder: Path, parent) -> list[Path]:
    """Draw each plot (a plot Optuna cannot draw from these trials is skipped, saying why), save, log to ``parent``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = study_from_table(table, space)
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for name in PLOTS:
        try:
            axes = getattr(plots, name)(study)
        except Exception as e:  # e.g. importances need two distinct values of some parameter
            print(f"optuna {name}: not drawn ({type(e).__name__}: {e})")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        path = folder / f"{name.removeprefix('plot_')}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        parent.log_artifact(path, "optuna")
        saved.append(path)
    return saved
