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

from clipzss.train import browse_hint

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


def _printed_links(base: str, root: Path, run) -> tuple[str, str]:
    """The runs-table and run links that a finished ``clipzss train`` prints (browse_hint), on this server."""
    hint = browse_hint(f"sqlite:///{root / 'mlflow.db'}", run.info.run_id, run.info.experiment_id)
    runs, this_run = (
        line.split(": ", 1)[1].strip() for line in hint.splitlines() if line.strip().startswith(("runs:", "this run:"))
    )
    return runs.replace("http://127.0.0.1:5000", base), this_run.replace("http://127.0.0.1:5000", base)


def test_the_printed_link_opens_the_runs_table_with_hiou_as_a_column(ui, page):
    base, root, shots = ui
    _, training, _ = _runs(root)
    runs, _ = _printed_links(base, root, training)
    _show(page, runs, training.info.run_name, shots / "experiment.png")
    assert page.get_by_text("ablation: 2 arms x 1 seed").first.is_visible()  # the ablation's parent run too
    header = page.get_by_role("columnheader").filter(has_text="val/hIoU").first
    header.wait_for(state="visible", timeout=60_000)  # a column of the table as it opens: no click needed


def test_a_run_page_opens_with_its_result_and_its_pictures(ui, page):
    base, root, shots = ui
    experiment, training, _ = _runs(root)
    _, run = _printed_links(base, root, training)
    result = f"hIoU {training.data.metrics['val/hIoU']:.2f}"  # the description's first line, in bold
    _show(page, run, result, shots / "run_overview.png")
    assert page.get_by_text(result).first.is_visible()
    metrics = run.replace("?", "/model-metrics?")
    page.goto(metrics)
    try:  # an image card per picture key (MLflow's image grid), each with a step slider
        page.get_by_placeholder("Search metric charts").fill("prediction_0")
        page.locator("h4[title='val/prediction_0']").first.wait_for(state="visible", timeout=60_000)
        page.get_by_role("slider").first.wait_for(state="visible", timeout=60_000)
    finally:
        page.screenshot(path=str(shots / "run_pictures.png"), full_page=True)
    page.get_by_placeholder("Search metric charts").fill("hIoU")
    page.get_by_text("hIoU", exact=True).first.wait_for(state="visible", timeout=60_000)  # the val/hIoU chart


def test_the_ablation_table_is_visible(ui, page):
    base, root, shots = ui
    experiment, _, parent = _runs(root)
    run = f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}"
    url = f"{run}/artifacts/ablation.json?workflowType=machine_learning"
    _show(page, url, "hIoU_mean", shots / "ablation_table.png")
    for text in ("baseline", "full", "mIoU_U_mean"):
        assert page.get_by_text(text).first.is_visible(), text
