"""How every command ends on a user's mistake (a bad path, field, option or value): one line on
stderr naming it and exit code 2, as argparse does for a bad flag. Tracebacks are for bugs, or
asked for with HYDRA_FULL_ERROR=1 (Hydra's own switch, honoured by every command here)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

USAGE_EXIT_CODE = 2
# what a user can cause and fix; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ManifestError, AudioError, ConfigError, CheckpointMismatch are ValueErrors
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def verbose() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_user_errors(
    fn: Callable[..., Any], *args: Any, errors: tuple[type[BaseException], ...] = USER_ERRORS
) -> Any:
    """Run an entry point; a user error ends it with `error: ...` on one line and exit code 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        return fn(*args)
    except MissingMandatoryValue as exc:  # a `???` the command line did not fill
        if verbose():
            raise
        key = getattr(exc, "full_key", None) or "a value"
        print(f"error: {key}: missing (give {key}=...)", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except errors as exc:
        if verbose():
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)


def reports_user_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an argparse `main(argv)` so user errors end as one line, exit code 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return report_user_errors(lambda: main(*args, **kwargs))

    return wrapped


def say_progress(name: str = "sparqle") -> None:
    """Our own INFO lines (one per loaded part, ...) on stderr for argparse commands; Hydra's
    commands configure logging themselves."""
    import logging

    class Stderr(logging.StreamHandler):
        """Writes to sys.stderr as it is at each line (a caller that swaps it, as pytest's
        capture or a notebook does, would otherwise leave the handler on a closed stream)."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
