"""Evidence from PCI devices in sysfs (vendor 0x1ae0, Google), cross-checked with /dev nodes.

Reading a few small files costs microseconds and touches no TPU runtime. The root is
configurable (``context.sysfs_root``) so tests can point it at a fake tree.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from tpu_registry.catalog import pci_key
from tpu_registry.files import FileRefused, read_capped
from tpu_registry.types import DetectContext, Evidence

GOOGLE_VENDOR = 0x1AE0


def _hex(path: Path) -> int | None:
    """A sysfs attribute (``0x1ae0``): a small regular file; anything else (a FIFO in a fake
    tree, garbage) is no evidence."""
    try:
        return int(read_capped(path, 4096).decode("ascii").strip(), 16)
    except (FileRefused, UnicodeDecodeError, ValueError):
        return None


def scan_pci(root: Path) -> Counter:
    """Count Google PCI functions by (device, subsystem_device)."""
    found: Counter = Counter()
    devices = root / "sys" / "bus" / "pci" / "devices"
    try:
        entries = sorted(devices.iterdir())
    except OSError:
        return found
    for dev in entries:
        if _hex(dev / "vendor") != GOOGLE_VENDOR:
            continue
        device = _hex(dev / "device")
        if device is None:
            continue
        found[(device, _hex(dev / "subsystem_device"))] += 1
    return found


def count_device_nodes(root: Path) -> int:
    """``/dev/accel<N>`` and ``/dev/vfio/<N>`` nodes (names listed, not globbed: glob compiles
    a pattern in every process that detects)."""
    accel = [n for n in _names(root / "dev") if n.startswith("accel") and n[5:].isdigit()]
    vfio = [n for n in _names(root / "dev" / "vfio") if n.isdigit()]
    return len(accel) + len(vfio)


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:  # absent or unreadable: nothing there to count
        return []


def tpu_registry_detect(context: DetectContext) -> list[Evidence]:
    root = context.sysfs_root
    pci = scan_pci(root)
    nodes = count_device_nodes(root)
    where = root / "sys" / "bus" / "pci" / "devices"
    out = []
    for (device, subsystem), count in sorted(pci.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        # The subsystem id only matters where the catalog uses it (v2 vs v3); keep it always,
        # the catalog falls back to vendor:device when no generation lists the subsystem.
        key = pci_key(GOOGLE_VENDOR, device, subsystem)
        note = ""
        if nodes and nodes != count and len(pci) == 1:
            note = f"/dev has {nodes} accelerator nodes, PCI has {count} devices"
        out.append(Evidence("pci", key, f"sysfs {where}", count=count, note=note))
    if not pci and nodes:
        out.append(
            Evidence(
                "topology",
                f"{nodes} device nodes",
                f"{root / 'dev'}",
                count=nodes,
                note="accelerator device nodes without Google PCI devices",
            )
        )
    return out
