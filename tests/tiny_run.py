"""A tiny, real training set-up shared by the trainer, inference and benchmark tests.

A VOC-layout fixture dataset and a random-init ModifiedResNet open_clip teacher saved as a local checkpoint: every
code path of a real run (dataset, teacher loading, text cache, student, objective, MLflow) at CPU-test size.
"""

import json
from pathlib import Path

import torch
from dataset_fixtures import write_voc_fixture

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "clipzss": {"output_stride": 8},
}
REPO = Path(__file__).resolve().parents[1]


def make_assets(root: Path) -> dict[str, str | Path]:
    """Write the tiny VOC fixture and the tiny CLIP (JSON config + state dict) under ``root``."""
    from clipzss.models.clip_factory import create_clip

    data_root = write_voc_fixture(root / "data", n_train=4, n_val=2, size=(40, 48))
    model_json = root / "tiny_clip.json"
    model_json.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model, *_ = create_clip(str(model_json))
    torch.save(model.state_dict(), root / "tiny_clip.pt")
    return {"data": str(data_root), "json": str(model_json), "pt": str(root / "tiny_clip.pt"), "root": root}


def tiny_overrides(assets, out: Path, **extra) -> list[str]:
    items = {
        "data.dataset": "voc",
        "data.root": assets["data"],
        "data.crop_size": 32,
        "data.scale": "[64, 32]",
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.test_short_side": 32,
        "data.test_window": 32,
        "data.test_stride": 24,
        "teacher.model": assets["json"],
        "teacher.pretrained": assets["pt"],
        "teacher.templates": "single",
        "teacher.cache_dir": str(assets["root"] / "text_cache"),
        "student.arch": "segformer_tiny",
        "student.decoder_channels": 16,
        "plm.kmeans.scales": "[2, 4]",
        "plm.synthesizer.heads": 2,
        "glm.bank_size": 8,
        "optim.lr": 1e-3,
        "optim.warmup_iters": 1,
        "optim.max_iters": 4,
        "run.output_dir": str(out),
        "run.log_interval": 1,
        "run.eval_interval": 2,
        "run.checkpoint_interval": 2,
        "run.device": "cpu",
        "run.progress": False,
        "tracking.uri": f"sqlite:///{out.parent / 'mlflow.db'}",
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def assert_loads_as_student(uri: str, tracking_uri: str) -> None:
    """The logged model loads in a fresh Python process (as a user's script), through clipzss's loader and through
    ``mlflow.pyfunc``, as a working student: [1, 3, 32, 32] -> unit-norm features [1, C, 8, 8]; nothing is unpickled
    (``pickle.load(s)`` and ``torch.load`` fail if anything calls them)."""
    import subprocess
    import sys

    code = (
        "import json, sys, pickle, mlflow, mlflow.pyfunc, torch\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('unpickled')\n"
        "pickle.loads = pickle.load = torch.load = refuse\n"
        "from clipzss.engine.mlflow_flavor import load_student\n"
        "mlflow.set_tracking_uri(sys.argv[2])\n"
        "student = load_student(sys.argv[1]).student\n"
        "with torch.no_grad():\n"
        "    out = student(torch.rand(1, 3, 32, 32))\n"
        "served = mlflow.pyfunc.load_model(sys.argv[1]).predict(torch.rand(1, 3, 32, 32).numpy())\n"
        "print('FEATURES', json.dumps([list(out.shape), float(out.norm(dim=1).mean()), list(served.shape)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, uri, tracking_uri], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("FEATURES"))
    shape, norm, served = json.loads(line.split(" ", 1)[1])
    assert shape[0] == 1 and shape[2:] == [8, 8] and abs(norm - 1) < 1e-4 and served == shape, line
