"""TPU identifiers the catalog recognises but does not describe (``hardware/unsupported/``).

Detection reads this only when some evidence named no generation, to say what the chip is and
why no generation is given (``TPU v4 lite`` is v4i; ``TPU7`` is not TPU7x; PCI 0x0056 is a test
part) instead of "not recognised".
"""

from __future__ import annotations

import functools

from .catalog import builtin_hardware_dir
from .errors import CatalogError
from .frozen import Frozen

KINDS = ("device_kind", "gke_accelerator", "machine_type", "accelerator_type", "pci")


class Unsupported(Frozen):
    """A chip the catalog does not describe, why, and where that is said."""

    __slots__ = ("name", "why", "source")
    name: str
    why: str
    source: str

    def __init__(self, name: str, why: str, source: str) -> None:
        self._fill(name, why, source)

    def text(self) -> str:
        return f"{self.name}: not in the catalog ({self.why})"


@functools.lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str], Unsupported]:
    from .tomlfile import tomllib  # on first use: detection imports this module

    path = builtin_hardware_dir() / "unsupported" / "identifiers.toml"
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        out = {}
        for chip in doc["chip"]:
            entry = Unsupported(chip["name"], chip["why"], chip["source"])
            for ident in chip["identifiers"]:
                if ident["kind"] not in KINDS:
                    raise KeyError(f"identifier kind {ident['kind']!r}")
                out[(ident["kind"], _key(ident["kind"], ident["value"]))] = entry
        return out
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise CatalogError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def _key(kind: str, value: str) -> str:
    value = value.strip()
    if kind == "device_kind":
        return value
    value = value.lower()
    if kind == "machine_type":
        return value.rpartition("/")[2]
    if kind == "accelerator_type":
        return value.rpartition("-")[0] if value.rpartition("-")[2].isdecimal() else value
    if kind == "pci":
        return value.split("/")[0]
    return value


def recognise(kind: str, value: str) -> Unsupported | None:
    """The unsupported chip this identifier names, or None."""
    if kind not in KINDS:
        return None
    return _table().get((kind, _key(kind, value)))
