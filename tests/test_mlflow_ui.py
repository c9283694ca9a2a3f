"""The MLflow UI, as a user opens it in a browser: one `mlflow server` on 127.0.0.1 over a store made by the real
commands, and headless Chromium (Debian's ``chromium``, driven by Playwright). Screenshots are kept as files in
``$CLIPZSS_SCREENSHOTS`` (CI keeps them) or the test's temporary folder."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(real_store, tmp_path_factory):
    """(base URL, store folder, screenshot folder) of a running ``mlflow server`` (stopped after the module)."""
    root, _ = real_store
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            str(mlflow_cli),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {log.name}") from None
                time.sleep(1)
        shots = Path(os.environ.get("CLIPZSS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
        shots.mkdir(parents=True, exist_ok=True)
        yield base, root, shots
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: .ci/install installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        yield page
        browser.close()


def _runs(root: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clipzss")
    runs = client.search_runs([experiment.experiment_id])
    training = next(r for r in runs if r.info.run_name.startswith("segformer_tiny synthetic"))
    parent = next(r for r in runs if r.info.run_name.startswith("ablation:"))
    return experiment.experiment_id, training, parent


def _show(page, url: str, text: str, shot: Path) -> None:
    page.goto(url)
    try:
        page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=60_000)
    finally:
        page.screenshot(path=str(shot), full_page=True)


def test_the_experiment_opens_on_its_training_runs(ui, page):
    base, root, shots = ui
    experiment, training, _ = _runs(root)
    # MLflow 3.17.2's UI picks GenAI or model-training from its own toggle (remembered by the browser, default GenAI),
    # not from the experiment's mlflow.experimentKind tag: links carry the toggle's URL parameter.
    url = f"{base}/#/experiments/{experiment}?workflowType=machine_learning"
    _show(page, url, training.info.run_name, shots / "experiment.png")
    assert page.get_by_text("ablation: 2 arms x 1 seed").first.is_visible()  # the ablation's parent run too


def test_a_runs_metrics_and_pictures_are_visible(ui, page):
    base, root, shots = ui
    experiment, training, _ = _runs(root)
    run = f"{base}/#/experiments/{experiment}/runs/{training.info.run_id}"
    page.goto(f"{run}/model-metrics?workflowType=machine_learning")
    page.get_by_placeholder("Search metric charts").fill("hIoU")  # the val section is below the train charts
    try:  # the chart of val/hIoU, titled hIoU in the section val, drawn (its x axis says Step)
        page.get_by_text("hIoU", exact=True).first.wait_for(state="visible", timeout=60_000)
        page.get_by_text("Step", exact=True).first.wait_for(state="visible", timeout=60_000)
    finally:
        page.screenshot(path=str(shots / "run_metrics.png"), full_page=True)
    url = f"{run}/artifacts/images/val_0_step4.png?workflowType=machine_learning"
    _show(page, url, "val_0_step4.png", shots / "run_picture.png")
    widths = "() => [...document.images].filter(i => i.complete).map(i => i.naturalWidth)"
    page.wait_for_function(f"() => ({widths})().some(w => w >= 800)", timeout=60_000)  # the panel, full size


def test_the_ablation_table_is_visible(ui, page):
    base, root, shots = ui
    experiment, _, parent = _runs(root)
    run = f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}"
    url = f"{run}/artifacts/ablation.json?workflowType=machine_learning"
    _show(page, url, "hIoU_mean", shots / "ablation_table.png")
    for text in ("baseline", "full", "mIoU_U_mean"):
        assert page.get_by_text(text).first.is_visible(), text
