"""The backbone search: Optuna (TPE) samples the flat space, ASHA stops weak trials early on ``val/hIoU``.

One rung unit is one evaluation. TPE first tries every backbone and every scale set once (round robin), then
samples. The parent run ends with the trials table, the best config and Optuna's own plots.
"""

from __future__ import annotations

from typing import Any

from clipzss.config import Config
from clipzss.sweep.options import SweepOptions
from clipzss.sweep.optuna_plots import log_optuna_plots
from clipzss.sweep.registry import model_name, register_best
from clipzss.sweep.runner import Sweep, fit, prepare
from clipzss.sweep.space import check_space, first_points, search_space
from clipzss.sweep.summary import (
    METRIC,
    MODE,
    best_value,
    close_children,
    print_best,
    save_best_config,
    trial_run_name,
    trials_table,
)


def evaluations_per_trial(cfg: Config) -> int:
    """How many times one trial reports (evaluations at every ``eval_interval`` and at the end)."""
    every, last = cfg.run.eval_interval, cfg.optim.max_iters
    return len(set(range(every, last + 1, every)) | {last}) if every else 1


def tune_config(sweep: Sweep, opts: SweepOptions, space: dict[str, Any]):
    """TPE + ASHA over ``opts.samples`` trials."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    reports = evaluations_per_trial(sweep.base)
    first = first_points(space, sweep.base, opts.archs, opts.scales)
    return tune.TuneConfig(
        metric=METRIC,
        mode=MODE,
        search_alg=OptunaSearch(seed=sweep.base.run.seed, points_to_evaluate=first),
        scheduler=ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=min(opts.grace_period, reports),
            reduction_factor=3,  # rungs at 1, 3, 9 evaluations of a 10-evaluation run
        ),
        num_samples=opts.samples,
        max_concurrent_trials=opts.max_concurrent,
    )


def run_search(opts: SweepOptions) -> dict[str, Any]:
    """Run (or continue) the TPE + ASHA sweep; returns the best trial, its config, the retrain command, the table."""
    sweep = prepare(opts, "backbones")
    space = search_space(sweep.base, opts.archs, opts.scales)
    check_space(sweep.config, sweep.fixed, space)
    results = fit(sweep, opts, space, tune_config(sweep, opts, space))

    table = trials_table(results, list(space))
    parent = sweep.parent
    if parent:
        parent.log_table(table, "trials.json")
        close_children(sweep, [parent.run_id], results)
    if results.num_errors == len(results):
        if parent:
            parent.finish("FAILED")
        raise RuntimeError(f"sweep {sweep.name}: every trial failed; first error: {results.errors[0]!r}")
    best = results.get_best_result(METRIC, MODE, scope="all")
    sample = {k: best.config[k] for k in space}
    value = best_value(best)
    config_file = save_best_config(sweep, sample)
    command = print_best(sweep, f"trial {best.metrics.get('trial_id')}", value, sample, config_file)
    if parent:
        log_optuna_plots(table, space, sweep.local_dir / "optuna", parent)
        parent.log_metrics({f"best/{METRIC}": value}, step=0)
        parent.set_tags({"clipzss.best_trial": str(best.metrics.get("trial_id", "")), "clipzss.retrain": command})
        runs = [(trial_run_name(r), best_value(r)) for r in results if not r.error]
        model = model_name(opts.register_as, sweep.base.tracking.experiment)
        register_best(parent, [parent.run_id], runs, model, sweep.name)
        parent.finish()
    return {
        "name": sweep.name,
        "path": str(sweep.local_dir),
        "best_trial": best.metrics.get("trial_id"),
        "best_sample": sample,
        "best_value": value,
        "retrain": command,
        "table": table,
        "parent_run_id": parent.run_id if parent else "",
    }
