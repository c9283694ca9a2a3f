"""What each configuration value means, checked at load time: the one place that says which values make sense.

:mod:`clipzss.config` checks that a value has the right *type*; the rules here check its *meaning* (a learning rate
is positive, a stride fits its window). A key missing from :data:`RULES` accepts any value of its type. Every
broken rule is reported at once, each naming its dotted key and the value found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Rule = tuple[Callable[[Any], bool], str]

POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, "must be >= 1")
PROBABILITY: Rule = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
NON_EMPTY: Rule = (lambda v: str(v).strip() != "", "must not be empty")
ALL_AT_LEAST_ONE: Rule = (lambda v: len(v) > 0 and all(x >= 1 for x in v), "must be a non-empty list of values >= 1")

RULES: dict[str, Rule] = {
    "data.dataset": NON_EMPTY,
    "data.root": NON_EMPTY,
    "data.crop_size": AT_LEAST_ONE,
    "data.scale": ALL_AT_LEAST_ONE,
    "data.ratio_range": (lambda v: 0 < v[0] <= v[1], "must be [low, high] with 0 < low <= high"),
    "data.cat_max_ratio": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "data.flip_prob": PROBABILITY,
    "data.batch_size": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.test_short_side": AT_LEAST_ONE,
    "data.test_window": AT_LEAST_ONE,
    "data.test_stride": AT_LEAST_ONE,
    "data.max_eval_images": NON_NEGATIVE,
    "student.decoder_channels": AT_LEAST_ONE,
    "glm.weight": NON_NEGATIVE,
    "glm.tau": POSITIVE,
    "glm.attn_tau": NON_NEGATIVE,  # 0 = the paper's sqrt(C) scaling (the default)
    "glm.bank_size": NON_NEGATIVE,
    "plm.kmeans.scales": ALL_AT_LEAST_ONE,
    "plm.kmeans.iters": AT_LEAST_ONE,
    "plm.kmeans.fuse_threshold": (lambda v: -1 <= v <= 1, "must be a cosine similarity in [-1, 1]"),
    "plm.kmeans.drop_seen_ratio": PROBABILITY,
    "plm.synthesizer.layers": AT_LEAST_ONE,
    "plm.synthesizer.heads": AT_LEAST_ONE,
    "plm.nel_weight": NON_NEGATIVE,
    "plm.ce_weight": NON_NEGATIVE,
    "plm.bce_weight": NON_NEGATIVE,
    "plm.potential_weight": NON_NEGATIVE,
    "loss.alpha": POSITIVE,
    "loss.beta": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.head_lr_mult": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_iters": NON_NEGATIVE,
    "optim.poly_power": NON_NEGATIVE,
    "optim.max_iters": AT_LEAST_ONE,
    "optim.grad_accum": AT_LEAST_ONE,
    "optim.grad_clip": NON_NEGATIVE,
    "tracking.experiment": NON_EMPTY,
    "run.output_dir": NON_EMPTY,
    "run.seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32) (numpy's seed range)"),
    "run.log_interval": AT_LEAST_ONE,
    "run.eval_interval": NON_NEGATIVE,
    "run.checkpoint_interval": NON_NEGATIVE,
}


def broken_rules(flat: dict[str, Any]) -> list[str]:
    """``"key: must be ..., got value"`` for every value of the flat (dotted-key) config that breaks its rule."""
    found = []
    for key, (holds, meaning) in RULES.items():
        if key in flat and not holds(flat[key]):
            found.append(f"{key}: {meaning}, got {flat[key]!r}")
    if flat.get("data.test_stride", 0) > flat.get("data.test_window", 0) > 0:
        found.append(
            f"data.test_stride: must be <= data.test_window ({flat['data.test_window']}) or windows leave gaps, "
            f"got {flat['data.test_stride']}"
        )
    return found
