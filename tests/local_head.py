"""A private copy of cluster/local.yaml's head for tests: its own sshd (cluster/local-head.sh in a temp folder),
reached by ssh through that sshd's inetd mode, inside a PID + mount namespace of the test's own.

The namespace is what makes the test safe on a shared machine: `ray down` runs `ray stop` on the head, which ends
every Ray process it can see; inside the namespace it sees only this head's. Killing the namespace's first process
ends everything left in it, so nothing outlives the test. The generated YAML differs from the documented one only
in where the head is (key, sshd config, namespace), its name and its ports (free ones).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_YAML = REPO / "cluster" / "local.yaml"
# the namespace's first process: adopts the daemons `ray start` leaves and reaps them when they end
REAPER = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""
HEAD_PORTS = ("--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--metrics-export-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list[str]:
    """The system tools the real launcher test needs (.ci/install installs them with apt)."""
    return [t for t in ("/usr/sbin/sshd", "rsync", "ssh", "unshare", "nsenter") if shutil.which(t) is None]


@dataclass
class LocalHead:
    state: Path  # cluster/local-head.sh's folder: keys, sshd_config, home/ (the head's HOME)
    namespace_init: int  # PID of the namespace's first process
    holder: subprocess.Popen
    yaml_path: Path
    env: dict[str, str]  # for the ray CLI: the checkout's venv first, temp files in the state folder

    def ray(self, *args: str, timeout: float = 300) -> tuple[float, str]:
        """Run ``ray ARGS`` from the repository root (as a user would); returns (seconds, output)."""
        start = time.monotonic()
        proc = subprocess.run(["ray", *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        output = proc.stdout + proc.stderr
        if proc.returncode:
            raise AssertionError(f"`ray {' '.join(args)}` exited {proc.returncode}:\n{output[-6000:]}")
        return time.monotonic() - start, output

    def processes(self) -> list[str]:
        """Command lines of the processes in the head's namespace besides its first one."""
        out = subprocess.run(["nsenter", "-t", str(self.namespace_init), "-p", "-m", "ps", "-eo", "pid=,args="],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
        return [args for pid, *rest in rows if pid != "1" for args in rest if not args.startswith("ps ")]

    def leftovers(self, timeout: float = 20) -> list[str]:
        """Processes still in the namespace after ``timeout`` s (ssh connections close within ControlPersist, 10 s)."""
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def close(self) -> None:
        os.kill(self.namespace_init, signal.SIGKILL)  # the kernel ends every process in the namespace
        self.holder.wait(timeout=30)
        shutil.rmtree(self.state, ignore_errors=True)


def generated_yaml(state: Path, namespace_init: int, name: str) -> dict:
    """local.yaml pointed at this head: its key, its sshd (entered in the namespace), a unique name, free ports."""
    config = yaml.safe_load(LOCAL_YAML.read_text())
    config["cluster_name"] = name
    sshd = config["auth"]["ssh_proxy_command"].replace(".local-head/", f"{state}/")
    config["auth"]["ssh_proxy_command"] = f"nsenter -t {namespace_init} -p -m {sshd}"
    config["auth"]["ssh_private_key"] = str(state / "id_ed25519")
    ports = " ".join(f"{flag}={free_port()}" for flag in HEAD_PORTS)
    config["head_start_ray_commands"] = [
        cmd.replace("--port=6379", f"--port={free_port()} {ports}") for cmd in config["head_start_ray_commands"]
    ]
    return config


def start_local_head() -> LocalHead:
    # short paths: Ray's unix sockets live under RAY_TMPDIR and must stay under 108 characters
    state = Path(tempfile.mkdtemp(prefix="czhead", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(state / "ray"), "TMPDIR": str(state / "tmp"),
           "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    (state / "tmp").mkdir()
    subprocess.run(["bash", str(REPO / "cluster" / "local-head.sh"), str(state)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", REAPER]
    )
    deadline = time.monotonic() + 10
    while not (children := psutil.Process(holder.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not children:
        holder.kill()
        raise RuntimeError("unshare started no namespace (needs root or user namespaces)")
    init = children[0].pid
    path = state / "cluster.yaml"
    path.write_text(yaml.safe_dump(generated_yaml(state, init, f"clipzss-test-{uuid.uuid4().hex[:8]}")))
    return LocalHead(state, init, holder, path, env)
