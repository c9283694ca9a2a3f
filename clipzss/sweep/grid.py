"""The benchmark grid: every backbone x K-Means scales cell for N seeds, through Ray Tune, into one table.

MLflow: the parent run holds the table (``benchmark.json``, ``benchmark.md``) and the hIoU heatmap; each cell is
a child run (mean ± std over its seeds, cost) and each seed's training run is nested under its cell. Every trial
runs to the end (no early stopping: a table needs every cell). Resumes like the search (``--resume --name``).
"""

from __future__ import annotations

import math
from typing import Any

from clipzss.config import TrackingConfig
from clipzss.engine.tracking import Tracker
from clipzss.sweep.options import SweepOptions
from clipzss.sweep.registry import model_name, register_best
from clipzss.sweep.runner import Sweep, fit, prepare
from clipzss.sweep.space import check_space, grid_space
from clipzss.sweep.summary import METRIC, close_children, print_best, save_best_config, trial_run_name
from clipzss.sweep.table import COSTS, METRICS, cell_table, format_markdown, plot_heatmap
from clipzss.sweep.trainable import cell_key


def open_cell_runs(sweep: Sweep, opts: SweepOptions) -> dict[str, Tracker]:
    """One MLflow run per cell, nested under the parent (reopened when the sweep resumes)."""
    if not sweep.parent:
        return {}
    tracking = TrackingConfig(uri=sweep.base.tracking.uri, experiment=sweep.base.tracking.experiment)
    cells = {}
    for arch in opts.archs:
        for scales in opts.scales:
            key = cell_key({"student.arch": arch, "plm.kmeans.scales": scales})
            folder = sweep.local_dir / "cells" / f"{arch}_{scales.replace(',', '-')}"
            cells[key] = Tracker(tracking, folder, run_name=f"{arch} scales {scales}",
                                 tags={"mlflow.parentRunId": sweep.parent.run_id})  # fmt: skip
            cells[key].log_params({"student.arch": arch, "plm.kmeans.scales": scales, "sweep.seeds": opts.seeds})
    return cells


def trial_record(result, devices: float) -> dict[str, Any]:
    """One finished trial as a row of :func:`clipzss.sweep.table.cell_table`; ``devices``: what the trial held."""
    m = result.metrics
    record = {"backbone": result.config["student.arch"], "scales": result.config["plm.kmeans.scales"],
              "seed": result.config["run.seed"], **{k: m[f"val/{k}"] for k in METRICS},
              "params_M": m["cost/params_M"], "GFLOPs": m["cost/gflops"], "images_per_s": m["cost/images_per_s"],
              "device_hours": m["time_total_s"] / 3600 * devices}  # fmt: skip
    return record


def _log_cells(cells: dict[str, Tracker], table: dict[str, list]) -> None:
    for i, (arch, scales) in enumerate(zip(table["backbone"], table["scales"], strict=True)):
        columns = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + [*COSTS, "device_hours", "p_value"]
        cell = cells[cell_key({"student.arch": arch, "plm.kmeans.scales": scales})]
        cell.log_metrics({c: table[c][i] for c in columns}, step=0)
        cell.set_tags({"clipzss.reference": str(table["reference"][i])})


def _finish(sweep: Sweep, cells: dict[str, Tracker], status: str = "FINISHED") -> None:
    for cell in cells.values():
        cell.finish(status)
    if sweep.parent:
        sweep.parent.finish(status)


def run_benchmark(opts: SweepOptions) -> dict[str, Any]:
    """Run (or continue) the grid; returns the table, its markdown, the best cell and its retrain command."""
    from ray import tune

    sweep = prepare(opts, "benchmark")
    space = grid_space(opts.archs, opts.scales, opts.seeds)
    check_space(sweep.config, sweep.fixed, space)
    cells = open_cell_runs(sweep, opts)
    try:
        results = fit(sweep, opts, space, tune.TuneConfig(max_concurrent_trials=opts.max_concurrent),
                      cell_runs={k: c.run_id for k, c in cells.items()} or None, measure_cost=True)  # fmt: skip
    except BaseException as e:
        _finish(sweep, cells, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    close_children(sweep, [c.run_id for c in cells.values()], results)
    records = [trial_record(r, opts.shape.devices(r.config)) for r in results
               if not r.error and r.metrics and "cost/gflops" in r.metrics]  # fmt: skip
    if not records:
        _finish(sweep, cells, "FAILED")
        raise RuntimeError(f"sweep {sweep.name}: no trial finished; first error: {results.errors[:1]!r}")
    reference = tuple(opts.reference.split("/", 1)) if opts.reference else None
    table = cell_table(records, reference)
    seeds_by_cell: dict[str, list[tuple[str, float]]] = {}
    for r in results:
        if not r.error and r.metrics and METRIC in r.metrics:
            seeds_by_cell.setdefault(cell_key(r.config), []).append((trial_run_name(r), r.metrics[METRIC]))
    report = _report(sweep, cells, table, len(results) - len(records))
    if sweep.parent:
        best_seeds = seeds_by_cell.get(cell_key(report["best_cell"]), [])
        model = model_name(opts.register_as, sweep.base.tracking.experiment)
        report["registered"] = register_best(sweep.parent, [c.run_id for c in cells.values()], best_seeds, model,
                                             sweep.name)  # fmt: skip
    _finish(sweep, cells)
    return report


def _report(sweep: Sweep, cells: dict[str, Tracker], table: dict[str, list], failed: int) -> dict[str, Any]:
    """Write, print and log the table, the heatmap and the best cell."""
    text = format_markdown(table)
    sweep.local_dir.mkdir(parents=True, exist_ok=True)
    (sweep.local_dir / "benchmark.md").write_text(text + "\n")
    title = f"{sweep.name}: hIoU mean ± std over seeds"
    heatmap = plot_heatmap(table, sweep.local_dir / "benchmark_hIoU.png", title)
    print("\n" + text + (f"\n{failed} trial(s) failed and are not in the table" if failed else ""))
    best = max(range(len(table["backbone"])), key=lambda i: -math.inf if math.isnan(v := table["hIoU_mean"][i]) else v)
    sample = {"student.arch": table["backbone"][best], "plm.kmeans.scales": table["scales"][best]}
    config_file = save_best_config(sweep, sample)
    value = table["hIoU_mean"][best]
    command = print_best(sweep, f"cell (mean over {table['seeds'][best]} seeds)", value, sample, config_file)
    if sweep.parent:
        parent = sweep.parent
        parent.log_table(table, "benchmark.json")
        parent.log_artifact(sweep.local_dir / "benchmark.md")
        parent.log_artifact(heatmap)
        parent.log_metrics({f"best/{METRIC}": value, "failed_trials": failed}, step=0)
        parent.set_tags({"clipzss.best_cell": cell_key(sample), "clipzss.retrain": command})
        _log_cells(cells, table)
    parent_id = sweep.parent.run_id if sweep.parent else ""
    return {"name": sweep.name, "path": str(sweep.local_dir), "table": table, "markdown": text, "best_cell": sample,
            "best_value": value, "retrain": command, "parent_run_id": parent_id}  # fmt: skip
