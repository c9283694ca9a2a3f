"""Replay faults against a real tiny training and print fault -> outcome (``clipzss reliability``).

Every training here is the real CLI (``python -m clipzss.cli train``) in its own process on the synthetic world,
so signals, locks and outages are the real thing: kill -9, Ctrl-C (SIGINT), SIGTERM (to the trainer, and to its
whole process group with DataLoader workers), a second trainer in the same folder, an MLflow server killed mid-run
and restarted afterwards, a write limit that fails the checkpoint, bad values and bad ``--resume`` requests, and
odd image modes through ``clipzss segment``.

A fault is *survived* when the user gets what they would want (the run finishes or stops cleanly with a true
MLflow status, or the request is refused naming the key/file/holder). *Data lost* counts training steps whose
metrics are missing from MLflow or committed more than once. This is a benchmark, not a timed test: 19 tiny
trainings, well over an hour on a busy shared 2-core machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STEPS = 24  # optim.max_iters of every run
BASE = [
    f"optim.max_iters={STEPS}",
    "optim.warmup_iters=4",
    "run.checkpoint_interval=8",
    "run.eval_interval=12",
    "run.log_interval=1",
    "run.progress=false",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.max_eval_images=8",
    "tracking.log_images=false",
]


@dataclass
class Outcome:
    fault: str
    outcome: str
    survived: bool
    lost: int = 0


class Bench:
    """A workspace (``root``) holding the synthetic world, the MLflow store and one folder per run."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def args(self, name: str, *extra: str, uri: str | None = None) -> list[str]:
        return [*BASE, f"data.root={self.root / 'world'}", f"teacher.cache_dir={self.root / 'text_cache'}",
                f"run.output_dir={self.root / name}",
                f"tracking.uri={uri or self.uri}", *extra]  # fmt: skip

    def start(self, name: str, *extra: str, uri: str | None = None, resume: bool = False, **popen) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "clipzss.cli", "train", *self.args(name, *extra, uri=uri)]
        cmd += ["--resume"] if resume else []
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)

    def run(self, name: str, *extra: str, **kwargs) -> tuple[int, str]:
        """(exit code, stderr) of one training to its end."""
        proc = self.start(name, *extra, **kwargs)
        _, err = proc.communicate(timeout=900)
        return proc.returncode, err

    def tracked(self, name: str, uri: str | None = None) -> tuple[str, list[int], dict[str, str]]:
        """(MLflow status, steps of train/loss/total, params) of the run in folder ``name``."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri or self.uri)
        run = client.get_run((self.root / name / "mlflow_run_id").read_text().strip())
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss/total")]
        return run.info.status, steps, run.data.params

    def logged_past_checkpoint(self, name: str) -> bool:
        """A checkpoint exists and the journal holds metrics of a later step (so a crash now has steps to redo)."""
        from clipzss.engine.checkpoint import latest_checkpoint
        from clipzss.engine.spool import JOURNAL, read_journal

        last = latest_checkpoint(self.root / name)
        if last is None:
            return False
        step = int(last.stem.split("_")[1])
        logged = [r["args"][1] for r in read_journal(self.root / name / JOURNAL) if r["op"] == "log_metrics"]
        return any(s >= step + 2 for s in logged)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            err = proc.communicate()[1][-2000:]
            raise RuntimeError(f"the training ended before the fault could be injected: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError("the training did not reach the point of the fault in time")
        time.sleep(0.2)


def lost_steps(steps: list[int], last: int = STEPS) -> int:
    """Steps 1..last missing from ``steps`` plus steps committed more than once."""
    return len(set(range(1, last + 1)) - set(steps)) + (len(steps) - len(set(steps)))


def same_weights(a: Path, b: Path) -> bool:
    import torch

    x, y = (torch.load(p / "model.pt", weights_only=True)["student"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def crash_then_resume(bench: Bench, name: str, how: signal.Signals, fault: str, *extra: str,
                      group: bool = False) -> Outcome:  # fmt: skip
    """Interrupt a run with ``how`` once it has logged steps past a checkpoint, then ``--resume`` it.

    ``group``: the run is a process group of its own (its DataLoader workers too) and the signal goes to all of it,
    as Slurm, systemd and Kubernetes send it.
    """
    proc = bench.start(name, *extra, start_new_session=group)
    wait_for(lambda: bench.logged_past_checkpoint(name), proc)
    if group:
        os.killpg(proc.pid, how)
    else:
        proc.send_signal(how)
    proc.communicate(timeout=300)
    status_after_crash = bench.tracked(name)[0]
    code, err = bench.run(name, *extra, resume=True)
    status, steps, _ = bench.tracked(name)
    identical = code == 0 and same_weights(bench.root / name, bench.root / "reference")
    lost = lost_steps(steps)
    outcome = (f"exit {proc.returncode} -> MLflow {status_after_crash}; --resume: {status}, {len(steps)} step "
               f"values for {STEPS} steps, weights {'bit-identical to' if identical else 'DIFFER from'} an "
               "uninterrupted run")  # fmt: skip
    return Outcome(fault, outcome, code == 0 and status == "FINISHED" and identical and lost == 0, lost)


def two_at_once(bench: Bench) -> Outcome:
    procs = [bench.start("shared", f"run.seed={seed}") for seed in (0, 1)]
    results = [(p.communicate(timeout=900), p.returncode) for p in procs]
    codes = sorted(code for _, code in results)
    refused = any("is in use by pid" in err for (_, err), _ in results)
    status, steps, _ = bench.tracked("shared")
    lost = lost_steps(steps)
    outcome = f"exit codes {codes}; the second names the holder: {refused}; one MLflow run, {len(steps)} step values"
    return Outcome("two trainers, one run.output_dir", outcome, codes == [0, 1] and refused and lost == 0, lost)


def mlflow_outage(bench: Bench, reference_seconds: float) -> Outcome:
    """Kill the MLflow server mid-run (it stays down), time the run, restart the server, ``clipzss sync``."""
    port, db = free_port(), bench.root / "server.db"
    server = start_mlflow_server(port, db, bench.root)
    uri = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        proc = bench.start("outage", uri=uri)
        wait_for(lambda: bench.logged_past_checkpoint("outage"), proc)
        stop_server(server)
        proc.communicate(timeout=900)
        seconds = time.monotonic() - start
        server = start_mlflow_server(port, db, bench.root)
        sync = subprocess.run([sys.executable, "-m", "clipzss.cli", "sync", str(bench.root / "outage")],
                              env=bench.env, capture_output=True, text=True, timeout=300)  # fmt: skip
        status, steps, _ = bench.tracked("outage", uri)
    finally:
        stop_server(server)
    lost = lost_steps(steps)
    outcome = (f"run exit {proc.returncode} in {seconds:.0f} s (an untouched run: {reference_seconds:.0f} s); "
               f"server back + clipzss sync (exit {sync.returncode}): {status}, {len(steps)} step values")  # fmt: skip
    return Outcome("MLflow server killed mid-run", outcome, proc.returncode == 0 and status == "FINISHED" and lost == 0,
                   lost)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(port: int, db: Path, workdir: Path) -> subprocess.Popen:
    """A small ``mlflow server`` on 127.0.0.1 (one worker, no job runner), answering /health."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{db}",
           "--artifacts-destination", str(workdir / "server_artifacts")]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
                              start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError("mlflow server did not start within 180 s")


def stop_server(server: subprocess.Popen) -> None:
    """Kill ``mlflow server`` and its uvicorn worker (a child of its own: killing the parent alone leaves it)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)  # the whole session it was started in
    except ProcessLookupError:
        pass
    server.wait()


def refused(bench: Bench, fault: str, name: str, extra: list[str], expect: str, resume: bool = False) -> Outcome:
    """A request that must be refused before training, with ``expect`` in the message and no MLflow run made."""
    code, err = bench.run(name, *extra, resume=resume)
    message = next((line for line in reversed(err.splitlines()) if expect in line), "")
    no_run = not (bench.root / name / "mlflow_run_id").exists() or resume
    return Outcome(fault, f"exit {code}: {message.strip()[:150] or err.strip()[-150:]}", code != 0 and bool(message)
                   and no_run)  # fmt: skip


def resume_with_new_lr(bench: Bench) -> Outcome:
    """``--resume`` of a finished run with a longer schedule and a new lr: optimiser, config.yaml and MLflow agree."""
    import torch
    import yaml

    code, _ = bench.run("reference", f"optim.max_iters={STEPS + 8}", "optim.lr=5e-4", resume=True)
    status, steps, params = bench.tracked("reference")
    saved = yaml.safe_load((bench.root / "reference" / "config.yaml").read_text())["optim"]["lr"]
    state = torch.load(bench.root / "reference" / "checkpoints" / f"step_{STEPS + 8:08d}.pt", weights_only=True)
    backbone_lr = min(g["initial_lr"] for g in state["optimizer"]["param_groups"])
    mlflow_lr = params.get(f"optim.lr.from_step_{STEPS}")
    agree = saved == 5e-4 and backbone_lr == 5e-4 and mlflow_lr == "0.0005"
    lost = lost_steps(steps, STEPS + 8)
    outcome = (f"exit {code}, {status}; lr 5e-4 in optimizer: {backbone_lr}, config.yaml: {saved}, MLflow "
               f"optim.lr.from_step_{STEPS}: {mlflow_lr}; {len(steps)} step values for {STEPS + 8} steps")  # fmt: skip
    return Outcome("--resume optim.lr=5e-4 optim.max_iters=+8 on a finished run", outcome,
                   code == 0 and status == "FINISHED" and agree and lost == 0, lost)  # fmt: skip


def rerun_after_crash(bench: Bench) -> Outcome:
    """A run killed before its first checkpoint, then started again in the same folder (without --resume)."""
    proc = bench.start("rerun", "data.batch_size=2")
    wait_for(lambda: (bench.root / "rerun" / "mlflow_run_id").is_file(), proc)
    first = (bench.root / "rerun" / "mlflow_run_id").read_text()
    proc.kill()
    proc.communicate()
    code, _ = bench.run("rerun")
    status, steps, params = bench.tracked("rerun")
    fresh = (bench.root / "rerun" / "mlflow_run_id").read_text() != first
    lost = lost_steps(steps)
    outcome = (f"exit {code}; new MLflow run: {fresh}; its data.batch_size param: {params.get('data.batch_size')} "
               f"(config.yaml: 4); {status}")  # fmt: skip
    return Outcome("re-run of a crashed run in the same folder", outcome,
                   code == 0 and fresh and params.get("data.batch_size") == "4" and lost == 0, lost)  # fmt: skip


def full_disk(bench: Bench) -> Outcome:
    """The kernel refuses writes past 64 KiB (RLIMIT_FSIZE, as a full disk refuses them) when the checkpoint comes."""

    def limit_writes():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    proc = bench.start("full", "tracking.enabled=false", preexec_fn=limit_writes)
    _, err = proc.communicate(timeout=900)
    named = "cannot write" in err and "step_00000008.pt" in err and "MiB free" in err
    partial = [p.name for p in (bench.root / "full").rglob("*.tmp")]
    line = next((x for x in err.splitlines() if "cannot write" in x), err.strip()[-150:])
    outcome = f"exit {proc.returncode}: {line.strip()[:150]}; partial files left: {partial or 'none'}"
    return Outcome("full disk at checkpoint time", outcome, proc.returncode != 0 and named and not partial)


def odd_images(bench: Bench) -> Outcome:
    """``clipzss segment`` on 16-bit, RGBA, palette+transparency, LA, 1-bit and CMYK files; a float image refused."""
    import numpy as np
    from PIL import Image

    folder = bench.root / "images"
    folder.mkdir(exist_ok=True)
    grey16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    pictures = {"grey16.png": Image.fromarray(grey16), "rgba.png": Image.new("RGBA", (64, 64), (200, 0, 0, 128)),
                "la.png": Image.new("LA", (64, 64), (90, 200)), "bits.png": Image.new("1", (64, 64), 1),
                "cmyk.jpg": Image.new("CMYK", (64, 64), (0, 255, 255, 0)),
                "palette.png": Image.new("P", (64, 64), 3)}  # fmt: skip
    for name, picture in pictures.items():
        picture.save(folder / name)
    Image.new("F", (64, 64), 0.5).save(folder / "float.tif")
    cli = [sys.executable, "-m", "clipzss.cli", "segment", "--checkpoint", str(bench.root / "reference" / "model.pt"),
           "--classes", "a,b", "--out", str(folder / "out")]  # fmt: skip
    ok = subprocess.run([*cli, *(str(folder / n) for n in pictures)], env=bench.env, capture_output=True, text=True)
    bad = subprocess.run([*cli, str(folder / "float.tif")], env=bench.env, capture_output=True, text=True)
    written = np.asarray(Image.open(folder / "out" / "grey16_seg.png"))
    grey_kept = written.shape[0] > 0 and written[..., :3].min() < 128  # the gradient's dark end survived
    named = "float.tif" in bad.stderr and "mode F" in bad.stderr
    outcome = (f"{len(pictures)} modes segmented (exit {ok.returncode}), 16-bit greys kept: {grey_kept}; "
               f"float image refused by name: {named}")  # fmt: skip
    return Outcome("16-bit/RGBA/LA/1-bit/CMYK/P images, a float image", outcome,
                   ok.returncode == 0 and grey_kept and bad.returncode != 0 and named)  # fmt: skip


def run_reliability(workspace: str | Path | None = None) -> list[Outcome]:
    """Replay every fault; print and return the table. ``workspace``: where runs go (default: a temporary folder)."""
    root = Path(workspace or tempfile.mkdtemp(prefix="clipzss-reliability-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(root)
    print(f"reliability workspace: {root}", flush=True)
    start = time.monotonic()
    code, err = bench.run("reference")
    if code != 0:
        raise RuntimeError(f"the uninterrupted reference run failed:\n{err[-3000:]}")
    reference_seconds = time.monotonic() - start
    faults: list[Callable[[], Outcome]] = [
        lambda: two_at_once(bench),
        lambda: crash_then_resume(bench, "kill9", signal.SIGKILL, "kill -9 mid-run, then --resume"),
        lambda: crash_then_resume(bench, "ctrlc", signal.SIGINT, "Ctrl-C mid-run, then --resume"),
        lambda: crash_then_resume(bench, "sigterm", signal.SIGTERM, "SIGTERM mid-run, then --resume"),
        lambda: crash_then_resume(
            bench,
            "group",
            signal.SIGTERM,
            "SIGTERM to the process group (2 loader workers), then --resume",
            "data.num_workers=2",
            group=True,
        ),  # fmt: skip
        lambda: mlflow_outage(bench, reference_seconds),
        lambda: refused(bench, "optim.lr=-1", "bad_lr", ["optim.lr=-1"], "optim.lr: must be > 0"),
        lambda: refused(bench, "data.batch_size=0", "bad_bs", ["data.batch_size=0"], "data.batch_size: must be >= 1"),
        lambda: refused(bench, "optim.max_iters=0", "bad_it", ["optim.max_iters=0"], "optim.max_iters: must be >= 1"),
        lambda: refused(bench, "--resume with nothing to resume", "nothing", [], "nothing to resume", resume=True),
        lambda: refused(
            bench,
            "--resume changing data.batch_size",
            "kill9",
            ["data.batch_size=8"],
            "--resume cannot change data.batch_size",
            resume=True,
        ),  # fmt: skip
        lambda: rerun_after_crash(bench),
        lambda: full_disk(bench),
        lambda: odd_images(bench),
        lambda: resume_with_new_lr(bench),  # last: it extends the reference run the others compare with
    ]
    outcomes = []
    for fault in faults:
        outcomes.append(fault())
        print(f"  {outcomes[-1].fault}: {'survived' if outcomes[-1].survived else 'NOT survived'}", flush=True)
    print(format_outcomes(outcomes))
    return outcomes


def format_outcomes(outcomes: list[Outcome]) -> str:
    """The markdown table and the one-line figure."""
    lines = ["| fault | outcome | survived | data lost |", "|---|---|---|---|"]
    lines += [f"| {o.fault} | {o.outcome} | {'yes' if o.survived else 'NO'} | {o.lost} |" for o in outcomes]
    survived, lost = sum(o.survived for o in outcomes), sum(o.lost for o in outcomes)
    lines.append(f"\nfaults survived: {survived} / {len(outcomes)}, data lost = {lost} step(s)")
    return "\n".join(lines)
