"""One error type for every problem a user can cause with data or configuration.

Each problem renders as ``path:line: dotted.field: what is wrong (hint)`` so that editors and
terminals can jump to it; a library call raises one exception carrying all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    field: str
    message: str
    hint: str = ""

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
