"""The notebooks run top to bottom (nbclient) against a store made by the real commands, and show what they say;
the committed notebooks carry the outputs of their current code."""

import importlib.util

import nbformat
import pytest
from nbclient import NotebookClient
from tiny_run import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_notebooks", REPO / "docs" / "refresh_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert "val_000000.png: vocabulary = its ground-truth classes [" in text
    assert "pixels segmented as their ground truth: " in text


def test_plm_step_by_step_shows_every_stage(real_store, monkeypatch):
    root, overrides = real_store
    text, pictures = outputs(execute("plm_step_by_step", root, overrides, monkeypatch))
    assert "300 val scenes" in text and "teacher dense tokens D: (3, 128, 8, 8)" in text
    assert text.count("potential-class pixels") == 3
    assert pictures == 1 + 3  # principal components, one PLM panel per scene


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_the_outputs_of_its_code(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    digest = notebook.metadata.get("clipzss", {}).get("code_sha256")
    assert digest == refresh_module().code_digest(notebook), (
        f"{path.name}: code changed since it was executed; run python docs/refresh_notebooks.py --store ..."
    )
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # one kernel, top to bottom
    for cell in code:
        assert cell.outputs, f"{path.name}: a code cell without output: {cell.source[:60]!r}"
        assert all(out.output_type != "error" for out in cell.outputs)
