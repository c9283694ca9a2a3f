"""Training checkpoints (resumable) and the exported student model (what inference loads).

The teacher is never written: it is frozen, rebuilt from its config, and its weights belong to open_clip.
Writes are atomic (temporary file, then rename) so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.pt"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the message names the file and the free space."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file in the same folder, then an atomic rename.

    The temporary file is this process's own, so processes saving the same file at once each rename a whole file.

    Raises:
        CheckpointWriteError: the write failed; the temporary file is removed so it does not keep the space.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "RuntimeError: ... unexpected pos"
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointWriteError(
            f"cannot write {path} ({type(e).__name__}: {e}); {free:.0f} MiB free on that disk (full?). "
            f"No partial file was left; the earlier files in {path.parent} are intact."
        ) from e


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
        "random": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(state["random"])


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_<step>.pt`` holding ``state`` plus the RNG states; returns its path."""
    path = Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"
    atomic_save({**state, "step": step, "rng": rng_state()}, path)
    return path


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``output_dir``, or None."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.search(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


def export_model(path: str | Path, student_state: dict[str, torch.Tensor], config: dict, extra: dict) -> Path:
    """Write the inference bundle: student weights, the resolved config and logit scales (no teacher)."""
    path = Path(path)
    atomic_save({"student": student_state, "config": config, **extra}, path)
    return path


def load_model_bundle(path: str | Path) -> dict[str, Any]:
    """Read an exported model (``model.pt``) or a training checkpoint; both carry ``config`` and the student."""
    bundle = load_checkpoint(path)
    if "student" in bundle:
        return bundle
    if "model" in bundle:  # a training checkpoint: the student is the "student." part of the train module
        prefix = "student."
        student = {k[len(prefix) :]: v for k, v in bundle["model"].items() if k.startswith(prefix)}
        found = {"student": student, "config": bundle["config"]}
        if "objective.log_alpha" in bundle["model"]:  # learnt logit scale (loss.learnable_scale)
            found["alpha"] = float(bundle["model"]["objective.log_alpha"].exp())
        return found
    raise RuntimeError(f"{path} is neither a clipzss model nor a training checkpoint (keys: {sorted(bundle)})")
