"""Figure 3: the deployed student (student + baked text classifier + upsampling) in every form that holds, against
the CLIP-in-the-loop pipeline (the same student plus one CLIP ViT-B/16 image forward per image).

Forms: torch eager, channels-last, bf16 autocast (where the device supports it), torch.compile, and the exported
ONNX graph in onnxruntime. Each row has two ratios: against the eager pipeline (what replacing a CLIP-at-test-time
segmenter by this artefact gains), and against the pipeline with CLIP in its own fastest measured form (the
like-for-like figure). Each form's logits are compared with eager fp32 (argmax agreement), so a form that is
fast but wrong shows it. Before the forms, a profile splits the eager student into backbone and decode head.
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
from clipzss.bench.timing import model_cost, timeit

NUM_CLASSES = 20  # a VOC-sized vocabulary baked into the classifier


def bf16_supported(device: torch.device) -> bool:
    """bf16 that runs at hardware speed: any CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX (oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onnx_form(model: nn.Module, image: torch.Tensor, device: torch.device, folder: Path) -> Callable | None:
    """The exported graph in an onnxruntime session (CPU, or CUDA when onnxruntime has it); None if unavailable."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return None
    from clipzss.export import export_onnx

    path = folder / "model.onnx"
    export_onnx(model.cpu(), path, tuple(image.shape[-2:]), dynamic_size=False)
    model.to(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=[provider])
    array = image.cpu().numpy()
    return lambda: torch.from_numpy(session.run(None, {"image": array})[0])


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
    onnx = _onnx_form(model, image, device, folder)
    if onnx is not None:
        forms["onnxruntime (exported)"] = onnx
    return forms


@torch.no_grad()
def profile_student(student: nn.Module, image: torch.Tensor, device: torch.device, repeat: int) -> dict[str, float]:
    """Eager time and achieved GFLOP/s of the backbone and of the decode head (the stride-4 head is memory-bound)."""
    feats = student.backbone(image)
    backbone_ms = timeit(lambda: student.backbone(image), device, repeat) * 1e3
    head_ms = timeit(lambda: student.head(feats), device, repeat) * 1e3
    _, backbone_gflops = model_cost(student.backbone, image)
    _, head_gflops = model_cost(student.head, feats)
    return {
        "backbone_ms": backbone_ms,
        "head_ms": head_ms,
        "backbone_gflop_per_s": backbone_gflops / backbone_ms * 1e3,
        "head_gflop_per_s": head_gflops / head_ms * 1e3,
    }


@torch.no_grad()
def clip_forms_ms(image: torch.Tensor, device: torch.device, repeat: int) -> tuple[dict[str, float], float, float]:
    """CLIP ViT-B/16 (random init, the real architecture: speed does not depend on the weights) per torch form.

    Returns ({form: ms}, params in M of the image tower, GFLOPs).
    """
    clip = random_vit_b16(device)
    _, gflops = model_cost(clip, image)
    params = sum(p.numel() for p in clip.clip.visual.parameters()) / 1e6
    times = {"eager fp32": timeit(lambda: clip(image), device, repeat) * 1e3}
    if bf16_supported(device):

        def bf16() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return clip(image)

        times["bf16 autocast"] = timeit(bf16, device, repeat) * 1e3
    return times, params, gflops


def bench_inference(
    students: tuple[str, ...],
    device: torch.device,
    size: int = 512,
    repeat: int = 3,
    embed_dim: int = 512,
    compile: bool = True,
) -> dict[str, object]:
    """Figure 3 for each student family: profile, then every deployed form against the CLIP-in-the-loop pipeline."""
    from clipzss.config import StudentConfig
    from clipzss.export import BakedClassifier
    from clipzss.models.students import build_student

    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size, device=device)
    clip_ms, clip_params, clip_gflops = clip_forms_ms(image, device, repeat)
    clip_best = min(clip_ms.values())
    rows, profiles = [], {}
    for arch in students:
        student = build_student(StudentConfig(arch=arch), embed_dim).to(device).eval()
        params, gflops = model_cost(student, image)
        profiles[arch] = profile_student(student, image, device, repeat)
        model = BakedClassifier(student, torch.randn(NUM_CLASSES, embed_dim), alpha=50.0).to(device).eval()
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            forms = deployed_forms(model, image, device, Path(folder), compile)
            reference = forms["torch eager fp32"]().float().cpu()
            eager_ms = None
            for name, call in forms.items():
                start = time.perf_counter()
                logits = call().float().cpu()  # also the warm-up: compiles, first ORT run
                first_s = time.perf_counter() - start
                ms = timeit(call, device, repeat, warmup=1) * 1e3
                agreement = float((logits.argmax(1) == reference.argmax(1)).float().mean())
                eager_ms = eager_ms or ms
                rows.append({
                    "student": arch, "form": name, "params_M": params, "gflops": gflops, "ms": ms,
                    "first_call_s": first_s, "argmax_agreement": agreement,
                    "speedup_vs_eager_pipeline": (eager_ms + clip_ms["eager fp32"]) / ms,
                    "speedup_vs_best_clip_pipeline": (ms + clip_best) / ms,
                })  # fmt: skip
    return {
        "rows": rows,
        "profiles": profiles,
        "clip_ms": clip_ms,
        "clip_params_M": clip_params,
        "clip_gflops": clip_gflops,
    }
