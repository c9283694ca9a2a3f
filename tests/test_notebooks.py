"""The notebooks run top to bottom (nbclient) against a store made by the real commands, and show what they say."""

import nbformat
from nbclient import NotebookClient
from tiny_run import REPO


def execute(name: str, root, overrides: list[str], monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("CLIPZSS_OVERRIDES", " ".join(o for o in overrides if o.startswith(("data.root", "teacher"))))
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(root)}}).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> tuple[str, int]:
    """All text the cells printed or displayed, and the number of pictures."""
    text, pictures = [], 0
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            pictures += "image/png" in out.get("data", {})
    return "\n".join(text), pictures


def test_explore_runs_shows_the_runs_the_ablation_and_the_logged_model(real_store, monkeypatch):
    root, overrides = real_store
    text, pictures = outputs(execute("explore_runs", root, overrides, monkeypatch))
    assert (
        "runs in sqlite:///" in text and "ablation 'ablation: 2 arms x 1 seed'" in text and "seeds=1, steps=4" in text
    )
    assert "baseline" in text and "full" in text and "hIoU_mean" in text
    assert "run: segformer_tiny synthetic scales=[2, 4] seed=0" in text
    assert pictures >= 1 + 1 + 2 + 1  # ablation plots, curves, pictures, the logged model's segmentation


def test_plm_step_by_step_shows_every_stage(real_store, monkeypatch):
    root, overrides = real_store
    text, pictures = outputs(execute("plm_step_by_step", root, overrides, monkeypatch))
    assert "300 val scenes" in text and "teacher dense tokens D: (3, 128, 8, 8)" in text
    assert text.count("potential-class pixels") == 3
    assert pictures == 1 + 3  # principal components, one PLM panel per scene
