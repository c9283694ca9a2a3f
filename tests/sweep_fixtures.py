"""Shared set-up of the sweep tests: entry scripts run as the user runs them, in a private Ray environment."""

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def private_ray_env(ray_tmp: str) -> dict[str, str]:
    """Environment of a sweep subprocess: Ray in ``ray_tmp`` (short: socket paths must fit 107 characters) with an
    auth token in the environment (Ray would otherwise write ``~/.ray/auth_token``), this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")  # fmt: skip
    return env


def ray_tmpdir() -> str:
    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


def run_script(script: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    """Run ``sweeps/<script>`` with ``args`` from ``cwd``; returns the completed process (output captured)."""
    return subprocess.run([sys.executable, str(REPO / "sweeps" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
