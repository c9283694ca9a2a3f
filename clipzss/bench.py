"""``clipzss bench``: the speed figures of issue 3, measured in one run on this machine.

1. Batched multi-scale K-Means vs scikit-learn's KMeans run per image and scale (same seeds, same iteration cap):
   speed-up, inertia agreement, and achieved GFLOP/s as a fraction of this machine's matmul GFLOP/s.
2. One CLIP-ZSS training step vs the same student trained with plain seen-class losses, and each part's share.
3. Inference throughput of the student alone vs the student plus a CLIP ViT-B/16 image forward per image
   (the cost every CLIP-at-test-time method pays), per student family, with params and GFLOPs.

Ratios are the figures to compare across machines; absolute times are printed too (and matter on a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipzss.method.kmeans import kmeans_seeds, multiscale_kmeans


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_gflops(device: torch.device, n: int = 2048) -> float:
    """This machine's dense float32 matmul throughput (the roofline the K-Means figure is compared with)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timeit(lambda: a @ b, repeat=5) / 1e9


def _cosine_inertia(tokens: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> float:
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return float((1 - (tokens * unit[assign]).sum(1)).sum())


def bench_kmeans(
    batch: int = 8, grid: int = 32, dim: int = 512, scales: tuple[int, ...] = (4, 8, 16), iters: int = 10
) -> dict[str, float]:
    """Figure 1: batched torch K-Means vs per-image scikit-learn KMeans."""
    from sklearn.cluster import KMeans

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # Clustered tokens (a few directions plus noise), like real dense CLIP features, rather than isotropic noise.
    centres = F.normalize(torch.randn(batch, 12, dim), dim=-1)
    pick = torch.randint(0, 12, (batch, grid * grid))
    noise = torch.randn(batch, grid * grid, dim) * (0.8 / dim**0.5)  # noise norm ~0.8 against unit centres
    tokens = F.normalize(centres[torch.arange(batch)[:, None], pick] + noise, dim=-1)
    D = tokens.transpose(1, 2).reshape(batch, dim, grid, grid).contiguous().to(device)

    ours = timeit(lambda: multiscale_kmeans(D, scales, iters), repeat=5)
    result = multiscale_kmeans(D, scales, iters)
    ks = [c.shape[1] for c in result.centroids]
    flops = 2 * batch * grid * grid * dim * sum(ks) * (2 * result.iterations + 1)  # assignment + update products

    X = tokens.double().numpy()
    seeds = [kmeans_seeds(D.cpu(), s).double().numpy() for s in scales]

    def sklearn_all() -> list:
        fits = []
        for b in range(batch):
            for s in range(len(scales)):
                km = KMeans(n_clusters=seeds[s].shape[1], init=seeds[s][b], n_init=1, max_iter=iters, algorithm="lloyd")
                fits.append(km.fit(X[b]))
        return fits

    theirs = timeit(sklearn_all, repeat=3)
    fits = sklearn_all()
    ours_inertia, theirs_inertia = [], []
    for b in range(batch):
        for s in range(len(scales)):
            fit = fits[b * len(scales) + s]
            theirs_inertia.append(_cosine_inertia(X[b], fit.cluster_centers_, fit.labels_))
            ours_inertia.append(float(result.inertia[b, s]))
    peak = matmul_gflops(device)
    achieved = flops / ours / 1e9
    return {
        "kmeans_ms": ours * 1e3,
        "sklearn_ms": theirs * 1e3,
        "speedup_vs_sklearn": theirs / ours,
        "inertia_ratio": float(np.mean(ours_inertia) / np.mean(theirs_inertia)),
        "achieved_gflops": achieved,
        "matmul_gflops": peak,
        "fraction_of_peak": achieved / peak,
    }


def model_cost(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float]:
    """(parameters in millions, forward GFLOPs) of ``model`` on ``image``, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 1e9


def bench_inference(
    students: tuple[str, ...] = ("segformer_b0", "resnet50", "swin_tiny"), size: int = 512, repeat: int = 3
) -> list[dict[str, float | str]]:
    """Figure 3: student alone vs student + one CLIP ViT-B/16 image forward per image, at ``size`` x ``size``."""
    from clipzss.config import StudentConfig, TeacherConfig
    from clipzss.models.students import build_student
    from clipzss.models.teacher import CLIPTeacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image = torch.randn(1, 3, size, size, device=device)
    clip = CLIPTeacher(TeacherConfig(model="ViT-B-16", pretrained="")).to(device)
    _, clip_gflops = model_cost(clip, image)
    clip_params = sum(p.numel() for p in clip.clip.visual.parameters()) / 1e6  # the image tower only
    clip_time = timeit(lambda: clip(image), repeat=repeat)
    rows = []
    for arch in students:
        student = build_student(StudentConfig(arch=arch), clip.embed_dim).to(device).eval()
        params, gflops = model_cost(student, image)
        with torch.no_grad():
            alone = timeit(lambda s=student: s(image), repeat=repeat)
        rows.append(
            {
                "student": arch,
                "params_M": params,
                "gflops": gflops,
                "student_ms": alone * 1e3,
                "student_plus_clip_ms": (alone + clip_time) * 1e3,
                "speedup": (alone + clip_time) / alone,
                "clip_params_M": clip_params,
                "clip_gflops": clip_gflops,
            }
        )
    return rows


def bench_training_step(batch: int | None = None, crop: int | None = None, arch: str = "segformer_b0", repeat: int = 5):
    """Figure 2: a CLIP-ZSS step vs a plain seen-class step of the same student, and each part's share.

    The objective is timed (forward + backward into a leaf R) under each ablation, so that the GLM, the PLM and
    its synthesizer are isolated by difference; the teacher forward, the student forward + backward and K-Means
    are timed directly. Defaults: batch 8 at 512 px on a GPU, batch 2 at 256 px on a CPU.
    """
    from clipzss.config import Config, TeacherConfig, load_config
    from clipzss.method.objective import CLIPZSSObjective
    from clipzss.models.students import build_student
    from clipzss.models.teacher import CLIPTeacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch or (8 if device.type == "cuda" else 2)
    crop = crop or (512 if device.type == "cuda" else 256)
    torch.manual_seed(0)
    teacher = CLIPTeacher(TeacherConfig(model="ViT-B-16", pretrained="")).to(device)
    base = Config()
    student = build_student(base.student.__class__(arch=arch), teacher.embed_dim).to(device).train()
    images = torch.randn(batch, 3, crop, crop, device=device)
    num_seen = 15
    labels = torch.randint(0, num_seen, (batch, crop, crop), device=device)
    labels[:, : crop // 3] = 255  # unlabelled band: where pseudo labels come from
    text = F.normalize(torch.randn(num_seen, teacher.embed_dim, device=device), dim=-1)
    teacher_out = teacher(images)

    def student_step():
        R = student(images)
        R.backward(torch.randn_like(R))

    R = student(images).detach()
    arms = {
        "baseline": ["glm.weight=0", "plm.enabled=false"],
        "glm": ["plm.enabled=false"],
        "plm": ["glm.weight=0"],
        "plm_no_synth": ["glm.weight=0", "plm.synthesizer.enabled=false"],
        "full": [],
    }
    objective_ms = {}
    for name, delta in arms.items():
        objective = CLIPZSSObjective(load_config(None, delta), text).to(device)

        def objective_step(objective=objective):
            leaf = R.clone().requires_grad_(True)
            losses, _ = objective(leaf, teacher_out, labels)
            losses["total"].backward()

        objective_ms[name] = timeit(objective_step, repeat=repeat) * 1e3
    teacher_ms = timeit(lambda: teacher(images), repeat=repeat) * 1e3
    student_ms = timeit(student_step, repeat=repeat) * 1e3
    scales = base.plm.kmeans.scales
    kmeans_ms = timeit(lambda: multiscale_kmeans(teacher_out.dense, scales, base.plm.kmeans.iters), repeat=repeat) * 1e3
    plain = student_ms + objective_ms["baseline"]
    full = teacher_ms + student_ms + objective_ms["full"]
    parts = {
        "teacher": teacher_ms,
        "student": student_ms,
        "glm": objective_ms["glm"] - objective_ms["baseline"],
        "kmeans": kmeans_ms,
        "synthesizer": objective_ms["plm"] - objective_ms["plm_no_synth"],
        "pseudo_labels_and_losses": objective_ms["full"] - (objective_ms["glm"] - objective_ms["baseline"])
        - kmeans_ms - (objective_ms["plm"] - objective_ms["plm_no_synth"]),
    }  # fmt: skip
    return {
        "batch": batch,
        "crop": crop,
        "student_arch": arch,
        "plain_step_ms": plain,
        "clipzss_step_ms": full,
        "ratio": full / plain,
        "glm_plm_share_without_teacher": (objective_ms["full"] - objective_ms["baseline"]) / full,
        "kmeans_share": kmeans_ms / full,
        **{f"share/{k}": v / full for k, v in parts.items()},
        **{f"ms/{k}": v for k, v in parts.items()},
    }


def run_benchmarks(quick: bool = False) -> dict[str, object]:
    """Run the three figures and print them; ``quick`` shrinks sizes for a smoke run."""
    device = (
        "cuda: " + torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"clipzss bench on {device}")
    kmeans = bench_kmeans(batch=2, grid=16, dim=64, iters=3) if quick else bench_kmeans()
    print("\n[1] multi-scale K-Means, batched torch vs scikit-learn per image (same seeds, same iteration cap)")
    for key, value in kmeans.items():
        print(f"    {key:24s} {value:10.3f}")
    step = bench_training_step(batch=1, crop=64, arch="segformer_tiny", repeat=1) if quick else bench_training_step()
    print(f"\n[2] training step, {step['student_arch']}, batch {step['batch']}, crop {step['crop']}: CLIP-ZSS vs plain")
    for key, value in step.items():
        if isinstance(value, float):
            print(f"    {key:36s} {value:10.3f}")
    rows = bench_inference(students=("segformer_tiny",), size=64, repeat=1) if quick else bench_inference()
    print("\n[3] inference at 512x512 (quick: 64): student alone vs student + CLIP ViT-B/16 image forward")
    print(f"    {'student':16s} {'params M':>9s} {'GFLOPs':>8s} {'ms':>9s} {'+CLIP ms':>9s} {'speed-up':>9s}")
    for r in rows:
        print(f"    {r['student']:16s} {r['params_M']:9.1f} {r['gflops']:8.1f} {r['student_ms']:9.1f} "
              f"{r['student_plus_clip_ms']:9.1f} {r['speedup']:8.2f}x")  # fmt: skip
    print(
        f"    CLIP ViT-B/16 image tower: {rows[0]['clip_params_M']:.1f} M params, {rows[0]['clip_gflops']:.1f} GFLOPs"
    )
    return {"kmeans": kmeans, "training_step": step, "inference": rows}
