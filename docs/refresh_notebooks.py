"""Execute the notebooks in place and keep their outputs, so they read on a code host without running.

Each executed notebook carries the digest of its code cells in its metadata (``clipzss.code_sha256``): a code cell
edited afterwards no longer matches it, and ``tests/test_notebooks.py`` fails until the notebook is run again.

    python docs/refresh_notebooks.py --store sqlite:////path/to/mlflow.db   # after the main job and an ablation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def code_digest(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the code cells' sources, in order: what the outputs were computed from."""
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def execute(path: Path, workdir: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in ``workdir`` (reading ``$MLFLOW_TRACKING_URI``) and stamp its digest."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, record_timing=False, resources={"metadata": {"path": workdir}})
    client.execute()
    notebook.metadata["clipzss"] = {"code_sha256": code_digest(notebook)}
    return notebook


def main(argv: list[str] | None = None) -> int:
    """Execute every notebook (or the ones named) against ``--store`` and write them back with their outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="MLflow tracking URI the notebooks read")
    parser.add_argument("--overrides", default="", help="config overrides for the notebooks ($CLIPZSS_OVERRIDES)")
    parser.add_argument("notebooks", nargs="*", type=Path, default=NOTEBOOKS)
    args = parser.parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = args.store
    os.environ["CLIPZSS_OVERRIDES"] = args.overrides
    for path in args.notebooks:
        notebook = execute(path, REPO)
        notebook.metadata.pop("widgets", None)  # progress-bar state: noise in a diff
        for cell in notebook.cells:  # stderr holds progress bars and warnings naming this machine's paths
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
        nbformat.write(notebook, path)
        print(f"executed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
