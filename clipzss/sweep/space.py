"""The flat search space over the config's dotted keys (the names of the CLI and of MLflow params).

Values are sampled as plain scalars: scale tuples travel as ``"4,8,16"`` strings (Optuna needs hashable choices)
and become ``plm.kmeans.scales=[4,8,16]`` overrides. The learning-rate range is centred on the swept preset's own
``optim.lr`` (x/5 .. x5), so the synthetic preset (1e-3) and VOC (2e-5) are both searched around what works.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import yaml

from clipzss.config import Config, ConfigError, flatten, load_config, set_value

ARCHS = ("segformer_b0", "segformer_b2", "swin_tiny", "resnet50", "convnext_tiny")
SCALES = ("4,8,16", "8,16", "4,8", "8", "16")  # windows in teacher tokens (32x32 grid for ViT-B/16 at 512 px)
SMOKE_ARCHS = ("segformer_tiny", "resnet_tiny")
SMOKE_SCALES = ("2", "2,4")  # on the synthetic world's 8x8 token grid
TUPLE_KEYS = ("plm.kmeans.scales",)
LR_SPAN = 5.0  # the lr range is [lr / LR_SPAN, lr * LR_SPAN] around the preset's lr
GLM_WEIGHTS = (0.0, 0.5, 1.0, 2.0)  # 0 = the GLM is not built (an ablation arm)


def search_space(base: Config, archs: tuple[str, ...] = ARCHS, scales: tuple[str, ...] = SCALES) -> dict[str, Any]:
    """The TPE search space: backbone, K-Means scales, lr around ``base.optim.lr`` and the method's [choice] knobs."""
    from ray import tune

    lr = base.optim.lr
    return {
        "student.arch": tune.choice(list(archs)),
        "plm.kmeans.scales": tune.choice(list(scales)),
        "optim.lr": tune.loguniform(lr / LR_SPAN, lr * LR_SPAN),
        "plm.kmeans.fuse_threshold": tune.uniform(0.7, 0.95),
        "glm.weight": tune.choice(list(GLM_WEIGHTS)),
        "glm.tau": tune.loguniform(0.03, 0.2),
    }


def _preset_value(key: str, domain: Any, value: Any) -> Any:
    """``value`` (the preset's) moved inside ``domain``: clamped to a range, or the first choice if not a choice."""
    from ray.tune.search.sample import Categorical

    if isinstance(domain, Categorical):
        return value if value in domain.categories else domain.categories[0]
    return min(max(value, domain.lower), domain.upper)


def first_points(space: dict[str, Any], base: Config, archs: tuple[str, ...], scales: tuple[str, ...]) -> list[dict]:
    """Points TPE evaluates first, so every backbone and every scale set is tried at least once (round robin); the
    other keys take the preset's values. Without them two random start-up trials often draw the same backbone."""
    flat = flatten(base)
    preset = {key: _preset_value(key, domain, flat[key]) for key, domain in space.items() if key not in TUPLE_KEYS}
    count = max(len(archs), len(scales))
    return [{**preset, "student.arch": archs[i % len(archs)], "plm.kmeans.scales": scales[i % len(scales)]}
            for i in range(count)]  # fmt: skip


def grid_space(archs: tuple[str, ...], scales: tuple[str, ...], seeds: int) -> dict[str, Any]:
    """The benchmark grid: every backbone x scales cell for seeds ``0 .. seeds-1`` (Tune expands the product)."""
    from ray import tune

    return {
        "student.arch": tune.grid_search(list(archs)),
        "plm.kmeans.scales": tune.grid_search(list(scales)),
        "run.seed": tune.grid_search(list(range(seeds))),
    }


def sample_overrides(sample: dict[str, Any]) -> list[str]:
    """``key=value`` overrides of one sampled point: ``{"plm.kmeans.scales": "4,8"}`` -> ``plm.kmeans.scales=[4,8]``."""
    return [f"{key}=[{value}]" if key in TUPLE_KEYS else f"{key}={value!r}" for key, value in sample.items()]


def _options(key: str, domain: Any) -> list[Any]:
    from ray.tune.search.sample import Categorical, Float, Integer

    if isinstance(domain, dict) and "grid_search" in domain:
        return list(domain["grid_search"])
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, (Float, Integer)):
        return [domain.lower, domain.upper]
    raise TypeError(f"search space key {key!r}: unsupported domain {type(domain).__name__}")


def space_corners(space: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of every categorical (or grid) choice with each numeric range at its two bounds."""
    options = {key: _options(key, domain) for key, domain in space.items()}
    for values in itertools.product(*options.values()):
        yield dict(zip(options, values, strict=True))


def check_space(config: str | None, fixed: list[str], space: dict[str, Any]) -> int:
    """Build the config of every corner of ``space``; raises ConfigError naming the bad key. Returns the count."""
    from clipzss.models.students import STUDENTS

    base = load_config(config, fixed)
    count = 0
    for corner in space_corners(space):
        cfg = copy.deepcopy(base)
        for item in sample_overrides(corner):  # as load_config applies overrides, without re-reading the YAML
            key, _, raw = item.partition("=")
            set_value(cfg, key, yaml.safe_load(raw), source="search space")
        if cfg.student.arch not in STUDENTS:
            allowed = ", ".join(STUDENTS)
            raise ConfigError(f"student.arch: unknown architecture {cfg.student.arch!r}; allowed: {allowed}")
        count += 1
    return count
