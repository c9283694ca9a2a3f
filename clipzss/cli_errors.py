"""How the commands (``clipzss ...``, ``clipzss/train.py``) report a failure: one ``error: ...`` line, exit 1.

Every refusal in clipzss names what is wrong, which key or file, and what to do; the traceback above it adds nothing
a user can act on. ``--debug`` anywhere on the command line (or ``CLIPZSS_DEBUG=1``) lets the exception through,
traceback and all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "CLIPZSS_DEBUG"
DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_VARIABLE}=1)"
# what clipzss raises for bad input, a bad file or a store it cannot use; anything else is likely a bug in clipzss
REFUSALS = (ValueError, OSError, RuntimeError, LookupError)


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``CLIPZSS_DEBUG`` set to a true value."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes")


def describe(error: BaseException) -> str:
    """The one line a user reads: the refusal's own message, or the type, message and where to look for a bug."""
    message = str(error).strip() or type(error).__name__
    mlflow_errors = sys.modules.get("mlflow.exceptions")  # loaded whenever MLflow could have raised
    if isinstance(error, REFUSALS) or (mlflow_errors and isinstance(error, mlflow_errors.MlflowException)):
        return message
    return f"{type(error).__name__}: {message} (an unexpected error; {DEBUG_FLAG} shows the traceback)"


def run_reporting_errors(command: Callable[[], int], argv: Sequence[str]) -> int:
    """``command()``'s exit code; an exception becomes ``error: ...`` on stderr and exit code 1 (unless debugging)."""
    if debug_requested(argv):
        return command()
    try:
        return command()
    except Exception as e:  # noqa: BLE001 - the user reads one line; --debug shows the traceback
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1
