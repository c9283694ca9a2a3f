"""Faster forms of an exported ONNX graph, each checked against torch: the variants ``clipzss export`` chooses from.

Variants of the fp32 graph ``model.onnx``:

    fp32                     as exported; onnxruntime applies its graph optimisations (ORT_ENABLE_ALL) at load
    fp32 optimised offline   the graph after onnxruntime's ORT_ENABLE_EXTENDED optimisations (fusions), saved, so
                             a session loads a fused graph; the level that stays portable across CPUs (ALL adds
                             layout transforms for this CPU only, and onnxruntime still applies them at load)
    int8 dynamic             MatMul/Gemm weights int8, activations quantised per call (onnxruntime.quantization)
    int8 static              QDQ int8 weights (per channel) and activations, calibrated on synthetic-world scenes

Every session runs with intra-op threads = this process's cores, inter-op 1, sequential execution. A variant's
argmax agreement with the torch model is measured on scenes it was not calibrated on; only a variant at
``MIN_VARIANT_AGREEMENT`` or more may be chosen, and of those the fastest median (timed interleaved) is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipzss.bench.timing import MIN_REPEATS, Timing, interleaved

MIN_VARIANT_AGREEMENT = 0.99
CALIBRATION_SCENES = 8
CHECK_SCENES = 4
VARIANTS = ("fp32", "fp32 optimised offline", "int8 dynamic", "int8 static")


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session(path: Path, threads: int | None = None, optimised_to: Path | None = None):
    """An onnxruntime CPU session of ``path``: ORT_ENABLE_ALL, ``threads`` (default: all cores) intra-op threads.

    ``optimised_to``: instead, optimise at ORT_ENABLE_EXTENDED and save the optimised graph there.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimised_to is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimised_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def scene_images(count: int, size: int, stream: str, seed: int = 0) -> np.ndarray:
    """[count, 3, size, size] float32: synthetic-world scenes rendered at ``size``, normalised for the student."""
    from clipzss.data.synthetic import render_scene, scene_rng
    from clipzss.data.transforms import normalize

    scenes = [render_scene(scene_rng(seed, stream, i), size=size).image for i in range(count)]
    return np.stack([normalize(image).numpy() for image in scenes])


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a stack of images, one per call."""

    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{"image": image[None]} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def build_variants(fp32: Path, folder: Path, calibration: np.ndarray) -> dict[str, Path]:
    """Write every variant of the fp32 graph ``fp32`` into ``folder``; name -> its file (a failed one is skipped)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths = {"fp32": fp32}
    builders: dict[str, Callable[[Path], object]] = {
        "fp32 optimised offline": lambda out: session(fp32, optimised_to=out),
        "int8 dynamic": lambda out: quantize_dynamic(fp32, out, weight_type=QuantType.QInt8),
        "int8 static": lambda out: quantize_static(
            prepared,
            out,
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        ),  # fmt: skip
    }
    prepared = folder / "model.prepared.onnx"  # shapes inferred and graph cleaned: what the quantiser expects
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    except Exception as error:  # noqa: BLE001 - a graph the pre-processor cannot read is quantised as it is
        print(f"    (quantisation pre-processing failed, quantising the graph as exported: {error})")
        prepared = fp32
    for name, build in builders.items():
        out = folder / f"model.{name.replace(' ', '_')}.onnx"
        try:
            build(out)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises many types; the variant is just not offered
            print(f"    (variant {name!r} failed to build: {type(error).__name__}: {error})")
            continue
        paths[name] = out
    return paths


@torch.no_grad()
def argmax_agreement(call: Callable[[np.ndarray], np.ndarray], model: nn.Module, images: np.ndarray) -> float:
    """Fraction of pixels where ``call``'s logits and ``model``'s (torch, fp32) have the same argmax on ``images``."""
    same = total = 0
    for image in images:
        expected = model(torch.from_numpy(image[None])).argmax(1).numpy()
        same += int((call(image[None]).argmax(1) == expected).sum())
        total += expected.size
    return same / total


def compare_variants(
    paths: dict[str, Path], model: nn.Module, check: np.ndarray, image: np.ndarray, repeat: int = MIN_REPEATS
) -> list[dict]:
    """Per variant: file, argmax agreement with ``model`` on ``check`` images, and its timing on ``image`` [1, 3, H, W].

    All variants are timed in the same interleaved rounds. Rows in the order of ``paths``.
    """
    sessions = {name: session(path) for name, path in paths.items()}
    calls = {name: (lambda s=s: s.run(None, {"image": image})) for name, s in sessions.items()}
    timings: dict[str, Timing] = interleaved(calls, torch.device("cpu"), repeat)
    rows = []
    for name, s in sessions.items():
        agreement = argmax_agreement(lambda x, s=s: s.run(None, {"image": x})[0], model, check)
        rows.append({"variant": name, "file": paths[name].name, "argmax_agreement": agreement,
                     **timings[name].columns()})  # fmt: skip
    return rows


def fastest_agreeing(rows: list[dict]) -> dict:
    """The row of the fastest variant (median ms) with agreement >= ``MIN_VARIANT_AGREEMENT``; fp32 if none is."""
    keeping = [r for r in rows if r["argmax_agreement"] >= MIN_VARIANT_AGREEMENT] or [rows[0]]
    return min(keeping, key=lambda r: r["ms"])


def deploy_fastest(model: nn.Module, onnx_path: Path, size: int) -> dict:
    """Replace the fp32 graph at ``onnx_path`` by its fastest variant that agrees with ``model``; say which.

    Calibration (int8 static) and agreement use different synthetic-world scenes rendered at ``size`` (the export
    window); the timing is one of the agreement scenes. Returns the ``deploy.json`` entry: the variant chosen,
    the threads it was timed with, and every variant's agreement and timing.
    """
    calibration = scene_images(CALIBRATION_SCENES, size, "train")
    check = scene_images(CHECK_SCENES, size, "val")
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as folder:
        fp32 = Path(folder) / "model.onnx"
        shutil.copyfile(onnx_path, fp32)
        paths = build_variants(fp32, Path(folder), calibration)
        rows = compare_variants(paths, model, check, check[:1])
        chosen = fastest_agreeing(rows)
        shutil.copyfile(paths[chosen["variant"]], onnx_path)
    print(f"  variants at {size}x{size}, {cores()} threads (median of {MIN_REPEATS} [min, max], agreement with torch "
          f"on {CHECK_SCENES} synthetic scenes; a variant needs {MIN_VARIANT_AGREEMENT:.0%}):")  # fmt: skip
    for r in rows:
        mark = "  <- chosen" if r is chosen else ""
        print(f"    {r['variant']:24s} {r['ms']:8.1f} ms [{r['min_ms']:.1f}, {r['max_ms']:.1f}]  "
              f"argmax agreement {r['argmax_agreement']:.2%}{mark}")  # fmt: skip
    return {"variant": chosen["variant"], "intra_op_threads": cores(),
            "variants": [{k: v for k, v in r.items() if k != "file"} for r in rows]}  # fmt: skip
