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
