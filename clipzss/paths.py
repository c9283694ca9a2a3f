"""Path strings in configs: ``~`` expands to the home folder, ``@assets/`` to the package's shipped assets."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def resolve_path(path: str) -> str:
    """Expand ``~`` and the ``@assets/`` prefix; other strings (model names, URIs) come back unchanged."""
    if path.startswith("@assets/"):
        return str(ASSETS / path[len("@assets/") :])
    if path.startswith("~"):
        return str(Path(path).expanduser())
    return path
