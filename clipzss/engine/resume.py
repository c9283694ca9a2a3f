"""What ``--resume`` may change, and applying those changes to the restored optimiser.

A checkpoint was trained under its saved config. Keys that only steer the rest of the run (the schedule, where files
are, how often things happen, tracking) may change on resume and then take effect everywhere: the optimiser, the
saved ``config.yaml`` and MLflow (as ``<key>.from_step_<N>`` params, since MLflow never changes a logged param).
Any other change is refused, naming each key, because the checkpoint could not honour it.
"""

from __future__ import annotations

from typing import Any

import torch

from clipzss.config import Config, ConfigError, flatten, from_dict

RESUMABLE = (
    "optim.lr", "optim.head_lr_mult", "optim.weight_decay", "optim.warmup_iters", "optim.poly_power",
    "optim.max_iters", "optim.grad_clip",
    "run.output_dir", "run.log_interval", "run.eval_interval", "run.checkpoint_interval", "run.progress",
    "run.device",
    "data.root", "data.eval_root", "data.num_workers", "data.max_eval_images",
    "teacher.cache_dir",
)  # fmt: skip
RESUMABLE_SECTIONS = ("tracking.",)


def resume_changes(saved: dict, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, new value)}`` for every key that differs; ConfigError if one may not change."""
    before, after = flatten(from_dict(saved)), flatten(cfg)
    changed = {k: (before[k], after[k]) for k in after if before.get(k) != after[k]}
    refused = [k for k in changed if k not in RESUMABLE and not k.startswith(RESUMABLE_SECTIONS)]
    if refused:
        listed = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        raise ConfigError(
            f"--resume cannot change {listed}: the checkpoint was trained with the old value(s). Drop those "
            f"overrides, or start a new run in another run.output_dir. Keys that may change: {', '.join(RESUMABLE)}, "
            "tracking.*"
        )
    return changed


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler, fresh_groups: list[dict]) -> None:
    """After loading a checkpoint's optimiser and scheduler state, put back this config's base lr and weight decay.

    Args:
        fresh_groups: ``[{"initial_lr", "weight_decay"}, ...]`` of the optimiser built from the current config, in
            the same group order.
    """
    scheduler.base_lrs = [g["initial_lr"] for g in fresh_groups]
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, fresh, factor in zip(optimizer.param_groups, fresh_groups, factors, strict=True):
        group["initial_lr"] = fresh["initial_lr"]
        group["weight_decay"] = fresh["weight_decay"]
        group["lr"] = fresh["initial_lr"] * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
