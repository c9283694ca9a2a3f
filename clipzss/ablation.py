"""The ablation benchmark on the offline synthetic world: does CLIP-ZSS transfer to unseen classes?

Arms (each one config delta on the ``synthetic`` preset, each over several seeds):
    baseline    seen-class NEL + CE on the text classifier only (GLM off, PLM off)
    +GLM        baseline + the Global Learning Module
    +PLM        baseline + the Pixel Learning Module (pseudo labels, synthesizer)
    full        CLIP-ZSS (GLM + PLM)
    supervised  upper bound: trained with every class labelled (split ``all``), plain NEL + CE; evaluated on the
                same seen/unseen partition as the others

The table (mean +- std over seeds) is printed, written to ``<out>/ablation.md`` (and plotted to ``ablation.png``) and
logged to MLflow on a parent run whose children are the individual training runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from clipzss.config import load_config
from clipzss.engine.tracking import Tracker

ARMS: dict[str, list[str]] = {
    "baseline": ["glm.weight=0", "plm.enabled=false"],
    "+GLM": ["plm.enabled=false"],
    "+PLM": ["glm.weight=0"],
    "full": [],
    "supervised": ["data.split=all", "data.eval_split=default", "glm.weight=0", "plm.enabled=false"],
}
METRICS = ("pAcc", "mIoU_S", "mIoU_U", "hIoU")
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


def run_ablation(
    seeds: int = 3, output_root: str = "runs/ablation", quick: bool = False, overrides: list[str] | tuple = ()
) -> dict[str, list]:
    """Train every arm for ``seeds`` seeds on the synthetic world; returns the summary table.

    Args:
        seeds: seeds per arm (0 .. seeds-1).
        output_root: one sub-folder per arm and seed; an existing folder is replaced (each run starts fresh).
        quick: CI-sized runs that check the mechanics, not the method.
        overrides: ``key=value`` applied to every arm (after the arm's own delta).
    """
    from clipzss.train import train

    root = Path(output_root)
    base = load_config("synthetic", [f"run.output_dir={root}"] + list(overrides))
    parent = Tracker(base.tracking, root / "_table", run_name="ablation") if base.tracking.enabled else None
    results: dict[str, list[dict[str, float]]] = {}
    for arm, delta in ARMS.items():
        results[arm] = []
        for seed in range(seeds):
            out = root / arm.replace("+", "plus_") / f"seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            run_overrides = (
                delta
                + (QUICK if quick else [])
                + list(overrides)
                + [f"run.seed={seed}", f"run.output_dir={out}", f"tracking.run_name=ablation {arm} seed{seed}"]
                + ([f"tracking.parent_run_id={parent.run_id}"] if parent else [])
            )
            print(f"\n=== ablation: {arm}, seed {seed} ===")
            results[arm].append(train(load_config("synthetic", run_overrides)))
    table = summarise(results)
    text = format_markdown(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.md").write_text(text + "\n")
    figure = plot_table(table, root / "ablation.png")
    print("\n" + text)
    if parent:
        parent.log_table(table, "ablation.json")
        parent.log_artifact(root / "ablation.md")
        parent.log_artifact(figure)
        for i, arm in enumerate(table["arm"]):
            key = arm.replace("+", "plus_")
            parent.log_metrics({f"{key}/{m}": table[f"{m}_mean"][i] for m in METRICS}, step=0)
        parent.finish()
    return table
