"""One typed configuration schema for clipzss.

Defaults (with the reason for each) live here, in code. YAML files are *deltas* on top of these
defaults, and ``a.b=value`` strings are deltas on top of the YAML. Every key is validated: an unknown
key or a value of the wrong type raises :class:`ConfigError` naming the dotted key and what is allowed.

The dotted names (``plm.kmeans.scales``) are the single naming shared by the command line, the Optuna
search spaces in ``sweeps/`` and the MLflow params of every run.

Fields marked [choice] are defaults the project chose where the paper is silent (docs/pages/method.md; the
measurements behind them are in its "Measured choices" table).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from clipzss.config_rules import broken_rules


class ConfigError(ValueError):
    """A configuration key or value is not valid; the message names the dotted key."""


@dataclass
class DataConfig:
    """Which dataset, which zero-shot split, and how images are augmented and tested."""

    dataset: str = (
        "voc"  # one of clipzss.data.datasets.DATASETS (voc, coco_stuff, context59, context60, ade20k, synthetic)
    )
    root: str = "data/VOCdevkit/VOC2012"  # dataset root in its mmsegmentation-converted layout
    split: str = "default"  # zero-shot split name in clipzss/data/splits.yaml (context59: "zs3" or "cascade")
    eval_dataset: str = ""  # cross-dataset evaluation target ("" = the training dataset's own val split)
    eval_root: str = ""  # root of eval_dataset
    eval_split: str = (
        ""  # split whose seen/unseen partition the metrics use ("" = split; e.g. train "all", eval "default")
    )
    crop_size: int = 512  # square training crop, pixels
    scale: tuple[int, int] = (2048, 512)  # mmseg img_scale: (long side max, short side) before ratio jitter
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random resize ratio range
    cat_max_ratio: float = 0.75  # a crop may not be covered by one class above this fraction (10 retries)
    flip_prob: float = 0.5
    photometric: bool = True  # brightness / contrast / saturation / hue distortion
    batch_size: int = 16  # per process
    num_workers: int = 4
    test_short_side: int = 512  # resize so the short side is this before sliding-window inference
    test_window: int = 512  # sliding window size
    test_stride: int = 426  # sliding window stride
    max_eval_images: int = 0  # 0 = all validation images; >0 truncates (quick periodic checks)


@dataclass
class TeacherConfig:
    """The frozen CLIP teacher (open_clip). Used in training only, and for text embeddings at test time."""

    model: str = "ViT-B-16"  # open_clip model name, or a path to an open_clip model-config JSON
    pretrained: str = "openai"  # open_clip pretrained tag, a local checkpoint path, or "" for random init
    dense: Literal["value", "tokens"] = "value"  # [choice] MaskCLIP value path, or plain last-layer tokens
    templates: Literal["zegclip", "single"] = "zegclip"  # prompt-template ensemble for the text classifier
    cache_dir: str = "~/.cache/clipzss/text"  # on-disk cache of text classifiers, keyed by model/classes/templates


@dataclass
class StudentConfig:
    """The closed-set segmenter being trained; its classifier is replaced by a 1x1 projection to C."""

    arch: str = "segformer_b0"  # one of clipzss.models.students.STUDENTS
    pretrained: str = ""  # backbone weights through the library's own mechanism: "" = random init
    decoder_channels: int = 256  # width of the decode head
    # "model": the input normalisation the backbone was pretrained with (timm's pretrained_cfg: EfficientNet-Lite
    # mean = std = 0.5); "imagenet": ImageNet's for every student
    input_norm: Literal["model", "imagenet"] = "model"


@dataclass
class GLMConfig:
    """Global Learning Module: CLS-query attention pooling + InfoNCE against the teacher CLS."""

    weight: float = 1.0  # w_g; 0 disables (the module is not built)
    tau: float = 0.07  # [choice] InfoNCE temperature
    # [choice] pooling softmax(S.R / attn_tau); 0 = the paper's S.R / sqrt(C), near uniform on unit vectors (S_hat ~
    # mean R). A small attn_tau (0.07) localises the pooling but scored lower hIoU on the synthetic world.
    attn_tau: float = 0.0
    bank_size: int = 1024  # [choice] FIFO bank of past teacher CLS embeddings used as extra negatives
    # [choice] "linear": InfoNCE on W S_hat + b, a C x C map of the GLM's own started at the identity, so the GLM does
    # not pull the dense features' mean into the CLS embedding's region of CLIP space; "none": S_hat itself (the
    # paper). "none" is the default: "linear" did not lift full above +PLM on val.
    projection: Literal["none", "linear"] = "none"


@dataclass
class KMeansConfig:
    """Multi-scale cosine K-Means on the teacher's dense tokens."""

    scales: tuple[int, ...] = (4, 8, 16)  # [choice] window sizes in tokens; K per scale = number of windows
    iters: int = 10  # [choice] Lloyd iterations per scale
    fuse_threshold: float = 0.85  # [choice] lambda: centroids of different scales above this are fused
    # "merge": centroids of different scales linked above lambda merge (transitively) into one cluster; tokens go to
    # the merged centroids and the unmerged finest-scale ones, so lambda changes the cluster count. "pairs": greedy
    # one-to-one pairs with tokens re-assigned over every centroid of every scale, which leaves the clusters unchanged.
    fusion: Literal["merge", "pairs"] = "merge"
    drop_seen_ratio: float = 0.5  # [choice] a cluster whose pixels are mostly (> this) seen-labelled is dropped


@dataclass
class SynthesizerConfig:
    """Pseudo-weight generator: a transformer decoder, queries = region centroids, keys = teacher CLS (+ dense)."""

    enabled: bool = True  # False: potential-class channels use the raw region centroids (of ``query``'s features)
    layers: int = 1  # [choice]
    heads: int = 8  # [choice]
    # Region centroids: "teacher" = the teacher's dense-token mean of the region (CLIP space; the synthesizer learns
    # from its text loss only, prototypes enter the pixel logits detached); "student" = the student's R centroids,
    # which stay far from the text embeddings.
    query: Literal["teacher", "student"] = "teacher"
    dense_memory: bool = False  # also attend to the teacher's dense tokens (each query only to its own region's)
    # Loss pulling seen prototypes to their text: "cosine" 1 - cos(P_k, T_k); "softmax" CE over the seen texts;
    # "sigmoid" per-text sigmoid with a learnable bias; "bce" = the paper's sigmoid without bias (optimum cos ~0.18).
    loss: Literal["cosine", "softmax", "sigmoid", "bce"] = "softmax"


@dataclass
class PLMConfig:
    """Pixel Learning Module: pseudo labels, the synthesizer, and the pixel losses."""

    enabled: bool = True  # False: seen-class NEL + CE on the text classifier only (no pseudo labels, no synthesizer)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    synthesizer: SynthesizerConfig = field(default_factory=SynthesizerConfig)
    nel_weight: float = 0.0  # [choice] w_nel (focal x100 + dice, ZegCLIP); 0: fixed scales hold its |cos(R, T)| low
    # [choice] a learnable logit bias inside NEL's sigmoid, started at the focal-loss prior -log((1 - 0.01) / 0.01)
    # (RetinaNet): negatives need not reach cos(R, T) < 0 to count as absent
    nel_learnable_bias: bool = False
    ce_weight: float = 1.0  # [choice] w_ce
    bce_weight: float = 1.0  # [choice] weight of the synthesizer's text loss (plm.synthesizer.loss)
    # "separate": CE / NEL averaged over seen-label and potential-label parts apart, summed with potential_weight
    # (potential pixels, mostly background, do not dilute seen supervision); "joint": one average over all pixels.
    loss_norm: Literal["separate", "joint"] = "separate"
    potential_weight: float = 1.0  # weight of the potential-label part under loss_norm="separate"


@dataclass
class LossConfig:
    """Logit scales shared by training and inference."""

    alpha: float = 1 / 0.07  # [choice] scale of cos(R, T_seen)
    beta: float = 1 / 0.07  # [choice] scale of cos(R, P_pseudo)
    learnable_scale: bool = False  # [choice] learn alpha and beta (log-parametrised)


@dataclass
class OptimConfig:
    """ZegCLIP's recipe [choice]."""

    lr: float = 2e-5
    head_lr_mult: float = 10.0  # decode head, projection, synthesizer
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 0.9
    max_iters: int = 20000  # VOC 20k, COCO-Stuff 80k, Context 40k
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    uri: str = ""  # "" = sqlite:///<working dir>/mlflow.db (local store); or an MLflow server URI
    experiment: str = "clipzss"
    run_name: str = ""  # "" = derived from the output directory
    log_images: bool = True  # segmentation overlays and pseudo-label maps at each evaluation
    parent_run_id: str = ""  # nest this run under another MLflow run (the ablation table's run, a sweep's run)
    system_metrics: bool = False  # MLflow's CPU/memory/GPU sampler (system/... metrics every 10 s)
    description: str = ""  # the run's description in the MLflow UI ("" = one written from the config)
    # register the finished run's student in MLflow's model registry: "NAME" or "NAME@ALIAS" (the alias defaults to
    # the run folder's name); "" = not registered. ``clipzss train --register-as NAME`` sets it.
    register_as: str = ""


@dataclass
class RunConfig:
    """Where outputs go, and how often things happen."""

    output_dir: str = "runs/default"
    seed: int = 0
    log_interval: int = 50
    eval_interval: int = 2000  # 0 = only at the end
    checkpoint_interval: int = 2000  # 0 = only at the end
    device: Literal["auto", "cpu"] = "auto"  # "cpu" forces CPU even where CUDA exists
    progress: bool = True  # show progress bars


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    glm: GLMConfig = field(default_factory=GLMConfig)
    plm: PLMConfig = field(default_factory=PLMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)


PRESET_DIR = Path(__file__).parent / "configs"


def preset_path(name: str) -> Path:
    """Path of a YAML preset shipped with the package (``synthetic``, ``voc``, ...) or a user file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    shipped = PRESET_DIR / f"{name}.yaml"
    if shipped.exists():
        return shipped
    available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {name!r} not found (shipped presets: {', '.join(available)})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config: code defaults, then the YAML delta at ``path``, then ``a.b=value`` overrides."""
    cfg = Config()
    if path is not None:
        file = preset_path(str(path))
        with open(file) as f:
            delta = yaml.safe_load(f) or {}
        if not isinstance(delta, dict):
            raise ConfigError(f"{file}: top level must be a mapping of sections, got {type(delta).__name__}")
        apply_delta(cfg, delta, source=str(file))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        set_value(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "", source="command line")
    check_values(cfg)
    return cfg


def _finite(value: Any) -> bool:
    """False for a float (or a list holding one) that is ``nan`` or infinite."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return not any(isinstance(v, float) and not math.isfinite(v) for v in values)


def check_values(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every non-finite float (``nan``, ``inf``, in a list too: no key means one)
    and every value that breaks its meaning (``clipzss.config_rules``)."""
    flat = flatten(cfg)
    nonfinite = [key for key, value in flat.items() if not _finite(value)]
    problems = [f"{key}: must be a finite number, got {flat[key]!r}" for key in nonfinite]
    problems += [p for p in broken_rules(flat) if p.split(":", 1)[0] not in nonfinite]  # one complaint per key
    if problems:
        raise ConfigError("invalid configuration value(s):\n  " + "\n  ".join(problems))


def apply_delta(cfg: Any, delta: dict, prefix: str = "", source: str = "") -> None:
    """Merge a nested mapping into a dataclass instance, validating every key and value."""
    for key, value in delta.items():
        dotted = f"{prefix}{key}"
        current = _field(cfg, str(key), dotted, source)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{_where(source)}{dotted}: is a section; expected a mapping, got {value!r}")
            apply_delta(current, value, prefix=f"{dotted}.", source=source)
        else:
            set_value(cfg, str(key), value, source=source, prefix=prefix)


def set_value(cfg: Any, dotted: str, value: Any, source: str = "", prefix: str = "") -> None:
    """Set ``dotted`` (relative to ``cfg``) to ``value`` after checking its type against the schema."""
    *parents, leaf = dotted.split(".")
    node = cfg
    walked = prefix
    for part in parents:
        walked += part
        node = _field(node, part, walked, source)
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{_where(source)}{walked}: is a value, not a section")
        walked += "."
    full = walked + leaf
    current = _field(node, leaf, full, source)
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{_where(source)}{full}: is a section; set one of its keys ({_keys(current)})")
    hint = typing.get_type_hints(type(node))[leaf]
    setattr(node, leaf, _coerce(value, hint, full, source))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config: ``{"plm.kmeans.scales": (4, 8, 16), ...}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python view (tuples as lists) suitable for YAML or JSON."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        f.name: to_dict(getattr(cfg, f.name))
        if dataclasses.is_dataclass(getattr(cfg, f.name))
        else plain(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild a Config from a (possibly partial) nested mapping, e.g. one saved beside a checkpoint."""
    cfg = Config()
    apply_delta(cfg, data, source="saved config")
    return cfg


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _keys(node: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node))


def _field(node: Any, name: str, dotted: str, source: str) -> Any:
    names = {f.name for f in dataclasses.fields(node)}
    if name not in names:
        raise ConfigError(f"{_where(source)}unknown config key {dotted!r}; allowed here: {_keys(node)}")
    return getattr(node, name)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``hint``; return it in the schema's canonical type."""
    origin, args = get_origin(hint), get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{_where(source)}{key}: expected {expected}, got {value!r} ({type(value).__name__})")

    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise fail(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({hint})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"a list of {len(args)} values ({hint})")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise fail(str(hint))  # pragma: no cover - a schema annotation this function does not know
