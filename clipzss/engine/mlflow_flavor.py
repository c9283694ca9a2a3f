"""The ``clipzss`` MLflow model flavour: a student as safetensors weights plus its config, never a pickle.

A model directory written here holds::

    MLmodel                       flavours ``clipzss`` and ``python_function`` (loader_module: this module)
    student/weights.safetensors   the student's tensors (safetensors: plain data, nothing in it can run)
    student/clipzss.json          the resolved config, alpha and embed_dim
    requirements.txt, python_env.yaml, conda.yaml

Loading builds the architecture from clipzss's own code (``build_student``) and fills in the weights, so what a
model's files say can choose numbers, never code. A model logged by ``mlflow.pytorch`` (a pickled module) is
refused unless the caller trusts it explicitly: unpickling runs whatever the pickle says.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipzss.config import Config, from_dict

FLAVOR = "clipzss"
DATA = "student"
WEIGHTS = "weights.safetensors"
META = "clipzss.json"


class PickledModelError(ValueError):
    """A model logged as a pickled PyTorch module, refused; the message names it and the way out."""


@dataclass
class LoadedStudent:
    """A student built from clipzss's code with its logged weights, and what inference needs beside it."""

    cfg: Config
    student: nn.Module
    alpha: float
    embed_dim: int


def save_model(
    path: str,
    mlflow_model,
    student: nn.Module,
    meta: dict[str, Any],
    signature=None,
    pip_requirements: list[str] | None = None,
) -> None:
    """Write ``student`` (weights) and ``meta`` (config, alpha, embed_dim) as a clipzss MLflow model at ``path``.

    Called by ``mlflow.models.Model.log(flavor=this module)``, which then uploads the folder as a logged model.
    """
    import mlflow.pyfunc
    import yaml
    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv
    from safetensors.torch import save_model as save_weights

    data = Path(path) / DATA
    data.mkdir(parents=True)
    save_weights(student, str(data / WEIGHTS), metadata={"format": "pt"})  # shared tensors stored once
    (data / META).write_text(json.dumps(meta, indent=1))
    requirements = pip_requirements or []
    (Path(path) / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (Path(path) / "conda.yaml").write_text(yaml.safe_dump(_mlflow_conda_env(additional_pip_deps=requirements)))
    _PythonEnv.current().to_yaml(os.path.join(path, "python_env.yaml"))
    if signature is not None:
        mlflow_model.signature = signature
    mlflow_model.add_flavor(FLAVOR, data=DATA, weights=f"{DATA}/{WEIGHTS}", format="safetensors")
    mlflow.pyfunc.add_to_model(
        mlflow_model, loader_module=__name__, data=DATA, conda_env="conda.yaml", python_env="python_env.yaml"
    )
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_student(
    run_id: str, name: str, student: nn.Module, meta: dict[str, Any], signature, pip_requirements: list[str]
):
    """Log ``student`` to ``run_id`` (in MLflow's current store) as a clipzss model named ``name``."""
    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        flavor=sys.modules[__name__],
        name=name,
        run_id=run_id,
        metadata={"clipzss_config": meta["config"], "alpha": meta["alpha"], "embed_dim": meta["embed_dim"]},
        flavor_name=FLAVOR,
        student=student,
        meta=meta,
        signature=signature,
        pip_requirements=pip_requirements,
    )


def read_student(data: str | Path) -> LoadedStudent:
    """Build the student of a clipzss model's ``student/`` folder from its config and load its weights (strict)."""
    from safetensors.torch import load_model as load_weights

    from clipzss.models.students import build_student

    data = Path(data)
    meta = json.loads((data / META).read_text())
    cfg = from_dict(meta["config"])
    student = build_student(cfg.student, int(meta["embed_dim"]))
    missing, unexpected = load_weights(student, str(data / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{data / WEIGHTS}: the weights do not fit the {cfg.student.arch} its config builds "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return LoadedStudent(cfg, student.eval(), float(meta["alpha"]), int(meta["embed_dim"]))


def load_student(uri: str, trust_pickle: bool = False) -> LoadedStudent:
    """The clipzss student at MLflow model ``uri`` (``runs:/<id>/student``, ``models:/<name>/<version>``, ...) in
    MLflow's current store.

    Raises:
        PickledModelError: the model is a pickled ``mlflow.pytorch`` module and ``trust_pickle`` is false.
        ValueError: the model is not a clipzss student.
    """
    import mlflow
    from mlflow.models import get_model_info

    info = get_model_info(uri)  # reads the MLmodel file only (YAML, safe_load)
    flavors = info.flavors or {}
    if FLAVOR in flavors:
        with tempfile.TemporaryDirectory(prefix="clipzss-model-") as local:
            folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=local)
            return read_student(Path(folder) / DATA)  # our own layout, not a path the MLmodel file names
    metadata = info.metadata or {}
    if "pytorch" not in flavors or "clipzss_config" not in metadata:
        raise ValueError(f"{uri} is not a clipzss student (its MLmodel has no {FLAVOR!r} flavour)")
    if not trust_pickle:
        raise PickledModelError(
            f"{uri} is a pickled PyTorch module (logged with mlflow.pytorch), and loading a pickle runs whatever "
            "code it carries: refused. Segment with its run's model.pt artifact instead (--checkpoint; read as "
            "weights only), or pass --trust-pickle if you trust whoever could write to this MLflow store"
        )
    import mlflow.pytorch

    student = mlflow.pytorch.load_model(uri, map_location="cpu")
    cfg = from_dict(metadata["clipzss_config"])
    return LoadedStudent(cfg, student.eval(), float(metadata["alpha"]), int(metadata["embed_dim"]))


class _PyfuncStudent:
    """``mlflow.pyfunc.load_model`` of a clipzss model: images [B, 3, H, W] float32 -> features [B, C, h, w]."""

    def __init__(self, loaded: LoadedStudent):
        self.loaded = loaded

    def predict(self, model_input: np.ndarray | dict[str, np.ndarray], params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):  # pyfunc names inputs after the signature's tensor: {"images": ...}
            model_input = model_input["images"]
        with torch.no_grad():
            return self.loaded.student(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


def _load_pyfunc(data_path: str) -> _PyfuncStudent:
    """MLflow's pyfunc hook (``loader_module``): builds the student from clipzss's code, reads weights only."""
    return _PyfuncStudent(read_student(data_path))
