"""Shared test set-up: offline hubs, deterministic small-thread torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny VOC fixture + tiny random-init CLIP teacher of ``tiny_run`` (built once per session)."""
    from tiny_run import make_assets

    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def trained_run(assets, tmp_path_factory):
    """Output folder of one tiny real training run (model.pt, checkpoints, config), shared by inference tests."""
    from tiny_run import tiny_overrides

    from clipzss.config import load_config
    from clipzss.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, tiny_overrides(assets, out, **{"tracking.enabled": "false"})))
    return out


@pytest.fixture(scope="session")
def real_store(tmp_path_factory):
    """A store made by the real commands: a short synthetic ``clipzss train`` and a 2-arm quick ``clipzss ablate``.

    Returns (folder, the overrides used): data, text cache, MLflow database and artifacts all live in the folder.
    """
    from clipzss.cli import main as cli

    root = tmp_path_factory.mktemp("store")
    common = [
        f"data.root={root / 'world'}",
        f"teacher.cache_dir={root / 'text'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.max_eval_images=4",
        "run.progress=false",
    ]
    train_args = ["train", *common, "optim.max_iters=4", "run.eval_interval=2",
                  f"run.output_dir={root / 'runs' / 'synthetic'}"]  # fmt: skip
    assert cli(train_args) == 0
    assert cli(["ablate", "--seeds", "1", "--quick", "--arms", "baseline,full", "--out", str(root / "ablation"),
                "--set", *common]) == 0  # fmt: skip
    return root, common
