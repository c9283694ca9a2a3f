"""Who may use the cluster's MLflow server (``mlflow server --app-name basic-auth``): two users, made on the head.

    python cluster/mlflow_auth.py [--dir ~/.clipzss]     # on the head before `ray start` (cluster.yaml runs it)

The first run on a head generates both passwords; later runs keep them. DIR (0700) then holds, each file 0600:

- ``mlflow-admin.env``: the server's admin (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), for the
  operator only; it never leaves the head.
- ``mlflow-trials.env``: ``clipzss-sweeps``, the user the sweep driver and every trial log as: not an admin, so it
  manages the experiments and models it creates and reads the rest (``default_permission = READ``). Ray copies it to
  every worker (``cluster_synced_files``) and each node's ``~/.bashrc`` exports it, so Ray's processes, the trials
  among them, have it in their environment; it is never a parameter, a tag or a command line.
- ``basic_auth.ini``: MLflow's auth config (``MLFLOW_AUTH_CONFIG_PATH``), and ``mlflow-flask-secret``, the key the
  server signs its CSRF tokens with: both read by cluster/mlflow_head.py.

The passwords are set in the users' database at every start of the server (``provision``), so a database restored
from S3 by a new head takes that head's passwords and MLflow's bootstrap admin password is never a default.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

ADMIN_USER = "admin"
TRIALS_USER = "clipzss-sweeps"
ADMIN_FILE, TRIALS_FILE, CONFIG_FILE = "mlflow-admin.env", "mlflow-trials.env", "basic_auth.ini"
SECRET_FILE = "mlflow-flask-secret"  # the server's CSRF key (MLFLOW_FLASK_SERVER_SECRET_KEY)


@dataclass(frozen=True)
class Login:
    username: str
    password: str

    def env(self) -> dict[str, str]:
        """The environment MLflow's clients read credentials from."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only its owner can read (created 0600: never readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _login(path: Path, username: str) -> Login:
    """The login kept in ``path``, generated (32 random bytes) when the file does not exist yet."""
    if not path.exists():
        login = Login(username, secrets.token_urlsafe(32))
        _write_private(path, "".join(f"{key}={value}\n" for key, value in login.env().items()))
    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return Login(values["MLFLOW_TRACKING_USERNAME"], values["MLFLOW_TRACKING_PASSWORD"])


def ensure_logins(folder: Path) -> tuple[Login, Login]:
    """The (admin, trials) logins kept in ``folder``, made on the first call."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return _login(folder / ADMIN_FILE, ADMIN_USER), _login(folder / TRIALS_FILE, TRIALS_USER)


def server_secret(folder: Path) -> str:
    """The server's key for signing its CSRF tokens, kept in ``folder`` (stable across restarts of the server)."""
    path = folder / SECRET_FILE
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def write_config(folder: Path, database: Path, admin: Login) -> Path:
    """MLflow's auth config for ``database`` (the users and their permissions); returns its path."""
    path = folder / CONFIG_FILE
    path.unlink(missing_ok=True)
    _write_private(
        path,
        "[mlflow]\n"
        "default_permission = READ\n"  # a user reads everything, and writes only what it created or was granted
        f"database_uri = sqlite:///{database}\n"
        f"admin_username = {admin.username}\n"
        f"admin_password = {admin.password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return path


def provision(database: Path, admin: Login, trials: Login, tracking: Path | None = None) -> None:
    """Create or update both users in the auth ``database`` with these passwords (trials: not an admin).

    A new auth database next to an existing ``tracking`` backend (a store made before authentication) grants the
    trials user MANAGE on the experiments and models already there, which nobody owns yet.
    """
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{database}")
    new = not store.list_users()
    for login, is_admin in ((admin, True), (trials, False)):
        if store.has_user(login.username):
            store.update_user(login.username, password=login.password, is_admin=is_admin)
        else:
            store.create_user(login.username, login.password, is_admin=is_admin)
    if new and tracking is not None and tracking.exists():
        with sqlite3.connect(tracking) as db:
            owned = [("experiment", str(row[0])) for row in db.execute("select experiment_id from experiments")]
            owned += [("registered_model", row[0]) for row in db.execute("select name from registered_models")]
        for kind, key in owned:
            store.grant_user_permission(trials.username, kind, key, "MANAGE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/mlflow_auth.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=str(Path.home() / ".clipzss"), help="where the logins are kept")
    folder = Path(p.parse_args(argv).dir)
    ensure_logins(folder)
    print(f"MLflow logins in {folder}: {ADMIN_FILE} (admin), {TRIALS_FILE} ({TRIALS_USER})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
