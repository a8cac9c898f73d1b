"""Figures derived from a chip's stored facts, shared by the schema and the records.

One definition for both the pydantic model that validates a file (``spec.Chip``) and the
plain record the catalog hands out (``records.Chip``): derived values are computed, never
stored, so they cannot disagree with the facts they come from.
"""

from __future__ import annotations


def axes_of(topology: str) -> tuple[int, ...]:
    """``"4x4x8"`` -> ``(4, 4, 8)``. The schema's pattern has already checked the form. (Here,
    not in ``spec``, so that reading slices does not import pydantic.)"""
    return tuple(int(n) for n in topology.split("x"))


class ChipDerived:
    """Mixin: needs ``vmem_mib_per_core``, ``smem_kib_per_core``, ``hbm_gib`` and
    ``jax_devices_per_chip`` on the class it is mixed into."""

    __slots__ = ()

    @property
    def vmem_bytes_per_core(self) -> int:
        return int(self.vmem_mib_per_core * 1024 * 1024)

    @property
    def smem_bytes_per_core(self) -> int:
        return self.smem_kib_per_core * 1024

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * 1024**3)

    @property
    def hbm_bytes_per_jax_device(self) -> int:
        return self.hbm_bytes // self.jax_devices_per_chip
