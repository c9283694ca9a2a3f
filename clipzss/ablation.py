"""The ablation benchmark on the offline synthetic world: does CLIP-ZSS transfer to unseen classes?

Arms (each one config delta on the ``synthetic`` preset, each over several seeds):
    baseline    seen-class NEL + CE on the text classifier only (GLM off, PLM off)
    +GLM        baseline + the Global Learning Module
    +PLM        baseline + the Pixel Learning Module (pseudo labels, synthesizer)
    full        CLIP-ZSS (GLM + PLM)
    supervised  upper bound: trained with every class labelled (split ``all``), plain NEL + CE; evaluated on the
                same seen/unseen partition as the others

The table (mean +- std over seeds) is printed, written to ``<out>/ablation.md`` (and plotted to ``ablation.png``) and
logged to MLflow on a new parent run per invocation whose children are the individual training runs (param ``arm``).
The parent carries the table as metrics (``full/val/hIoU_mean``, ``full/val/hIoU_std``, ...) and states the best arm
in its description; the best zero-shot student (any arm but ``supervised``) is registered with the alias ``ablation``.
Runs can train several at a time in subprocesses (``jobs``), e.g. on a many-core GPU machine.
"""

from __future__ import annotations

import shutil
import sys
import traceback
from pathlib import Path

import numpy as np

from clipzss.config import Config, load_config
from clipzss.data.synthetic import selection_root
from clipzss.engine.registration import register_version
from clipzss.engine.tracking import RUN_ID_FILE, Tracker
from clipzss.sweep.registry import model_name
from clipzss.train import prepare_data_root, train

ARMS: dict[str, list[str]] = {
    "baseline": ["glm.weight=0", "plm.enabled=false"],
    "+GLM": ["plm.enabled=false"],
    "+PLM": ["glm.weight=0"],
    "full": [],
    "supervised": ["data.split=all", "data.eval_split=default", "glm.weight=0", "plm.enabled=false"],
}
METRICS = ("pAcc", "mIoU_S", "mIoU_U", "hIoU")
UPPER_BOUND = "supervised"  # trained on unseen labels too: never the registered zero-shot student
ALIAS = "ablation"  # the registered best student of the latest ablation: models:/<model>@ablation
PARENT_DIR = "_parent"  # holds the id of the latest parent run (replaced by every invocation)


class AblationError(RuntimeError):
    """Some runs of an ablation failed; the table of those that finished was still written and logged."""


QUICK = [
    "optim.max_iters=4",
    "optim.warmup_iters=1",
    "run.log_interval=2",
    "run.eval_interval=0",
    "data.max_eval_images=8",
]


def summarise(results: dict[str, list[dict[str, float]]]) -> dict[str, list]:
    """Mean and std over seeds for each arm: a column-oriented table (MLflow ``log_table`` format)."""
    table: dict[str, list] = {"arm": [], "seeds": []}
    for metric in METRICS:
        table[f"{metric}_mean"], table[f"{metric}_std"] = [], []
    for arm, runs in results.items():
        table["arm"].append(arm)
        table["seeds"].append(len(runs))
        for metric in METRICS:
            values = np.array([r[f"val/{metric}"] for r in runs], dtype=float)
            table[f"{metric}_mean"].append(float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"))
            table[f"{metric}_std"].append(float(np.nanstd(values)) if np.isfinite(values).any() else float("nan"))
    return table


def arm_slug(arm: str) -> str:
    """The arm as a folder or metric name (MLflow refuses ``+`` in metric names): ``+GLM`` -> ``plus_GLM``."""
    return arm.replace("+", "plus_")


def table_metrics(table: dict[str, list]) -> dict[str, float]:
    """The table as parent-run metrics: ``<arm slug>/val/<metric>_mean`` and ``_std`` (``plus_PLM/val/hIoU_mean``:
    the runs table can show, sort and chart them)."""
    return {
        f"{arm_slug(arm)}/val/{metric}_{stat}": float(table[f"{metric}_{stat}"][i])
        for i, arm in enumerate(table["arm"])
        for metric in METRICS
        for stat in ("mean", "std")
    }


def best_arm_line(table: dict[str, list]) -> str:
    """``**full: hIoU 39.8 ± 1.8** over 3 seeds (mIoU(U) 41.1 ± 1.2)``: the zero-shot arm with the best mean hIoU."""
    arms = [i for i, arm in enumerate(table["arm"]) if arm != UPPER_BOUND and np.isfinite(table["hIoU_mean"][i])]
    if not arms:
        return "no zero-shot arm finished"
    i = max(arms, key=lambda k: table["hIoU_mean"][k])
    return (
        f"**{table['arm'][i]}: hIoU {table['hIoU_mean'][i]:.1f} ± {table['hIoU_std'][i]:.1f}** over "
        f"{table['seeds'][i]} seed(s) (mIoU(U) {table['mIoU_U_mean'][i]:.1f} ± {table['mIoU_U_std'][i]:.1f})"
    )


def format_markdown(table: dict[str, list]) -> str:
    header = "| arm | seeds | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (2 + len(METRICS))]
    for i, arm in enumerate(table["arm"]):
        cells = [f"{table[f'{m}_mean'][i]:.1f} ± {table[f'{m}_std'][i]:.1f}" for m in METRICS]
        lines.append(f"| {arm} | {table['seeds'][i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(table: dict[str, list], path: Path) -> Path:
    """Grouped bars of mIoU(S), mIoU(U) and hIoU per arm, with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, shown = table["arm"], ("mIoU_S", "mIoU_U", "hIoU")
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 3.2))
    for i, metric in enumerate(shown):
        ax.bar(x + (i - 1) * 0.27, table[f"{metric}_mean"], 0.27, yerr=table[f"{metric}_std"], capsize=3, label=metric)
    ax.set_xticks(x, arms)
    ax.set_ylabel("%")
    ax.set_title(f"synthetic zero-shot world, mean ± std over {max(table['seeds'])} seeds")
    ax.legend(ncols=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jobs(arms: list[str], seeds: int, root: Path, quick: bool, overrides: list[str], parent_id: str):
    """One (arm, seed, output folder, overrides) per training run, in table order."""
    for arm in arms:
        for seed in range(seeds):
            out = root / arm_slug(arm) / f"seed{seed}"
            run_overrides = (
                ARMS[arm]
                + (QUICK if quick else [])
                + list(overrides)
                + [f"run.seed={seed}", f"run.output_dir={out}", f"tracking.run_name={arm} seed={seed}"]
                + ([f"tracking.parent_run_id={parent_id}"] if parent_id else [])
            )
            yield arm, seed, out, run_overrides


def train_job(overrides: list[str], threads: int = 0, config: str = "synthetic") -> dict[str, float]:
    """One arm x seed: a real ``train()`` on the ``config`` preset (in a worker process when ``threads`` > 0)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return train(load_config(config, overrides))


def _train_all(jobs: list[tuple], workers: int) -> list[dict[str, float] | Exception]:
    """Run every job, ``workers`` at a time in spawned subprocesses (each with its share of the CPU threads).

    A job that raises does not stop the others: its exception takes its place in the returned list.
    """
    if workers <= 1:
        results = []
        for arm, seed, _, overrides in jobs:
            print(f"\n=== ablation: {arm}, seed {seed} ===")
            results.append(_outcome(arm, seed, lambda o=overrides: train_job(o)))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    # Each run gets its share of this process's CPU threads (the result equals a sequential run at that count).
    threads = max(1, torch.get_num_threads() // workers)
    print(f"ablation: {len(jobs)} runs, {workers} at a time ({threads} CPU threads each)")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_job, overrides, threads) for *_, overrides in jobs]
        results = []
        for (arm, seed, *_), future in zip(jobs, futures, strict=True):
            results.append(_outcome(arm, seed, future.result))
            print(f"ablation: {arm}, seed {seed} done ({len(results)}/{len(jobs)})")
        return results


def _outcome(arm: str, seed: int, run) -> dict[str, float] | Exception:
    """``run()``'s final metrics, or the exception it raised (reported here; Ctrl-C still stops everything)."""
    try:
        return run()
    except Exception as e:
        traceback.print_exception(e)  # a worker's exception carries the worker's traceback
        print(f"ablation: {arm}, seed {seed} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return e


def run_ablation(
    seeds: int = 3,
    output_root: str = "runs/ablation",
    quick: bool = False,
    overrides: list[str] | tuple = (),
    arms: list[str] | tuple = tuple(ARMS),
    jobs: int = 1,
    select: bool = False,
    register_as: str = "",
) -> dict[str, list]:
    """Train every arm for ``seeds`` seeds on the synthetic world; returns the summary table.

    Each call is a new MLflow parent run (its params: seeds, arms, overrides, steps) whose children are the training
    runs, each with the param ``arm`` so that MLflow's charts compare arms side by side; the parent holds the table.

    Args:
        seeds: seeds per arm (0 .. seeds-1).
        output_root: one sub-folder per arm and seed; an existing folder is replaced (each run starts fresh).
        quick: CI-sized runs that check the mechanics, not the method.
        overrides: ``key=value`` applied to every arm (after the arm's own delta).
        arms: which of :data:`ARMS` to train (all by default).
        jobs: how many arm x seed runs train at once, in subprocesses (results identical to one at a time).
        select: evaluate on the selection split (choose settings there) instead of val (report them there).
        register_as: the registered model the best student joins (default ``clipzss-<experiment>``).
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown ablation arms {unknown}; choose from {list(ARMS)}")
    if select:
        overrides = list(overrides) + selection_overrides(load_config("synthetic", list(overrides)))
    root = Path(output_root)
    base = load_config("synthetic", [f"run.output_dir={root}"] + (QUICK if quick else []) + list(overrides))
    parent = _parent_run(base, root, seeds, list(arms), list(overrides), jobs) if base.tracking.enabled else None
    planned = list(_jobs(list(arms), seeds, root, quick, list(overrides), parent.run_id if parent else ""))
    for *_, out, _ in planned:
        shutil.rmtree(out, ignore_errors=True)
    prepare_data_root(base)  # once, here: parallel jobs would each start generating the world
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    try:
        finals = _train_all(planned, jobs)
    except BaseException as e:
        if parent:
            parent.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    failed = []
    for (arm, seed, *_), final in zip(planned, finals, strict=True):
        if isinstance(final, Exception):
            failed.append(f"{arm} seed {seed} ({type(final).__name__}: {final})")
        else:
            results[arm].append(final)
    table = summarise({arm: runs for arm, runs in results.items() if runs})
    text = format_markdown(table) + "".join(f"\n\nfailed: {f}" for f in failed)
    if select:  # a table of selection numbers must never pass for a reported one
        text = split_note(select) + "\n\n" + text
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.md").write_text(text + "\n")
    figure = plot_table(table, root / "ablation.png")
    print("\n" + text + ("" if select else "\n\n" + split_note(select)))
    if parent:
        _log_parent(parent, table, planned, [root / "ablation.md", figure])
        _register_best(parent, planned, finals, model_name(register_as, base.tracking.experiment))
        parent.finish("FAILED" if failed else "FINISHED")
    if failed:
        raise AblationError(
            f"{len(failed)} of {len(planned)} runs failed: " + "; ".join(failed) + f". The table of the others is in "
            f"{root / 'ablation.md'}. The same command trains every run again, from scratch."
        )
    return table


def selection_overrides(base: Config) -> list[str]:
    """Overrides that evaluate on the selection split of ``base``'s synthetic world instead of its val split."""
    return ["data.eval_dataset=synthetic", f"data.eval_root={selection_root(base.data.root)}"]


def split_note(select: bool) -> str:
    """The table's first line: which split its numbers come from, and what that split is for."""
    if select:
        return (
            "Evaluated on the SELECTION split (synthetic scenes disjoint from train and val): choose settings on "
            "these numbers, then report the chosen ones on val (the same command without --select)."
        )
    return "Evaluated on val (the reported split; choose settings on the selection split: --select)."


def _log_parent(parent: Tracker, table: dict[str, list], planned: list[tuple], files: list[Path]) -> None:
    """The arm of each child as its param (MLflow groups and compares runs by it), the table as metrics, a table
    artifact and files, and the best arm at the top of the description."""
    for arm, _, out, _ in planned:
        if (out / RUN_ID_FILE).is_file():  # a run that failed before tracking started has none
            parent.client.log_param((out / RUN_ID_FILE).read_text().strip(), "arm", arm)
    parent.log_metrics(table_metrics(table), step=0)  # one value per metric: the runs table's columns
    description = parent.client.get_run(parent.run_id).data.tags.get("mlflow.note.content", "")
    parent.set_tags({"mlflow.note.content": f"{best_arm_line(table)}\n\n{description}"})
    parent.log_table(table, "ablation.json")
    for path in files:
        parent.log_artifact(path)


def _register_best(parent: Tracker, planned: list[tuple], finals: list, model: str) -> str | None:
    """Register the student of the zero-shot run with the best ``val/hIoU`` as ``model@ablation``."""
    runs = [
        (final["val/hIoU"], arm, seed, out)
        for (arm, seed, out, _), final in zip(planned, finals, strict=True)
        if arm != UPPER_BOUND and isinstance(final, dict) and np.isfinite(final["val/hIoU"])
    ]
    if not runs:
        return None
    hiou, arm, seed, out = max(runs, key=lambda r: r[0])
    run_id = (out / RUN_ID_FILE).read_text().strip()
    tags = {"clipzss.ablation": parent.run_id, "clipzss.arm": arm, "val/hIoU": f"{hiou:.2f}"}
    description = f"best student of ablation {parent.run_id}: {arm} seed {seed}, val/hIoU {hiou:.2f}"
    uri = register_version(parent, model, run_id, ALIAS, tags, description)
    if uri is not None:
        parent.set_tags({"clipzss.registered_model": uri})
        print(f"registered {arm} seed {seed} (val/hIoU {hiou:.2f}) as {uri}")
    return uri


def _parent_run(base: Config, root: Path, seeds: int, arms: list[str], overrides: list[str], jobs: int) -> Tracker:
    """A new MLflow run for this invocation (never the previous one), with what it was asked to do."""
    shutil.rmtree(root / PARENT_DIR, ignore_errors=True)
    name = f"ablation: {len(arms)} arms x {seeds} seed{'s' if seeds > 1 else ''}"  # short: the UI truncates names
    description = (
        f"`clipzss ablate`: arms {', '.join(arms)} on the synthetic world, {seeds} seeds each, "
        f"{base.optim.max_iters} steps per run. Children: one training run per arm and seed (param `arm`); "
        "table: `ablation.json` / `ablation.md` (mean ± std over seeds)."
    )
    parent = Tracker(base.tracking, root / PARENT_DIR, run_name=name, description=description)
    parent.log_params(
        {
            "seeds": seeds,
            "arms": arms,
            "overrides": overrides,
            "steps": base.optim.max_iters,
            "jobs": jobs,
            "output_root": str(root),
        }
    )
    return parent
