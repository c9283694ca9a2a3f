"""Figure 3: the deployed student (student + baked text classifier + upsampling) in every form that holds, against
the CLIP-in-the-loop pipeline (the same student plus one CLIP ViT-B/16 image forward per image).

Forms: torch eager, channels-last, bf16 autocast (where the device supports it), torch.compile, and the exported
ONNX graph in onnxruntime in each variant ``clipzss export`` chooses from (``clipzss/onnx_variants.py``: fp32,
optimised offline, int8 dynamic, int8 static calibrated on synthetic scenes). Each row has two ratios: against the
eager pipeline (what replacing a CLIP-at-test-time segmenter by this artefact gains), and against the pipeline with
CLIP in its own fastest measured form (the like-for-like figure). CLIP's forms and the student's are timed in the
same interleaved rounds, so both sides of a ratio saw the same load. Each form's argmax is compared with eager
fp32 on a synthetic scene (not noise: quantisation errors show on real structure), so a form that is fast but
wrong shows it. Before the forms, a profile splits the eager student into backbone and decode head.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clipzss.bench.clip import random_vit_b16
from clipzss.bench.timing import MIN_REPEATS, interleaved, model_cost

NUM_CLASSES = 20  # a VOC-sized vocabulary baked into the classifier
CALIBRATION_SCENES = 8


def bf16_supported(device: torch.device) -> bool:
    """bf16 that runs at hardware speed: any CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX (oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onnx_forms(model: nn.Module, image: torch.Tensor, device: torch.device, folder: Path) -> dict[str, Callable]:
    """The exported graph in onnxruntime: every CPU variant, or the fp32 graph on CUDA; {} without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    from clipzss.export import export_onnx
    from clipzss.onnx_variants import build_variants, scene_images, session

    path = folder / "model.onnx"
    export_onnx(model.cpu(), path, tuple(image.shape[-2:]), dynamic_size=False)
    model.to(device)
    array = image.cpu().numpy()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return {}
        cuda = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        return {"onnxruntime fp32 (CUDA)": lambda: torch.from_numpy(cuda.run(None, {"image": array})[0])}
    calibration = scene_images(CALIBRATION_SCENES, image.shape[-1], "train")
    forms = {}
    for name, variant in build_variants(path, folder, calibration).items():
        s = session(variant)
        forms[f"onnxruntime {name}"] = lambda s=s: torch.from_numpy(s.run(None, {"image": array})[0])
    return forms


def deployed_forms(
    model: nn.Module, image: torch.Tensor, device: torch.device, folder: Path, compile: bool
) -> dict[str, Callable]:
    """Name -> a no-argument call returning logits [1, N, H, W], for every form that builds on this machine.

    ``compile``: include torch.compile (its first call compiles: minutes on a small CPU).
    """
    forms: dict[str, Callable] = {"torch eager fp32": lambda: model(image)}
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    image_last = image.contiguous(memory_format=torch.channels_last)
    forms["torch channels-last"] = lambda: last(image_last)
    if bf16_supported(device):

        def bf16() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return last(image_last).float()

        forms["torch bf16 channels-last"] = bf16
    if compile:
        compiled = torch.compile(copy.deepcopy(model))
        forms["torch.compile"] = lambda: compiled(image)
    return forms | _onnx_forms(model, image, device, folder)


@torch.no_grad()
def profile_student(student: nn.Module, image: torch.Tensor, device: torch.device, repeat: int) -> dict[str, float]:
    """Eager time and achieved GFLOP/s of the backbone and of the decode head (the stride-4 head is memory-bound)."""
    feats = student.backbone(image)
    t = interleaved({"backbone": lambda: student.backbone(image), "head": lambda: student.head(feats)}, device, repeat)
    _, backbone_gflops = model_cost(student.backbone, image)
    _, head_gflops = model_cost(student.head, feats)
    return {
        **t["backbone"].columns("backbone_"),
        **t["head"].columns("head_"),
        "backbone_gflop_per_s": backbone_gflops / t["backbone"].median_ms * 1e3,
        "head_gflop_per_s": head_gflops / t["head"].median_ms * 1e3,
    }


def clip_calls(image: torch.Tensor, device: torch.device) -> tuple[dict[str, Callable], float, float]:
    """CLIP ViT-B/16 (random init, the real architecture: speed does not depend on the weights) per torch form.

    Returns ({form: call}, params in M of the image tower, GFLOPs).
    """
    clip = random_vit_b16(device)
    _, gflops = model_cost(clip, image)
    params = sum(p.numel() for p in clip.clip.visual.parameters()) / 1e6
    calls: dict[str, Callable] = {"eager fp32": lambda: clip(image)}
    if bf16_supported(device):

        def bf16() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return clip(image)

        calls["bf16 autocast"] = bf16
    return calls, params, gflops


def bench_image(size: int, device: torch.device) -> torch.Tensor:
    """[1, 3, size, size]: one synthetic-world validation scene, normalised."""
    from clipzss.onnx_variants import scene_images

    return torch.from_numpy(scene_images(1, size, "val")).to(device)


@torch.no_grad()
def _student_rows(arch: str, image: torch.Tensor, device: torch.device, clip: dict[str, Callable], repeat: int,
                  embed_dim: int, compile: bool) -> tuple[list[dict], dict[str, float], dict[str, dict]]:  # fmt: skip
    """One student's rows, its profile and CLIP's timings of the same rounds."""
    from clipzss.config import StudentConfig
    from clipzss.export import BakedClassifier
    from clipzss.models.students import build_student

    student = build_student(StudentConfig(arch=arch), embed_dim).to(device).eval()
    params, gflops = model_cost(student, image)
    profile = profile_student(student, image, device, repeat)
    model = BakedClassifier(student, torch.randn(NUM_CLASSES, embed_dim), alpha=50.0).to(device).eval()
    with tempfile.TemporaryDirectory() as folder:
        forms = deployed_forms(model, image, device, Path(folder), compile)
        reference = forms["torch eager fp32"]().float().cpu().argmax(1)
        first, agreement = {}, {}
        for name, call in forms.items():
            start = time.perf_counter()
            logits = call().float().cpu()  # the first call: compiles, first ORT run
            first[name] = time.perf_counter() - start
            agreement[name] = float((logits.argmax(1) == reference).float().mean())
        t = interleaved({**{f"CLIP {k}": v for k, v in clip.items()}, **forms}, device, repeat)
    clip_eager = t["CLIP eager fp32"].median_ms
    clip_best = min(t[f"CLIP {k}"].median_ms for k in clip)
    eager = t["torch eager fp32"].median_ms
    rows = [
        {"student": arch, "form": name, "params_M": params, "gflops": gflops, **t[name].columns(),
         "first_call_s": first[name], "argmax_agreement": agreement[name], "clip_eager_ms": clip_eager,
         "clip_best_ms": clip_best, "speedup_vs_eager_pipeline": (eager + clip_eager) / t[name].median_ms,
         "speedup_vs_best_clip_pipeline": (t[name].median_ms + clip_best) / t[name].median_ms}
        for name in forms
    ]  # fmt: skip
    return rows, profile, {k: t[f"CLIP {k}"].columns() for k in clip}


def bench_inference(
    students: tuple[str, ...],
    device: torch.device,
    size: int = 512,
    repeat: int = MIN_REPEATS,
    embed_dim: int = 512,
    compile: bool = True,
) -> dict[str, object]:
    """Figure 3 for each student family: profile, then every deployed form against the CLIP-in-the-loop pipeline."""
    torch.manual_seed(0)
    image = bench_image(size, device)
    clip, clip_params, clip_gflops = clip_calls(image, device)
    rows, profiles, clip_ms = [], {}, {}
    for arch in students:
        arch_rows, profiles[arch], clip_ms[arch] = _student_rows(arch, image, device, clip, repeat, embed_dim, compile)
        rows += arch_rows
    return {
        "rows": rows,
        "profiles": profiles,
        "clip_ms": clip_ms,
        "clip_params_M": clip_params,
        "clip_gflops": clip_gflops,
    }


def segment_peak_memory(pixels: int, timeout: float = 1800) -> dict[str, float]:
    """Peak resident memory of ``clipzss segment`` on one image of about ``pixels`` pixels (4:3; the pixel cap is
    the size that matters): the synthetic preset's student (random init: memory does not depend on the weights) and
    its teacher's 26-name vocabulary, in a fresh process so that nothing earlier raises the high-water mark.

    Returns pixels, the process's peak (GB) with the segmenter loaded and warmed up (one small image segmented) and
    after segmenting, and the bytes per pixel in between.
    """
    import json
    import math
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    width = round(math.sqrt(pixels * 4 / 3))
    height = pixels // width
    with tempfile.TemporaryDirectory() as folder:
        ramp = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)  # a gradient: fast to save and read
        Image.fromarray(np.broadcast_to(ramp[None, :, None], (height, width, 3))).save(Path(folder) / "image.png")
        code = f"from clipzss.bench.inference import _segment_memory_here as f; f({folder!r}, {width * height})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"segment memory benchmark failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _segment_memory_here(folder: str, pixels: int) -> None:
    """The measurement of :func:`segment_peak_memory`, in its own process; prints the figures as JSON."""
    import json
    import resource

    from PIL import Image

    from clipzss.config import load_config
    from clipzss.data.synthetic import CLASSES
    from clipzss.engine.segmenter import OpenVocabSegmenter
    from clipzss.models.students import build_student
    from clipzss.models.teacher import CLIPTeacher

    def peak_gb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

    cfg = load_config("synthetic", [f"teacher.cache_dir={folder}/text_cache"])
    teacher = CLIPTeacher(cfg.teacher)
    segmenter = OpenVocabSegmenter(cfg, build_student(cfg.student, teacher.embed_dim), cfg.loss.alpha, teacher)
    segmenter.set_vocabulary(CLASSES)
    Image.new("RGB", (64, 48)).save(Path(folder) / "warm_up.png")
    segmenter.segment_file(Path(folder) / "warm_up.png", folder)  # imports matplotlib, fills the allocators
    loaded = peak_gb()
    segmenter.segment_file(Path(folder) / "image.png", folder, max_pixels=pixels)
    peak = peak_gb()
    figures = {
        "pixels": pixels,
        "loaded_gb": loaded,
        "peak_gb": peak,
        "bytes_per_pixel": (peak - loaded) * 2**30 / pixels,
    }
    print(json.dumps(figures))
