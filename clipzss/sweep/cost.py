"""What a trained student costs at inference: params, GFLOPs and images/s (the benchmark table's cost columns)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipzss.bench.timing import model_cost, timeit
from clipzss.config import from_dict
from clipzss.engine.checkpoint import load_model_bundle
from clipzss.models.students import build_student


def student_cost(model_file: str | Path, device: str | torch.device = "cpu") -> dict[str, float]:
    """Cost of the exported student in ``model_file`` on ``device`` at its training crop.

    ``cost/images_per_s`` times a forward of one training batch (``data.batch_size`` crops, median of 5), the
    student alone, as at test time.
    """
    bundle = load_model_bundle(model_file)
    cfg = from_dict(bundle["config"])
    student = build_student(cfg.student, int(bundle["embed_dim"]))
    student.load_state_dict(bundle["student"])
    student = student.to(device).eval()
    crop = cfg.data.crop_size
    params, gflops = model_cost(student, torch.randn(1, 3, crop, crop, device=device))
    batch = torch.randn(cfg.data.batch_size, 3, crop, crop, device=device)

    def forward() -> None:
        with torch.no_grad():
            student(batch)

    seconds = timeit(forward, torch.device(device), repeat=5)
    return {"cost/params_M": params, "cost/gflops": gflops, "cost/images_per_s": len(batch) / seconds}
