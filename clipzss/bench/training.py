"""Figure 2: one CLIP-ZSS training step against the same student trained with plain seen-class losses.

The objective is timed (forward + backward into a leaf R) under each ablation, so that the GLM, the PLM and its
synthesizer are isolated by difference; the teacher forward, the student forward + backward and K-Means are timed
directly. A difference that timing noise makes negative is reported as 0 and its size as ``noise_ms``, so shares
are never negative and the reader sees how noisy the machine was.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from clipzss.bench.clip import random_vit_b16
from clipzss.bench.timing import MIN_REPEATS, interleaved
from clipzss.method.kmeans import multiscale_kmeans

ARMS = {
    "baseline": ["glm.weight=0", "plm.enabled=false"],
    "glm": ["plm.enabled=false"],
    "plm": ["glm.weight=0"],
    "plm_no_synth": ["glm.weight=0", "plm.synthesizer.enabled=false"],
    "full": [],
}


def _parts(
    objective_ms: dict[str, float], teacher_ms: float, student_ms: float, kmeans_ms: float
) -> tuple[dict[str, float], float]:
    """Each part's ms (differences clamped at 0) and the total clamped away (timing noise)."""
    glm = objective_ms["glm"] - objective_ms["baseline"]
    synth = objective_ms["plm"] - objective_ms["plm_no_synth"]
    raw = {
        "teacher": teacher_ms,
        "student": student_ms,
        "glm": glm,
        "kmeans": kmeans_ms,
        "synthesizer": synth,
        "pseudo_labels_and_losses": objective_ms["full"] - glm - kmeans_ms - synth,
    }
    noise = -sum(min(v, 0.0) for v in raw.values())
    return {k: max(v, 0.0) for k, v in raw.items()}, noise


def bench_training_step(
    device: torch.device,
    batch: int | None = None,
    crop: int | None = None,
    arch: str = "segformer_b0",
    repeat: int = MIN_REPEATS,
    bf16: bool | None = None,
) -> dict[str, float | str]:
    """Defaults: batch 8 at 512 px in bf16 autocast on a GPU, batch 2 at 256 px in fp32 on a CPU.

    Every part is timed in the same interleaved rounds; ``glm_plm_share``: the objective's cost beyond the plain
    losses (GLM, K-Means, pseudo labels, synthesizer, their losses) as a share of the CLIP-ZSS step.
    """
    from clipzss.config import Config, load_config
    from clipzss.method.objective import CLIPZSSObjective
    from clipzss.models.students import build_student

    gpu = device.type == "cuda"
    batch, crop = batch or (8 if gpu else 2), crop or (512 if gpu else 256)
    bf16 = gpu if bf16 is None else bf16
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    torch.manual_seed(0)
    teacher = random_vit_b16(device)
    base = Config()
    student = build_student(base.student.__class__(arch=arch), teacher.embed_dim).to(device).train()
    images = torch.randn(batch, 3, crop, crop, device=device)
    num_seen = 15
    labels = torch.randint(0, num_seen, (batch, crop, crop), device=device)
    labels[:, : crop // 3] = 255  # unlabelled band: where pseudo labels come from
    text = F.normalize(torch.randn(num_seen, teacher.embed_dim, device=device), dim=-1)
    with autocast():
        teacher_out = teacher(images)

    def student_step() -> None:
        with autocast():
            R = student(images)
        R.float().backward(torch.randn(R.shape, device=device))

    with autocast():
        R = student(images).detach().float()
    grid = min(teacher_out.dense.shape[-2:])
    scales = [s for s in base.plm.kmeans.scales if s <= grid] or [grid]  # a smoke crop's grid is small
    calls = {}
    for name, delta in ARMS.items():
        objective = CLIPZSSObjective(load_config(None, [*delta, f"plm.kmeans.scales={scales}"]), text).to(device)

        def objective_step(objective=objective) -> None:
            leaf = R.clone().requires_grad_(True)
            with autocast():
                losses, _ = objective(leaf, teacher_out, labels)
            losses["total"].backward()

        calls[f"objective_{name}"] = objective_step

    def teacher_step() -> None:
        with autocast():
            teacher(images)

    dense = teacher_out.dense.float()
    calls |= {"teacher": teacher_step, "student": student_step,
              "kmeans": lambda: multiscale_kmeans(dense, scales, base.plm.kmeans.iters)}  # fmt: skip
    t = interleaved(calls, device, repeat)
    objective_ms = {name: t[f"objective_{name}"].median_ms for name in ARMS}
    parts, noise = _parts(objective_ms, t["teacher"].median_ms, t["student"].median_ms, t["kmeans"].median_ms)
    plain = parts["student"] + objective_ms["baseline"]
    full = parts["teacher"] + parts["student"] + objective_ms["full"]
    return {
        "student_arch": arch,
        "batch": batch,
        "crop": crop,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "plain_step_ms": plain,
        "clipzss_step_ms": full,
        "ratio": full / plain,
        "glm_plm_share": (full - parts["teacher"] - parts["student"] - objective_ms["baseline"]) / full,
        "noise_ms": noise,
        **{f"share/{k}": v / full for k, v in parts.items()},
        **{f"ms/{k}": v for k, v in parts.items()},
        **{k: v for name, timing in t.items() for k, v in timing.columns(f"timed/{name}_").items()},
    }
