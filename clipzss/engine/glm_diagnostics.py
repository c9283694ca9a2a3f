"""GLM diagnostics: what the Global Learning Module does to a student's features, checkpoint by checkpoint.

    python -m clipzss.engine.glm_diagnostics RUN_DIR [RUN_DIR ...] [--images 64]

For every training checkpoint of each run (and step 0: the student as built, e.g. ImageNet weights), on the first
``--images`` scenes of the synthetic world's selection split (never val: what is learnt here chooses settings):
    drift             1 - linear CKA between the backbone's deepest feature map now and at step 0 (0 = unchanged)
    pixel_text_cos    mean cos(R, T_y) over pixels of class y: how close the dense features are to their own text
                      (``_seen`` / ``_unseen`` classes)
    pooled_cls_cos    mean cos(S_hat, S): the quantity the GLM's InfoNCE pulls up (S_hat after glm_proj if any)
    pooled_top1       fraction of images whose best class by cos(S_hat, T) is present (>= 1% of its pixels)
    cls_top1          the same for the teacher's global embedding S (the GLM's target)
    cls_text_cos      mean cos(S, T_y) over the classes y present: how far the target sits from the texts
    attn_entropy      entropy of the CLS-query attention softmax(S.R / tau) over the L locations, / log L (1 = mean)
All are logged as metrics ``<run name>/<metric>`` (step = checkpoint step) of one MLflow run, with a figure.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipzss.config import Config, from_dict
from clipzss.data.datasets import build_dataset
from clipzss.data.synthetic import materialize_world, selection_root
from clipzss.engine.checkpoint import CHECKPOINT_DIR, load_checkpoint
from clipzss.method.glm import attention_pool
from clipzss.method.objective import CLIPZSSObjective
from clipzss.models.students import build_student
from clipzss.models.teacher import CLIPTeacher
from clipzss.paths import resolve_path

PRESENT = 0.01  # a class is present in an image when it covers at least this fraction of its pixels


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) of two representations of the same n samples.

    Args:
        X: [n, p] features, Y: [n, q] features (rows = the same samples).

    Returns:
        ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc: 1 for representations equal up to
        rotation and isotropic scaling, near 0 for unrelated ones.
    """
    X, Y = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    cross = (Y.T @ X).pow(2).sum()
    return float(cross / ((X.T @ X).norm() * (Y.T @ Y).norm()))


def present_classes(labels: Tensor, num_classes: int) -> Tensor:
    """[B, H, W] full labels (255 ignored) -> [B, N] bool: classes covering >= PRESENT of the image."""
    B = labels.shape[0]
    valid = labels != 255
    counts = torch.zeros(B, num_classes + 1, device=labels.device)
    counts.scatter_add_(
        1, torch.where(valid, labels, num_classes).flatten(1), torch.ones_like(labels).flatten(1).float()
    )
    return counts[:, :num_classes] >= PRESENT * labels[0].numel()


def top1_present(vectors: Tensor, text: Tensor, present: Tensor) -> float:
    """Fraction of the B images whose best class by cos(vector, T) [B, N] is one of its present classes."""
    best = (F.normalize(vectors, dim=-1) @ text.T).argmax(-1)  # [B]
    return float(present.gather(1, best[:, None]).float().mean())


def pixel_text_cos(R: Tensor, labels: Tensor, text: Tensor, classes: Tensor) -> float:
    """Mean cos(R, T_y) over the pixels whose label y is in ``classes`` (labels nearest-resized to R's grid)."""
    small = F.interpolate(labels[:, None].float(), size=R.shape[-2:], mode="nearest")[:, 0].long()  # [B, h, w]
    keep = (small != 255) & torch.isin(small, classes)
    cos = torch.einsum("bchw,bhwc->bhw", R, text[small.clamp(max=text.shape[0] - 1)])
    return float(cos[keep].mean()) if keep.any() else float("nan")


@torch.no_grad()
def checkpoint_metrics(model: CLIPZSSObjective | None, student, teacher_out, images: Tensor, labels: Tensor,
                       text: Tensor, unseen: Tensor, reference: Tensor, cfg: Config) -> dict[str, float]:  # fmt: skip
    """The metrics of the module docstring for one student state (``model``: its objective, for glm_proj)."""
    deepest = student.backbone(student_input(student, images))[-1]  # [B, c, h', w']
    feats = deepest.permute(0, 2, 3, 1).flatten(0, 2)  # [B h' w', c]
    R = student(images)  # [B, C, h, w], unit norm
    S = teacher_out.cls
    S_hat = attention_pool(S, R, cfg.glm.attn_tau)
    if model is not None and hasattr(model, "glm_proj"):
        S_hat = model.glm_proj(S_hat)
    present = present_classes(labels, text.shape[0])
    tau = cfg.glm.attn_tau if cfg.glm.attn_tau > 0 else math.sqrt(R.shape[1])
    weights = torch.softmax(torch.einsum("bc,bcl->bl", S, R.flatten(2)) / tau, dim=-1)  # [B, L]
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean() / math.log(weights.shape[1])
    all_ids = torch.arange(text.shape[0])
    cls_text = (S @ text.T)[present]
    return {
        "drift": 1 - linear_cka(reference, feats),
        "pixel_text_cos_seen": pixel_text_cos(R, labels, text, all_ids[~unseen]),
        "pixel_text_cos_unseen": pixel_text_cos(R, labels, text, all_ids[unseen]),
        "pooled_cls_cos": float((F.normalize(S_hat, dim=-1) * S).sum(-1).mean()),
        "pooled_top1": top1_present(S_hat, text, present),
        "cls_top1": top1_present(S, text, present),
        "cls_text_cos": float(cls_text.mean()),
        "attn_entropy": float(entropy),
    }


def student_input(student, images: Tensor) -> Tensor:
    """The images as the student's backbone receives them (re-normalised for a backbone with its own statistics)."""
    if student.renormalise:
        return images * student.input_scale + student.input_shift
    return images


def run_curve(run_dir: Path, images: int) -> dict[int, dict[str, float]]:
    """{step: metrics} of one training run folder: step 0 = the student as built, then its checkpoints.

    Step 0 rebuilds the student from the config: for a pretrained backbone that is the exact starting point of
    ``drift``; a random-init backbone's draw is not reproduced here, so its ``drift`` means nothing.
    """
    checkpoints = sorted((run_dir / CHECKPOINT_DIR).glob("step_*.pt"))
    if not checkpoints:
        raise SystemExit(f"{run_dir}: no {CHECKPOINT_DIR}/step_*.pt (train with run.checkpoint_interval > 0)")
    cfg = from_dict(load_checkpoint(checkpoints[0])["config"])
    torch.manual_seed(cfg.run.seed)  # step 0 = the student train() builds at this seed
    root = materialize_world(resolve_path(cfg.data.root), progress=False)  # adds the selection split if missing
    held_out = build_dataset(cfg.data, "val", root=str(selection_root(root)))
    batch = [held_out[i] for i in range(min(images, len(held_out)))]
    x, labels = torch.stack([b["image"] for b in batch]), torch.stack([b["label"] for b in batch])
    teacher = CLIPTeacher(cfg.teacher)
    text = F.normalize(teacher.encode_text(held_out.class_names), dim=-1)
    unseen = torch.zeros(text.shape[0], dtype=torch.bool)
    unseen[held_out.unseen_ids] = True
    teacher_out = teacher(x)
    student = build_student(cfg.student, teacher.embed_dim).eval()
    with torch.no_grad():
        start = student.backbone(student_input(student, x))[-1]
    reference = start.permute(0, 2, 3, 1).flatten(0, 2)
    curve = {0: checkpoint_metrics(None, student, teacher_out, x, labels, text, unseen, reference, cfg)}
    for path in checkpoints:
        state = load_checkpoint(path)
        objective = CLIPZSSObjective(cfg, text)  # the seen text is a non-persistent buffer: any [N, C] builds it
        student.load_state_dict({k[8:]: v for k, v in state["model"].items() if k.startswith("student.")})
        objective.load_state_dict({k[10:]: v for k, v in state["model"].items() if k.startswith("objective.")})
        curve[int(state["step"])] = checkpoint_metrics(
            objective.eval(), student, teacher_out, x, labels, text, unseen, reference, cfg
        )
    return curve


def plot_curves(curves: dict[str, dict[int, dict[str, float]]], path: Path) -> Path:
    """One panel per metric, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("drift", "pixel_text_cos_seen", "pixel_text_cos_unseen", "pooled_cls_cos", "pooled_top1", "cls_text_cos")
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, metric in zip(axes.flat, shown, strict=True):
        for name, curve in curves.items():
            steps = sorted(curve)
            ax.plot(steps, [curve[s][metric] for s in steps], marker="o", label=name)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (with checkpoints/)")
    parser.add_argument("--labels", help="comma-separated names of the runs in the logs (default: folder names)")
    parser.add_argument("--images", type=int, default=64, help="selection-split scenes to measure on")
    parser.add_argument("--out", type=Path, default=Path("runs/glm_diagnostics"))
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels names {len(labels)} runs, {len(args.runs)} given")
    curves = {label: run_curve(run, args.images) for label, run in zip(labels, args.runs, strict=True)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, curve in curves.items():
        print(f"\n{name}")
        keys = list(next(iter(curve.values())))
        print("step  " + "  ".join(keys))
        for step in sorted(curve):
            print(f"{step:4d}  " + "  ".join(f"{curve[step][k]:.3f}" for k in keys))
    figure = plot_curves(curves, args.out / "glm_diagnostics.png")
    _log(curves, figure, args)
    return 0


def _log(curves: dict[str, dict[int, dict[str, float]]], figure: Path, args: argparse.Namespace) -> None:
    """One MLflow run holding every curve (``<run>/<metric>`` at each step) and the figure."""
    from clipzss.config import TrackingConfig
    from clipzss.engine.tracking import RUN_ID_FILE, Tracker

    (args.out / RUN_ID_FILE).unlink(missing_ok=True)  # each invocation is a new MLflow run
    tracking = TrackingConfig(uri=args.tracking_uri)
    tracker = Tracker(tracking, args.out, run_name="glm diagnostics", description=__doc__.split("\n\n")[1])
    tracker.log_params({"runs": [str(r) for r in args.runs], "images": args.images, "split": "selection"})
    for name, curve in curves.items():
        for step, metrics in curve.items():
            tracker.log_metrics({f"{name}/{k}": v for k, v in metrics.items() if np.isfinite(v)}, step)
    tracker.log_artifact(figure)
    tracker.finish()


if __name__ == "__main__":
    raise SystemExit(main())
