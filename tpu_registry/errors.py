"""One error type for every problem a user can cause with data or configuration.

Each problem renders as ``path:line: dotted.field: what is wrong (hint)`` so that editors and
terminals can jump to it; a library call raises one exception carrying all of them.
"""

from __future__ import annotations

import sys
import threading

from .frozen import Frozen, asdict

# The CLI's warning handler: installed on the first warning of a command (``warn``), so a
# command with nothing to say never imports logging (3 ms at start-up).
_cli_command = False
_cli_handler = None
_cli_lock = threading.Lock()  # two threads' first warnings install one handler


def warn(message: str, *args: object) -> None:
    """A warning on the ``tpu_registry`` logger (``message % args``, as logging formats it).
    During a CLI command it is printed to stderr as ``warning: ...``."""
    import logging

    global _cli_handler
    logger = logging.getLogger("tpu_registry")
    with _cli_lock:
        if _cli_command and _cli_handler is None:
            _cli_handler = logging.StreamHandler(sys.stderr)
            _cli_handler.setLevel(logging.WARNING)
            _cli_handler.setFormatter(logging.Formatter("warning: %(message)s"))
            logger.addHandler(_cli_handler)
    logger.warning(message, *args)


def cli_warnings(on: bool) -> None:
    """Print warnings to stderr from now on (a CLI command starts), or stop (it ended)."""
    global _cli_command, _cli_handler
    with _cli_lock:
        _cli_command = on
        if not on and _cli_handler is not None:
            import logging

            logging.getLogger("tpu_registry").removeHandler(_cli_handler)
            _cli_handler = None


class Problem(Frozen):
    """What is wrong, where: a file and line (or none), the field, and how to fix it."""

    __slots__ = ("path", "line", "field", "message", "hint")
    path: str
    line: int | None
    field: str
    message: str
    hint: str

    def __init__(self, path: str, line: int | None, field: str, message: str, hint: str = ""):
        self._fill(path, line, field, message, hint)

    def __str__(self) -> str:
        if not self.path and not self.field:
            text = self.message
        else:
            where = f"{self.path}:{self.line}" if self.line else self.path
            # A problem of a whole file (or of no file: "detection") names no field.
            parts = [where, self.field] if where and self.field else [where or self.field]
            text = f"{': '.join(parts)}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_dict(self) -> dict:
        return asdict(self)


def shorten(text: str, limit: int = 80) -> str:
    """What a user typed, as an error quotes it: a 5,000-character value is cut, with its
    length, so the message stays one readable line."""
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


class RegistryError(Exception):
    """Base class: every error the registry raises on purpose."""

    def __init__(self, problems: list[Problem] | str):
        if isinstance(problems, str):
            problems = [Problem("", None, "", problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class CatalogError(RegistryError):
    """A generation file, tuning table or catalog folder is invalid."""


class DetectionError(RegistryError):
    """Detection failed under --strict, or a required TPU was not found."""


class TuningError(RegistryError):
    """A workload, overrides file or policy result is invalid."""


class UsageError(RegistryError):
    """The command line asks for two things that exclude each other."""
