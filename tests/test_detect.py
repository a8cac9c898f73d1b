"""Detection: real identifier strings, fake sysfs trees, reconciliation, the CLI, plugins."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import HARDWARE, REPO, disable_plugins, make_sysfs, run_cli

import tpu_registry
from tpu_registry.catalog import load_catalog
from tpu_registry.detection import Evidence, detect, reconcile
from tpu_registry.errors import DetectionError, RegistryError
from tpu_registry.plugins import get_plugin_manager, reset
from tpu_registry.tomlfile import tomllib

GOOGLE = 0x1AE0

# (kind, value, count, count_unit) -> (generation, chips per host, slice chips). Strings from
# tpu_specs.md section 4 (JAX device_kind, Cloud accelerator types, GKE labels, PCI ids).
IDENTIFIERS = [
    ("device_kind", "TPU v2", 8, "devices", "v2", 4, None),
    ("device_kind", "TPU v3", 8, "devices", "v3", 4, None),
    ("device_kind", "TPU v4", 4, "devices", "v4", 4, None),
    ("device_kind", "TPU v5 lite", 8, "devices", "v5e", 8, None),
    ("device_kind", "TPU v5e", 4, "devices", "v5e", 4, None),
    ("device_kind", "TPU v5", 4, "devices", "v5p", 4, None),
    ("device_kind", "TPU v5p", 4, "devices", "v5p", 4, None),
    ("device_kind", "TPU v6 lite", 8, "devices", "v6e", 8, None),
    ("device_kind", "TPU v6e", 1, "devices", "v6e", 1, None),
    ("device_kind", "TPU7x", 8, "devices", "tpu7x", 4, None),
    ("device_kind", "TPU8t", None, "devices", "tpu8t", None, None),
    ("device_kind", "TPU8i", None, "devices", "tpu8i", None, None),
    # Multi-host v5e/v6e slices run on 4-chip VMs (ct5lp-hightpu-4t, ct6e-standard-4t), not the
    # 8-chip physical host: chips per host comes from the slice data (hardware/*.toml [slices]).
    ("accelerator_type", "v2-8", 8, "suffix", "v2", 4, 4),
    ("accelerator_type", "v2-512", 512, "suffix", "v2", 4, 256),
    ("accelerator_type", "v3-8", 8, "suffix", "v3", 4, 4),
    ("accelerator_type", "v3-2048", 2048, "suffix", "v3", 4, 1024),
    ("accelerator_type", "v4-8", 8, "suffix", "v4", 4, 4),
    ("accelerator_type", "v4-16", 16, "suffix", "v4", 4, 8),
    ("accelerator_type", "v5litepod-1", 1, "suffix", "v5e", 1, 1),
    ("accelerator_type", "v5litepod-4", 4, "suffix", "v5e", 4, 4),
    ("accelerator_type", "v5litepod-16", 16, "suffix", "v5e", 4, 16),
    ("accelerator_type", "v5litepod-256", 256, "suffix", "v5e", 4, 256),
    ("accelerator_type", "v5p-8", 8, "suffix", "v5p", 4, 4),
    ("accelerator_type", "v5p-128", 128, "suffix", "v5p", 4, 64),
    ("accelerator_type", "v6e-1", 1, "suffix", "v6e", 1, 1),
    ("accelerator_type", "v6e-8", 8, "suffix", "v6e", 8, 8),
    ("accelerator_type", "v6e-256", 256, "suffix", "v6e", 4, 256),
    ("accelerator_type", "tpu7x-2", 2, "suffix", "tpu7x", 1, 1),
    ("accelerator_type", "tpu7x-8", 8, "suffix", "tpu7x", 4, 4),
    ("accelerator_type", "tpu7x-18432", 18432, "suffix", "tpu7x", 4, 9216),
    ("gke_accelerator", "tpu-v3-device", None, "chips", "v3", None, None),
    ("gke_accelerator", "tpu-v3-slice", None, "chips", "v3", None, None),
    ("gke_accelerator", "tpu-v4-podslice", None, "chips", "v4", None, None),
    ("gke_accelerator", "tpu-v5-lite-podslice", None, "chips", "v5e", None, None),
    ("gke_accelerator", "tpu-v5-lite-device", None, "chips", "v5e", None, None),
    ("gke_accelerator", "tpu-v5p-slice", None, "chips", "v5p", None, None),
    ("gke_accelerator", "tpu-v6e-slice", None, "chips", "v6e", None, None),
    ("gke_accelerator", "tpu7x", None, "chips", "tpu7x", None, None),
    ("pci", "1ae0:0027/004e", 4, "chips", "v2", 4, None),
    ("pci", "1ae0:0027/004f", 4, "chips", "v3", 4, None),
    ("pci", "1ae0:005e", 4, "chips", "v4", 4, None),
    ("pci", "1ae0:0062", 4, "chips", "v5p", 4, None),
    ("pci", "1ae0:0063", 8, "chips", "v5e", 8, None),
    ("pci", "1ae0:006f", 8, "chips", "v6e", 8, None),
    ("pci", "1ae0:0076", 4, "chips", "tpu7x", 4, None),
    ("pci", "1ae0:007c", 1, "chips", "tpu8t", 1, None),
    ("pci", "1ae0:0083", 1, "chips", "tpu8i", 1, None),
    ("torch_xla_version", "6", None, "chips", "v6e", None, None),
    ("torch_xla_version", "7", None, "chips", "tpu7x", None, None),
]


@pytest.mark.parametrize(
    ("kind", "value", "count", "unit", "gid", "host", "slice_"),
    IDENTIFIERS,
    ids=[f"{k}:{v}" for k, v, *_ in IDENTIFIERS],
)
def test_real_identifier_strings(kind, value, count, unit, gid, host, slice_):
    scope = "slice" if kind == "accelerator_type" else "host"
    d = reconcile(
        load_catalog(), [Evidence(kind, value, "test", count=count, count_unit=unit, scope=scope)]
    )
    assert (d.generation, d.chips_per_host, d.slice_chips) == (gid, host, slice_)
    assert d.status == "detected"


def test_identifier_cases_cover_every_identifier_in_the_hardware_files():
    """Every device kind, accelerator-type prefix, GKE label and PCI device id the generation
    files list (read here as plain TOML) has a case above naming that generation."""
    listed, covered = set(), set()
    for path in sorted(HARDWARE.glob("*.toml")):
        doc = tomllib.loads(path.read_text())
        gid, ident = doc["id"], doc["identify"]
        listed |= {("device_kind", dk, gid) for dk in ident.get("device_kinds", [])}
        listed |= {("gke_accelerator", g, gid) for g in ident.get("gke_accelerators", [])}
        for a in ident.get("accelerator_types", []):
            listed.add(("accelerator_type", a["prefix"], gid))
        listed |= {("pci", p["device"], gid) for p in ident.get("pci", [])}
    for kind, value, _count, _unit, gid, *_ in IDENTIFIERS:
        if kind == "accelerator_type":
            value = value.rsplit("-", 1)[0]
        elif kind == "pci":
            value = int(value.split(":")[1].split("/")[0], 16)
        covered.add((kind, value, gid))
    assert listed - covered == set()
    assert len(listed) >= 30


def _ev(kind, value):
    return Evidence(kind, value, kind)  # the source names the kind, for readable messages


def _outranked(winner, loser, loser_cands):
    return (
        f"{loser.source} says {loser.value!r} ({loser_cands}) but {winner.source} "
        f"({winner.kind}) says {{gid}}; {loser.kind} is trusted less"
    )


PCI_V6E = _ev("pci", "1ae0:006f")
DK_V6E, DK_V5E = _ev("device_kind", "TPU v6 lite"), _ev("device_kind", "TPU v5 lite")
AT_V5E, AT_V6E = _ev("accelerator_type", "v5litepod-8"), _ev("accelerator_type", "v6e-8")
GKE_V5P = _ev("gke_accelerator", "tpu-v5p-slice")
TX_V4, TX_V5 = _ev("torch_xla_version", "4"), _ev("torch_xla_version", "5")
GN_V3 = _ev("generation_number", "3")
# Each trust level against the next one down, disagreeing: the more trusted decides, the
# other is a conflict it outranks (breaks if two levels of PRIORITY swap or tie).
LEVEL_PAIRS = [
    (PCI_V6E, "v6e", DK_V5E, "v5e"),
    (DK_V6E, "v6e", AT_V5E, "v5e"),
    (AT_V5E, "v5e", GKE_V5P, "v5p"),
    (GKE_V5P, "v5p", TX_V4, "v4"),
    (TX_V4, "v4", GN_V3, "v3"),
]


@pytest.mark.parametrize(
    ("winner", "gid", "loser", "loser_gid"),
    LEVEL_PAIRS,
    ids=[f"{w.kind}>{x.kind}" for w, _, x, _ in LEVEL_PAIRS],
)
def test_reconcile_more_trusted_level_wins(winner, gid, loser, loser_gid):
    for evidence in ([winner, loser], [loser, winner]):
        d = reconcile(load_catalog(), evidence)
        assert (d.generation, d.status, d.candidates) == (gid, "detected", (gid,))
        assert d.reason == (
            f"{winner.kind} {winner.value!r} from {winner.source} "
            "(conflicting evidence was outranked)"
        )
        assert [(f.evidence, f.status) for f in d.findings] == [
            (winner, "decides"),
            (loser, "conflict"),
        ]
        assert d.conflicts == (_outranked(winner, loser, loser_gid).format(gid=gid),)


def test_reconcile_rules_one_case_each():
    cat = load_catalog()

    def result(evidence):
        d = reconcile(cat, evidence)
        return (
            d.generation,
            d.status,
            d.reason,
            d.candidates,
            [(f.evidence, f.status) for f in d.findings],
            d.conflicts,
        )

    # Equally trusted pieces that disagree, nothing more trusted: no winner.
    assert result([AT_V6E, AT_V5E]) == (
        None,
        "conflict",
        "evidence disagrees and nothing more trusted settles it",
        (),
        [(AT_V5E, "conflict"), (AT_V6E, "conflict")],
        (
            "accelerator_type says 'v5litepod-8' (v5e); accelerator_type says 'v6e-8' (v6e)"
            " — equally trusted, no winner",
        ),
    )
    # The same disagreement under more trusted evidence: the piece that fits it agrees.
    assert result([AT_V6E, PCI_V6E, AT_V5E]) == (
        "v6e",
        "detected",
        "pci '1ae0:006f' from pci (conflicting evidence was outranked)",
        ("v6e",),
        [(PCI_V6E, "decides"), (AT_V5E, "conflict"), (AT_V6E, "agrees")],
        (_outranked(PCI_V6E, AT_V5E, "v5e").format(gid="v6e"),),
    )
    # Levels narrow by intersection: '5' names two generations, the GKE label one of them.
    assert result([TX_V5, GKE_V5P]) == (
        "v5p",
        "detected",
        "gke_accelerator 'tpu-v5p-slice' from gke_accelerator",
        ("v5p",),
        [(GKE_V5P, "decides"), (TX_V5, "agrees")],
        (),
    )
    # Alone, it stays ambiguous.
    assert result([TX_V5]) == (
        None,
        "ambiguous",
        "evidence fits 2 generations: v5e, v5p",
        ("v5e", "v5p"),
        [(TX_V5, "agrees")],
        (),
    )
    # Unknown identifiers decide nothing; topology is information only.
    unknown, topo = _ev("device_kind", "TPU v99"), _ev("topology", "2x2")
    got = result([unknown, topo])
    assert got[2] == (
        "no evidence named a known generation "
        "(not recognised: device_kind 'TPU v99' from device_kind)"
    )
    assert got[:2] + got[3:] == (
        None,
        "none",
        (),
        [(unknown, "unknown"), (topo, "info")],
        (),
    )
    assert result([topo])[:2] == (None, "none")
    assert result([unknown, DK_V6E])[:2] == ("v6e", "detected")
    # An explicit choice wins outright over the most trusted hardware evidence.
    explicit = Evidence("explicit", "v5e", "env")
    assert result([PCI_V6E, explicit, AT_V5E]) == (
        "v5e",
        "explicit",
        "explicit override via env",
        ("v5e",),
        [(explicit, "decides"), (PCI_V6E, "overridden"), (AT_V5E, "agrees")],
        ("pci says '1ae0:006f' (v6e) but env overrides it with v5e",),
    )
    # Two explicit choices that disagree are an error, never a pick.
    with pytest.raises(DetectionError, match="explicit overrides disagree: env=v5e, cli=v6e"):
        reconcile(cat, [explicit, Evidence("explicit", "v6e", "cli")])


@pytest.mark.parametrize(
    ("accel", "gid", "slice_chips", "host_chips"),
    [
        ("v5litepod-16", "v5e", 16, 4),  # 4 VMs of ct5lp-hightpu-4t
        ("v5p-128", "v5p", 64, 4),
        ("tpu7x-8", "tpu7x", 4, 4),
        ("v4-16", "v4", 8, 4),
    ],
)
def test_env_accelerator_type_suffix_arithmetic(accel, gid, slice_chips, host_chips):
    d = detect(env={"TPU_ACCELERATOR_TYPE": accel}, sysfs_root="/nonexistent")
    assert (d.generation, d.slice_chips, d.chips_per_host) == (gid, slice_chips, host_chips)
    assert d.findings[0].evidence.detector == "env"


def test_gke_host_bounds_give_chips_per_host():
    d = detect(
        env={
            "TPU_ACCELERATOR_TYPE": "v6e-16",
            "TPU_TOPOLOGY": "4x4",
            "TPU_CHIPS_PER_HOST_BOUNDS": "2,4,1",
        },
        sysfs_root="/nonexistent",
    )
    assert (d.generation, d.chips_per_host, d.slice_chips, d.topology) == ("v6e", 8, 16, "4x4")


def test_fake_sysfs_v5e_host_with_8_chips(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x0063, None)] * 8, [f"vfio/{i}" for i in range(8)])
    d = detect(env={}, sysfs_root=root)
    assert (d.generation, d.chips_per_host, d.status) == ("v5e", 8, "detected")
    assert d.findings[0].evidence.value == "1ae0:0063"
    assert d.findings[0].evidence.detector == "sysfs"


def test_fake_sysfs_v5p_host_with_4_chips(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x0062, 0x0000)] * 4, [f"vfio/{i}" for i in range(4)])
    d = detect(env={}, sysfs_root=root)
    assert (d.generation, d.chips_per_host) == ("v5p", 4)


def test_fake_sysfs_v4_host(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x005E, None)] * 4, [f"accel{i}" for i in range(4)])
    d = detect(env={}, sysfs_root=root)
    assert (d.generation, d.chips_per_host) == ("v4", 4)


def test_device_nodes_are_counted_by_name(tmp_path):
    """accel<N> under /dev and <N> under /dev/vfio; other names are not chips."""
    from tpu_registry.detectors.sysfs import count_device_nodes

    nodes = ["accel0", "accel12", "accel", "accelX", "accel1a", "vfio/vfio", "vfio/3", "vfio/7"]
    assert count_device_nodes(make_sysfs(tmp_path, [], nodes)) == 4
    assert count_device_nodes(tmp_path / "absent") == 0
    only_vfio = make_sysfs(tmp_path / "v", [], ["vfio/0"])
    assert count_device_nodes(only_vfio) == 1


def test_fake_sysfs_v2_and_v3_told_apart_by_subsystem(tmp_path):
    v2 = detect(env={}, sysfs_root=make_sysfs(tmp_path / "a", [(GOOGLE, 0x0027, 0x004E)] * 4))
    v3 = detect(env={}, sysfs_root=make_sysfs(tmp_path / "b", [(GOOGLE, 0x0027, 0x004F)] * 4))
    assert (v2.generation, v3.generation) == ("v2", "v3")


def test_fake_sysfs_mixed_and_garbled_tree(tmp_path):
    root = make_sysfs(
        tmp_path, [(0x8086, 0x1234, None), (GOOGLE, 0x0042, None), (GOOGLE, 0x006F, None)]
    )
    base = root / "sys" / "bus" / "pci" / "devices"
    junk = base / "0000:00:1f.0"
    junk.mkdir()
    (junk / "vendor").write_text("not hex\n")
    half = base / "0000:00:1e.0"
    half.mkdir()
    (half / "vendor").write_text("0x1ae0\n")  # no device file
    (base / "stray-file").write_text("x")
    d = detect(env={}, sysfs_root=root)
    assert d.generation == "v6e" and d.chips_per_host == 1
    statuses = {f.evidence.value: f.status for f in d.findings}
    assert statuses == {"1ae0:0042": "unknown", "1ae0:006f": "decides"}
    assert not d.faults


def test_device_nodes_disagreeing_with_pci_are_noted(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x006F, None)] * 4, [f"vfio/{i}" for i in range(8)])
    d = detect(env={}, sysfs_root=root)
    assert d.findings[0].evidence.note == "/dev has 8 accelerator nodes, PCI has 4 devices"


def test_conflict_pci_v6e_against_env_v5e(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x006F, None)] * 8)
    d = detect(env={"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, sysfs_root=root)
    assert d.generation == "v6e" and d.status == "detected"
    assert d.chips_per_host == 8
    assert [f.status for f in d.findings] == ["decides", "conflict"]
    assert d.conflicts == (
        f"env TPU_ACCELERATOR_TYPE says 'v5litepod-8' (v5e) but sysfs {root}/sys/bus/pci/devices "
        "(pci) says v6e; accelerator_type is trusted less",
    )
    assert d.reason.endswith("(conflicting evidence was outranked)")


def test_torch_xla_5_alone_is_ambiguous_and_pci_resolves_it():
    cat = load_catalog()
    five = Evidence("torch_xla_version", "5", "torch_xla._internal.tpu.version()")
    d = reconcile(cat, [five])
    assert d.generation is None and d.status == "ambiguous"
    assert d.candidates == ("v5e", "v5p")
    d = reconcile(cat, [five, Evidence("pci", "1ae0:0062", "sysfs", count=4)])
    assert (d.generation, d.chips_per_host) == ("v5p", 4)
    d = reconcile(cat, [Evidence("pci", "1ae0:0063", "sysfs", count=8), five])
    assert d.generation == "v5e"


def test_torch_xla_bare_tpu_type_is_no_slice_conflict():
    """torch_xla's get_tpu_type() names the generation only ('v6e'): beside the environment's
    v6e-8 it agrees, and names no slice to disagree with (found by the legacy suite)."""
    cat = load_catalog()
    bare = Evidence("accelerator_type", "v6e", "torch_xla._internal.tpu.get_tpu_type()")
    env = Evidence(
        "accelerator_type", "v6e-8", "env TPU_ACCELERATOR_TYPE", count=8, count_unit="suffix"
    )
    d = reconcile(cat, [bare, env])
    assert (d.generation, d.status, d.conflicts) == ("v6e", "detected", ())
    assert d.slice is not None and d.slice.chips == 8


def test_seed_tpu_version_variable_is_accepted_with_a_note():
    d = detect(env={"TPU_VERSION": "5"}, sysfs_root="/nonexistent")
    assert d.status == "ambiguous" and d.candidates == ("v5e", "v5p")
    assert "5 means v5e or v5p" in d.findings[0].evidence.note
    assert detect(env={"TPU_VERSION": "6"}, sysfs_root="/nonexistent").generation == "v6e"


def test_same_level_disagreement_has_no_winner():
    d = reconcile(
        load_catalog(),
        [
            Evidence("accelerator_type", "v5p-8", "env"),
            Evidence("accelerator_type", "v6e-8", "metadata"),
        ],
    )
    assert d.generation is None and d.status == "conflict"
    assert "equally trusted, no winner" in d.conflicts[0]


def test_explicit_override_wins_and_says_so(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x006F, None)] * 8)
    d = detect(env={"TPU_REGISTRY_GENERATION": "TPU v5 lite"}, sysfs_root=root)
    assert (d.generation, d.status) == ("v5e", "explicit")
    assert d.reason == "explicit override via env TPU_REGISTRY_GENERATION"
    assert "overrides it with v5e" in d.conflicts[0]


def test_explicit_override_naming_nothing_is_an_error():
    with pytest.raises(DetectionError) as e:
        detect(env={"TPU_REGISTRY_GENERATION": "v99"}, sysfs_root="/nonexistent")
    assert str(e.value) == (
        "env TPU_REGISTRY_GENERATION: explicit generation 'v99' names no generation "
        "(use an id from `tpu-registry list`)"
    )


def test_no_tpu_is_a_normal_result():
    d = detect(env={}, sysfs_root="/nonexistent")
    assert (d.generation, d.status, d.reason) == (None, "none", "no TPU evidence found")


def test_cli_detect_without_tpu_says_so_and_exits_0():
    r = run_cli("detect")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == "No TPU found (no TPU evidence found)."
    assert run_cli("detect", "--require").returncode == 3


def test_cli_detect_simulate_is_shown_as_simulated():
    r = run_cli("detect", "--simulate", "v6e", "--json")
    d = json.loads(r.stdout)
    assert (d["generation"], d["status"]) == ("v6e", "simulated")
    assert d["evidence"][0]["detector"] == "simulate"
    text = run_cli("detect", "--simulate", "v6e").stdout
    assert text.startswith("TPU: v6e (simulated: simulated via --simulate)")


def test_cli_detect_table_lists_evidence(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x0063, None)] * 8)
    r = run_cli(
        "detect", env={"TPU_REGISTRY_SYSFS_ROOT": str(root), "TPU_ACCELERATOR_TYPE": "v5litepod-8"}
    )
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("TPU: v5e (detected: pci '1ae0:0063'")
    assert lines[1] == "chips per host: 8   slice chips: 8   topology: 2x4"
    assert lines[2] == "slice: v5litepod-8, 1 VM of ct5lp-hightpu-8t (8 chips each)"
    assert lines[4].split() == ["detector", "kind", "value", "candidates", "status", "source"]
    assert lines[6].split()[:5] == ["sysfs", "pci", "1ae0:0063", "v5e", "decides"]
    assert lines[7].split()[:5] == ["env", "accelerator_type", "v5litepod-8", "v5e", "agrees"]


# ---------------------------------------------------------------------------------------------
# Non-invasiveness: detection must not initialise a runtime it did not find initialised.
# ---------------------------------------------------------------------------------------------

NON_INVASIVE = """
import sys, jax
from jax._src import xla_bridge as xb
from tpu_registry.detection import detect
before = dict(xb._backends)
d = detect(env={}, sysfs_root="/nonexistent")
print(len(before), len(xb._backends), d.generation, d.status, [f.plugin for f in d.faults])
"""

INITIALISED = """
import jax
jax.devices()  # the host process initialised JAX (on CPU here)
from tpu_registry.detection import detect
d = detect(env={}, sysfs_root="/nonexistent")
print(d.generation, d.status, len(d.findings), len(d.faults))
"""


@pytest.mark.needs_jax
def test_detect_does_not_initialise_jax():
    out = subprocess.run(
        [sys.executable, "-c", NON_INVASIVE],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "None", "none", "[]"]


@pytest.mark.needs_jax
def test_jax_on_cpu_gives_no_evidence_and_no_error():
    out = subprocess.run(
        [sys.executable, "-c", INITIALISED],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "none", "0", "0"]


# ---------------------------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------------------------


def test_builtin_plugins_are_ordinary_registered_modules():
    pm = get_plugin_manager()
    for name in (
        "tpu_registry.detectors.env",
        "tpu_registry.detectors.sysfs",
        "tpu_registry.detectors.jax",
        "tpu_registry.detectors.torch_xla",
        "tpu_registry.policies.baseline",
        "tpu_registry.policies.tables",
        "tpu_registry.policies.overrides",
    ):
        assert pm.has_plugin(name)
        assert isinstance(pm.get_plugin(name), types.ModuleType)


def test_disable_plugins_by_name(monkeypatch, tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x006F, None)])
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", disable_plugins("sysfs"))
    assert detect(env={}, sysfs_root=root).generation is None
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", disable_plugins())
    assert detect(env={}, sysfs_root=root).generation == "v6e"


def test_autoload_off_skips_entry_points(monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_PLUGINS_AUTOLOAD", "0")
    names = {n for n, _ in get_plugin_manager().list_name_plugin()}
    assert all(n.startswith("tpu_registry.") for n in names)
    r = run_cli("plugins", "--json", env={"TPU_REGISTRY_PLUGINS_AUTOLOAD": "0"})
    assert {p["kind"] for p in json.loads(r.stdout)["plugins"]} == {"built-in"}


def test_misspelled_hook_is_caught(monkeypatch):
    bad = types.ModuleType("bad_plugin")

    @tpu_registry.hookimpl
    def tpu_registry_detekt(context):  # noqa: ARG001 - the typo is the point
        return None

    bad.tpu_registry_detekt = tpu_registry_detekt
    pm = get_plugin_manager()
    pm.register(bad, name="bad_plugin")
    try:
        with pytest.raises(Exception, match="tpu_registry_detekt"):
            pm.check_pending()
    finally:
        pm.unregister(name="bad_plugin")
        reset()


def test_check_pending_runs_when_the_manager_is_built(monkeypatch):
    import tpu_registry.plugins as plugins

    bad = types.ModuleType("tpu_registry.bad")
    bad.tpu_registry_detekt = tpu_registry.hookimpl(lambda context: None)
    monkeypatch.setitem(sys.modules, "tpu_registry.bad", bad)
    monkeypatch.setattr(plugins, "BUILTIN_PLUGINS", (*plugins.BUILTIN_PLUGINS, "tpu_registry.bad"))
    reset()
    with pytest.raises(RegistryError, match="unknown hook 'tpu_registry_detekt'"):
        get_plugin_manager()
    monkeypatch.undo()
    reset()


def test_hardware_dirs_hook_adds_catalog_folders(tmp_path):
    text = (REPO / "hardware" / "v6e.toml").read_text()
    for old, new in [
        ('id = "v6e"', 'id = "site6"'),
        ('aliases = ["trillium", "v6 lite", "tpu-v6e", "v6"]', "aliases = []"),
        ('device_kinds = ["TPU v6 lite", "TPU v6e"]', "device_kinds = []"),
        ('gke_accelerators = ["tpu-v6e-slice"]', "gke_accelerators = []"),
        (
            'accelerator_types = [{ prefix = "v6e", suffix_counts = "chips" }]',
            "accelerator_types = []",
        ),
        ("pci = [{ vendor = 0x1ae0, device = 0x006f }]", "pci = []"),
    ]:
        text = text.replace(old, new)
    # Its slices would repeat v6e's machine types, and name no accelerator type: drop them.
    text = re.sub(r"\n\[slices\].*?(?=\n\[\[sources\]\])", "", text, flags=re.S)
    (tmp_path / "site6.toml").write_text(text)
    plugin = types.ModuleType("dirs_plugin")
    plugin.tpu_registry_hardware_dirs = tpu_registry.hookimpl(lambda: [tmp_path])
    pm = get_plugin_manager()
    pm.register(plugin, name="dirs_plugin")
    try:
        assert "site6" in load_catalog().ids()
    finally:
        pm.unregister(name="dirs_plugin")


@pytest.mark.parametrize("value", ["nan", "-1", "0", "soon"])
def test_detect_timeout_must_be_a_positive_number(value):
    with pytest.raises(DetectionError) as e:
        detect(env={"TPU_REGISTRY_DETECT_TIMEOUT": value}, sysfs_root="/nonexistent")
    assert str(e.value) == (
        f"TPU_REGISTRY_DETECT_TIMEOUT={value!r} is not a number of seconds in (0, 600] "
        "(the default is 2)"
    )


def test_detect_timeout_bounds_and_default():
    """600 s is the most a detector may be given, inclusive; passed as an argument, the figure
    is named as given; unset, the default budget applies."""
    d = detect(env={"TPU_REGISTRY_DETECT_TIMEOUT": "600"}, sysfs_root="/nonexistent")
    assert (d.status, d.generation) == ("none", None)
    with pytest.raises(DetectionError) as e:
        detect(env={}, sysfs_root="/nonexistent", timeout_s=600.5)
    assert str(e.value) == (
        "TPU_REGISTRY_DETECT_TIMEOUT=600.5 is not a number of seconds in (0, 600] "
        "(the default is 2)"
    )
    assert detect(env={}, sysfs_root="/nonexistent").status == "none"


def test_simulate_is_explicit_evidence_that_says_so():
    d = detect(simulate="v5e", env={}, sysfs_root="/nonexistent")
    (f,) = d.findings
    assert (f.evidence.kind, f.evidence.value, f.evidence.source, f.evidence.detector) == (
        "explicit",
        "v5e",
        "--simulate",
        "simulate",
    )
    assert f.evidence.note == "simulated: no hardware was consulted for the choice"
    assert (d.generation, d.status, d.reason) == ("v5e", "simulated", "simulated via --simulate")


def test_sysfs_root_comes_from_the_environment(tmp_path):
    root = make_sysfs(tmp_path, [(GOOGLE, 0x006F, None)] * 8)
    d = detect(env={"TPU_REGISTRY_SYSFS_ROOT": str(root)})
    assert (d.generation, d.chips_per_host) == ("v6e", 8)


def test_counts_are_whole_chips_from_agreeing_evidence_of_their_scope():
    """Chip counts come from evidence that decides or agrees, host counts from host-scoped
    evidence and slice counts from slice-scoped evidence only, in whole chips."""
    cat = load_catalog()
    pci = Evidence("pci", "1ae0:006f", "sysfs", count=8, scope="host")
    dk = Evidence("device_kind", "TPU v6 lite", "jax", count=4, count_unit="devices", scope="host")
    at = Evidence("accelerator_type", "v6e-16", "env", count=16, count_unit="suffix", scope="slice")
    d = reconcile(cat, [pci, dk])
    assert (d.chips_per_host, d.slice_chips) == (8, None)
    d = reconcile(cat, [pci, at])
    assert (d.chips_per_host, d.slice_chips) == (8, 16)
    assert [f.status for f in d.findings] == ["decides", "agrees"]
    v3 = Evidence("device_kind", "TPU v3", "jax", count=8, count_unit="devices", scope="host")
    d = reconcile(cat, [v3])  # two devices per v3 chip
    assert d.chips_per_host == 4 and type(d.chips_per_host) is int


def test_version_numbers_are_read_without_surrounding_space():
    cat = load_catalog()
    for kind in ("torch_xla_version", "generation_number"):
        d = reconcile(cat, [Evidence(kind, " 6\n", "env")])
        assert (d.generation, d.status) == ("v6e", "detected"), kind


def test_explicit_override_details():
    """Two explicit choices: the error names both and the fix. Under an explicit choice,
    evidence naming several generations is overridden with all of them named, and evidence
    naming none is unknown. The most trusted piece's topology wins."""
    cat = load_catalog()
    with pytest.raises(DetectionError) as e:
        reconcile(cat, [Evidence("explicit", "v5e", "env"), Evidence("explicit", "v6e", "cli")])
    assert str(e.value) == "detection: explicit overrides disagree: env=v5e, cli=v6e (set only one)"
    five, v99 = Evidence("torch_xla_version", "5", "tx"), Evidence("device_kind", "TPU v99", "jax")
    d = reconcile(cat, [Evidence("explicit", "v6e", "env"), five, v99])
    assert d.conflicts == ("tx says '5' (v5e, v5p) but env overrides it with v6e",)
    assert {f.evidence.kind: f.status for f in d.findings} == {
        "explicit": "decides",
        "device_kind": "unknown",
        "torch_xla_version": "overridden",
    }
    pci = Evidence("pci", "1ae0:006f", "sysfs", topology="2x4")
    at = Evidence("accelerator_type", "v6e-8", "env", topology="4x2")
    assert reconcile(cat, [at, pci]).topology == "2x4"


def test_evidence_below_an_undecided_level_is_undecided():
    cat = load_catalog()
    tx, gn = Evidence("torch_xla_version", "6", "tx"), Evidence("generation_number", "6", "gn")
    d = reconcile(cat, [AT_V6E, AT_V5E, tx, gn])
    assert (d.generation, d.status) == (None, "conflict")
    statuses = {f.evidence: f.status for f in d.findings}
    assert (statuses[tx], statuses[gn]) == ("undecided", "undecided")


def test_runtime_detectors_take_a_thread_only_when_they_may_ask_their_runtime(tmp_path):
    """jax and torch_xla detectors return at once unless their runtime is imported (or init is
    allowed): then they run inline. Threads are watched with threading.settrace, which runs
    in every thread the threading module starts."""
    import threading

    started: list[str] = []

    def tracer(frame, event, arg):
        started.append(threading.current_thread().name)
        return None  # no line tracing: the name of each new thread is all this records

    root = make_sysfs(tmp_path, [(0x1AE0, 0x0063, None)] * 4)  # a v5e host, found inline
    threading.settrace(tracer)
    try:
        d = detect(env={}, sysfs_root=root)
    finally:
        threading.settrace(None)
    assert d.generation == "v5e"
    threaded = {n.removeprefix("tpu-registry-detect-") for n in started}
    for runtime in ("jax", "torch_xla"):
        name = f"tpu_registry.detectors.{runtime}"
        assert (name in threaded) == (runtime in sys.modules), (runtime, threaded)
    assert not threaded & {"tpu_registry.detectors.env", "tpu_registry.detectors.sysfs"}
    # A third-party detector keeps its thread and the time budget (the GCE plugin, installed).
    assert "gce" in threaded


def test_detectors_see_the_context_detect_was_asked_for(tmp_path):
    """A detector reads what ``detect`` was given: the environment, the sysfs root, whether it
    may start a TPU runtime (off unless asked) and its time budget; detection's own time is
    measured around the whole call."""
    import time

    seen = []

    class Recorder:
        @tpu_registry.hookimpl
        def tpu_registry_detect(self, context):
            seen.append(context)

    get_plugin_manager().register(Recorder(), name="recorder")
    try:
        t0 = time.perf_counter()
        d = detect(env={"X": "1"}, sysfs_root=tmp_path, timeout_s=1.5)
        wall_ms = (time.perf_counter() - t0) * 1000
        detect(env={}, sysfs_root=tmp_path, allow_runtime_init=True)
        detect(env={})  # the machine's own /sys: only the context is checked
    finally:
        get_plugin_manager().unregister(name="recorder")
    first, second, third = seen
    assert third.sysfs_root == Path("/")
    assert (first.env, first.sysfs_root, first.allow_runtime_init, first.timeout_s) == (
        {"X": "1"},
        tmp_path,
        False,
        1.5,
    )
    assert (second.allow_runtime_init, second.timeout_s) == (True, 2.0)
    assert 0 < d.elapsed_ms <= wall_ms


def test_detection_time_is_in_milliseconds(monkeypatch):
    """``elapsed_ms`` is the clock's seconds around the whole call, times 1000 (a fake clock
    that advances 0.25 s between detect's two readings)."""
    import tpu_registry.detection as detection

    readings = iter([100.0, 100.25])
    clock = types.SimpleNamespace(perf_counter=lambda: next(readings))
    monkeypatch.setattr(detection, "time", clock)
    assert detect(env={}, sysfs_root="/nonexistent").elapsed_ms == 250.0


def test_conflicts_name_every_candidate_of_each_piece():
    """torch_xla says 5 for both v5e and v5p: a conflict names both, in each of the three
    wordings (equally trusted, outranked, and outranked by evidence that left two)."""
    cat = load_catalog()
    tx5, tx6 = Evidence("torch_xla_version", "5", "tx"), Evidence("torch_xla_version", "6", "tx6")
    gn6, pci = Evidence("generation_number", "6", "gn"), Evidence("pci", "1ae0:006f", "sysfs")
    d = reconcile(cat, [tx5, tx6, gn6])
    assert (d.status, d.candidates) == ("conflict", ())
    assert d.conflicts == (
        "tx says '5' (v5e, v5p); tx6 says '6' (v6e) — equally trusted, no winner",
    )
    assert [f.status for f in d.findings] == ["conflict", "conflict", "undecided"]
    d = reconcile(cat, [pci, tx5])
    assert d.conflicts == (
        "tx says '5' (v5e, v5p) but sysfs (pci) says v6e; torch_xla_version is trusted less",
    )
    d = reconcile(cat, [tx5, gn6])
    assert (d.status, d.reason, d.candidates) == (
        "ambiguous",
        "evidence fits 2 generations: v5e, v5p",
        ("v5e", "v5p"),
    )
    assert d.conflicts == (
        "gn says '6' (v6e) but tx (torch_xla_version) says v5e, v5p; generation_number is "
        "trusted less",
    )


def test_a_machine_type_alone_names_its_generation_and_counts_come_from_agreeing_pieces():
    """The GCE metadata's machine type (a path) names v6e by itself; a host count given only by
    a piece that agrees (not the one that decides) is used."""
    cat = load_catalog()
    mt = Evidence("machine_type", "projects/1/machineTypes/ct6e-standard-4t", "gce")
    d = reconcile(cat, [mt])
    assert (d.generation, d.status, d.reason) == (
        "v6e",
        "detected",
        "machine_type 'projects/1/machineTypes/ct6e-standard-4t' from gce",
    )
    pci = Evidence("pci", "1ae0:006f", "sysfs")  # decides, but counts nothing
    dk = Evidence("device_kind", "TPU v6 lite", "jax", count=4, count_unit="devices", scope="host")
    d = reconcile(cat, [pci, dk])
    assert ([f.status for f in d.findings], d.chips_per_host) == (["decides", "agrees"], 4)


def test_a_suffix_that_is_no_count_is_quoted_in_part_and_not_used():
    cat = load_catalog()
    junk = "x" * 21  # one past the 20 quoted
    for value, shown in (
        (f"v6e-{junk}", f"'{'x' * 20}'..."),  # the first 20 characters, and a mark that more follow
        (f"v6e-{'x' * 20}", f"'{'x' * 20}'"),  # exactly 20: nothing left out
    ):
        ev = Evidence("accelerator_type", value, "env", count_unit="suffix", scope="slice")
        d = reconcile(cat, [ev])
        assert (d.generation, d.slice_chips) == ("v6e", None)
        assert d.conflicts == (
            f"env says {value!r}: suffix {shown} is not a count (ASCII digits, at most 9); its "
            "count is not used",
        ), value


@pytest.mark.parametrize(
    "value, chips",
    [
        ("projects/1/machineTypes/ct6e-standard-4t", 4),  # a metadata path: the last part
        ("Projects/1/machineTypes/CT6E-STANDARD-1T ", 1),  # case and space as written
        ("ct6e-standard-8t", 8),
    ],
)
def test_a_machine_type_alone_gives_the_chips_of_its_vm(value, chips):
    """With no accelerator type or topology, the machine type still says how many chips this
    VM has (the catalog's [slices] VM sizes), and names no slice."""
    d = reconcile(load_catalog(), [Evidence("machine_type", value, "gce")])
    assert (d.generation, d.chips_per_host, d.slice, d.conflicts) == ("v6e", chips, None, ())


def test_a_refused_count_leaves_the_next_piece_to_count():
    """A host count above what a host has is refused, and the next piece that counts is
    used: 16 chips is more than a v6e host's 8; the JAX devices say 4."""
    pci = Evidence("pci", "1ae0:006f", "sysfs", count=16)
    dk = Evidence("device_kind", "TPU v6 lite", "jax", count=4, count_unit="devices")
    d = reconcile(load_catalog(), [pci, dk])
    assert (d.generation, d.chips_per_host) == ("v6e", 4)
    assert d.conflicts == (
        "sysfs says '1ae0:006f': 16 chips per host is more than a v6e host has (8); its count "
        "is not used",
    )


def test_without_slice_data_the_most_trusted_topology_is_reported():
    """v3 has no slice data: the topology is the one the most trusted piece gives, as given."""
    pci = Evidence("pci", "1ae0:0027/004f", "sysfs", topology="2x2")
    dk = Evidence("device_kind", "TPU v3", "jax", topology="4x4")
    for evidence in ([pci, dk], [dk, pci]):
        d = reconcile(load_catalog(), evidence)
        assert (d.generation, d.topology, d.slice) == ("v3", "2x2", None)


def test_a_host_count_above_the_slice_is_refused_with_the_piece_that_gave_it():
    """A machine type that says 8 chips on this VM, in a 4-chip slice: the host count is not
    used, and neither is the machine type (its count was wrong), so the slice's own VM size
    stands and no machine-type conflict is reported."""
    at = Evidence("accelerator_type", "v6e-4", "env", count=4, count_unit="suffix", scope="slice")
    mt = Evidence("machine_type", "ct6e-standard-8t", "vm", count=8)
    d = reconcile(load_catalog(), [at, mt])
    assert (d.generation, d.chips_per_host, d.slice_chips, d.slice.machine_type) == (
        "v6e",
        4,
        4,
        "ct6e-standard-4t",
    )
    assert d.conflicts == (
        "vm says 8 chips per host, more than the 4-chip slice env names; the host count is not "
        "used",
    )


def test_an_outranked_accelerator_type_names_no_slice():
    """An accelerator type that the PCI id outranks names another generation's slice: neither
    its slice nor its counts are used."""
    at = Evidence(
        "accelerator_type", "v5litepod-8", "env", count=8, count_unit="suffix", scope="slice"
    )
    d = reconcile(load_catalog(), [PCI_V6E, at])
    assert (d.generation, d.slice, d.slice_chips, d.chips_per_host, d.topology) == (
        "v6e",
        None,
        None,
        None,
        None,
    )


def test_simulate_wins_over_an_exported_generation():
    """--simulate is the question for this one run: an exported TPU_REGISTRY_GENERATION is
    overridden by it (and said so), not an error, whichever order they come in."""
    env = Evidence("explicit", "v5e", "TPU_REGISTRY_GENERATION", detector="env")
    sim = Evidence("explicit", "v6e", "--simulate", detector="simulate")
    for evidence in ([env, sim], [sim, env]):
        d = reconcile(load_catalog(), evidence)
        assert (d.generation, d.status, d.reason) == (
            "v6e",
            "simulated",
            "simulated via --simulate",
        )
        assert [(f.evidence, f.status) for f in d.findings] == [
            (env, "overridden"),
            (sim, "decides"),
        ]
        assert d.conflicts == (
            "TPU_REGISTRY_GENERATION says 'v5e' (v5e) but --simulate overrides it with v6e",
        )


def test_explicit_choices_that_cannot_be_used_are_problems_of_no_field():
    cat = load_catalog()
    for evidence, problem in (
        (
            [Evidence("explicit", "v99", "env")],
            (
                "env",
                None,
                "",
                "explicit generation 'v99' names no generation",
                "use an id from `tpu-registry list`",
            ),
        ),
        (
            [Evidence("explicit", "v5e", "env"), Evidence("explicit", "v6e", "cli")],
            (
                "detection",
                None,
                "",
                "explicit overrides disagree: env=v5e, cli=v6e",
                "set only one",
            ),
        ),
    ):
        with pytest.raises(DetectionError) as e:
            reconcile(cat, evidence)
        (p,) = e.value.problems
        assert (p.path, p.line, p.field, p.message, p.hint) == problem


def test_a_machine_type_picks_the_vm_of_the_slice():
    """A v5litepod-8 runs on one 8-chip VM or two 4-chip ones: the machine type (a metadata
    path, in any case) says which. One the slice does not run on is a conflict, and the slice
    keeps its usual VM."""
    cat = load_catalog()
    at = Evidence("accelerator_type", "v5litepod-8", "env", count=8, count_unit="suffix")
    at = replace(at, scope="slice")
    mt = Evidence("machine_type", "projects/1/machineTypes/CT5LP-HIGHTPU-4T ", "gce")
    d = reconcile(cat, [at, mt])
    s = d.slice
    assert (d.chips_per_host, d.slice_chips, d.conflicts) == (4, 8, ())
    assert (s.machine_type, s.vms, s.chips_per_vm) == ("ct5lp-hightpu-4t", 2, 4)
    at = replace(at, value="v6e-4", count=4)
    d = reconcile(cat, [at, replace(mt, value="ct6e-standard-8t")])
    assert (d.chips_per_host, d.slice.machine_type) == (4, "ct6e-standard-4t")
    assert d.conflicts == (
        "gce says 'ct6e-standard-8t': a v6e slice of topology 2x2 does not run on machine type "
        "'ct6e-standard-8t' (it runs on ct6e-standard-4t)",
    )


def test_a_slice_topology_alone_names_the_slice():
    topo = Evidence("topology", "4x4", "env", count=16, scope="slice", topology="4x4")
    d = reconcile(load_catalog(), [PCI_V6E, topo])
    assert (d.generation, d.slice.accelerator_type, d.slice_chips, d.chips_per_host) == (
        "v6e",
        "v6e-16",
        16,
        4,
    )


def test_evidence_of_a_kind_without_a_priority_ranks_last_and_names_nothing():
    """reconcile takes any Evidence (plugins' kinds are checked before it): a kind it has no
    trust level for comes after every known one, topology included."""
    own, topo = Evidence("own", "x", "mine"), Evidence("topology", "2x2", "env", topology="2x2")
    d = reconcile(load_catalog(), [own, topo, PCI_V6E])
    assert [(f.evidence, f.status) for f in d.findings] == [
        (PCI_V6E, "decides"),
        (topo, "info"),
        (own, "unknown"),
    ]


def test_findings_are_in_a_total_order_of_every_field():
    """Pieces that differ in count or topology alone are ordered by them (none first, then
    by value), whatever order they came in: the result never depends on arrival order (nor
    on hash order, which differs from run to run)."""
    bare = Evidence("pci", "1ae0:006f", "sysfs")
    counts, topologies = (8, 1, 6, 2, 4, 3), ("4x4", "1x1", "2x4", "2x2", "1x2")
    pieces = [replace(bare, count=n) for n in counts]
    pieces += [replace(bare, topology=t) for t in topologies] + [bare]
    expected = [(None, None)] + [(None, t) for t in sorted(topologies)]
    expected += [(n, None) for n in sorted(counts)]
    for evidence in (pieces, pieces[::-1]):
        d = reconcile(load_catalog(), evidence)
        assert [(f.evidence.count, f.evidence.topology) for f in d.findings] == expected
        assert (d.chips_per_host, d.topology) == (1, "1x1")


def test_a_level_of_unrecognised_evidence_leaves_the_lower_levels_to_decide():
    v99, tx6 = Evidence("device_kind", "TPU v99", "jax"), Evidence("torch_xla_version", "6", "tx")
    d = reconcile(load_catalog(), [v99, tx6])
    assert (d.generation, d.status) == ("v6e", "detected")
    assert [(f.evidence, f.status) for f in d.findings] == [(v99, "unknown"), (tx6, "decides")]


def test_the_reason_names_every_unrecognised_piece_and_every_chip_recognised():
    from tpu_registry.unsupported import recognise

    pci, v4i = Evidence("pci", "1ae0:0056", "sysfs"), Evidence("device_kind", "TPU v4 lite", "jax")
    v99 = Evidence("device_kind", "TPU v99", "jax")
    d = reconcile(load_catalog(), [v99, v4i, pci])
    assert (d.generation, d.status) == (None, "none")
    assert d.reason == (
        "no evidence named a known generation (not recognised: pci '1ae0:0056' from sysfs, "
        "device_kind 'TPU v4 lite' from jax, device_kind 'TPU v99' from jax); recognised: "
        f"{recognise('pci', '1ae0:0056').text()}; {recognise('device_kind', 'TPU v4 lite').text()}"
    )
