"""The benchmark table: one row per backbone x scales cell, mean ± std over seeds, cost, and a paired comparison.

Records are one finished trial each: ``backbone``, ``scales``, ``seed``, the final ``mIoU_S`` / ``mIoU_U`` /
``hIoU`` (%), ``params_M``, ``GFLOPs``, ``images_per_s`` and ``device_hours``. The std is over seeds (ddof 0, as
the ablation table). Cells that share seeds with the reference cell get the paired difference of hIoU (mean ± std
over the shared seeds) and a paired t-test's two-sided p-value (needs >= 2 shared seeds and differences that are not
all equal); a small p says the difference is more than seed noise. Column names carry no dots (MLflow renders
dotted JSON columns blank).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("mIoU_S", "mIoU_U", "hIoU")
COSTS = ("params_M", "GFLOPs", "images_per_s")


def _mean_std(values: list[float]) -> tuple[float, float]:
    found = np.array([v for v in values if np.isfinite(v)], dtype=float)
    return (float(found.mean()), float(found.std())) if len(found) else (float("nan"), float("nan"))


def paired(reference: dict[int, float], other: dict[int, float]) -> tuple[float, float, float, int]:
    """(mean difference other - reference, its std, paired t-test p-value, shared seeds) over the shared seeds."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    a, b = np.array([other[s] for s in seeds]), np.array([reference[s] for s in seeds])
    diff = a - b
    p = float(ttest_rel(a, b).pvalue) if len(seeds) >= 2 and np.ptp(diff) > 0 else float("nan")
    return float(diff.mean()), float(diff.std()), p, len(seeds)


def cell_table(records: list[dict], reference: tuple[str, str] | None = None) -> dict[str, list]:
    """Column-oriented table (MLflow ``log_table`` format), cells in first-seen order; ``reference`` = (backbone,
    scales) of the cell the others are compared with (default: the first cell)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        cells.setdefault((r["backbone"], r["scales"]), []).append(r)
    reference = reference or next(iter(cells), None)
    if reference not in cells:
        known = ", ".join("/".join(c) for c in cells)
        raise ValueError(f"--reference {'/'.join(reference)!r}: no finished cell of that name; cells: {known}")
    base = {r["seed"]: r["hIoU"] for r in cells[reference]}
    names = [
        "backbone",
        "scales",
        "reference",
        "seeds",
        *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
        *COSTS,
    ]
    names += ["device_hours", "hIoU_diff_vs_ref_mean", "hIoU_diff_vs_ref_std", "p_value", "paired_seeds"]
    table: dict[str, list] = {n: [] for n in names}
    for (backbone, scales), rows in cells.items():
        table["backbone"].append(backbone)
        table["scales"].append(scales)
        table["reference"].append((backbone, scales) == reference)
        table["seeds"].append(len(rows))
        for m in METRICS:
            mean, std = _mean_std([r[m] for r in rows])
            table[f"{m}_mean"].append(mean)
            table[f"{m}_std"].append(std)
        for c in COSTS:
            table[c].append(_mean_std([r[c] for r in rows])[0])
        table["device_hours"].append(float(sum(r["device_hours"] for r in rows)))
        *diff, shared = paired(base, {r["seed"]: r["hIoU"] for r in rows})
        for name, value in zip(names[-4:], [*diff, shared], strict=True):
            table[name].append(value)
    return table


def _pm(table: dict[str, list], name: str, i: int, digits: int = 1) -> str:
    mean, std = table[f"{name}_mean"][i], table[f"{name}_std"][i]
    return "-" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_markdown(table: dict[str, list]) -> str:
    """The table as markdown (mean ± std over seeds; diff and p against the reference row, marked "ref")."""
    lines = [
        "| backbone | scales | seeds | mIoU(S) | mIoU(U) | hIoU | params M | GFLOPs | images/s | device-h "
        "| ΔhIoU vs ref | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, backbone in enumerate(table["backbone"]):
        is_ref = table["reference"][i]
        p = table["p_value"][i]
        cells = [
            backbone, table["scales"][i], str(table["seeds"][i]),
            *(_pm(table, m, i) for m in METRICS),
            f"{table['params_M'][i]:.2f}", f"{table['GFLOPs'][i]:.3g}", f"{table['images_per_s'][i]:.0f}",
            f"{table['device_hours'][i]:.3f}",
            "ref" if is_ref else _pm(table, "hIoU_diff_vs_ref", i),
            "" if is_ref else ("-" if np.isnan(p) else f"{p:.3f}"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heatmap(table: dict[str, list], path: Path, title: str) -> Path:
    """hIoU mean ± std per cell, backbones as rows and scale sets as columns (sized for MLflow's preview)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = list(dict.fromkeys(table["backbone"])), list(dict.fromkeys(table["scales"]))
    grid = np.full((len(rows), len(cols)), np.nan)
    text = np.full((len(rows), len(cols)), "", dtype=object)
    for i, (b, s) in enumerate(zip(table["backbone"], table["scales"], strict=True)):
        grid[rows.index(b), cols.index(s)] = table["hIoU_mean"][i]
        text[rows.index(b), cols.index(s)] = _pm(table, "hIoU", i)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(cols) + 2.8), max(3.0, 0.8 * len(rows) + 1.6)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"scales {c}" for c in cols], fontsize=11)
    ax.set_yticks(range(len(rows)), rows, fontsize=11)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if len(finite) else 0.0
    for (r, c), label in np.ndenumerate(text):
        colour = "black" if np.isfinite(grid[r, c]) and grid[r, c] > middle else "white"
        ax.text(c, r, label, ha="center", va="center", fontsize=12, color=colour)
    fig.colorbar(image, ax=ax, label="hIoU (%)")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
