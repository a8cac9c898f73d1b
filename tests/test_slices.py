"""Slices: the data against the rule function, Cloud's pages and xpk; the CLI, README and API;
detection of a VM in a multi-host slice (env detector and a fake sysfs tree)."""

from __future__ import annotations

import ast
import doctest
import json
import math
import re
import types
from fractions import Fraction
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from conftest import REPO, make_sysfs, run_cli

from tpu_registry.catalog import load_catalog
from tpu_registry.cli import main
from tpu_registry.detection import detect
from tpu_registry.slices import (
    SliceError,
    all_slices,
    describe,
    hosts_text,
    slice_of,
    topologies,
)
from tpu_registry.tomlfile import tomllib
from tpu_registry.validate import validate_paths

DATA = REPO / "tests" / "data" / "slices"
CATALOG = load_catalog(plugins=False)
SLICED = [spec for spec in CATALOG if spec.slices is not None]


def test_the_generations_with_published_slices_have_slice_data():
    assert [s.id for s in SLICED] == ["v4", "v5e", "v5p", "v6e", "tpu7x"]


# --------------------------------------------------------------------------- the rule


def _brute_force_cube_shapes(spec) -> set[str]:
    """Every AxBxC of the cube rule, enumerated the slow way (independent of slices.py)."""
    cubes, data = spec.slices.cubes, spec.slices
    edges = range(cubes.edge, cubes.max_axis + 1, cubes.edge)
    out = set()
    for a in edges:
        for b in edges:
            for c in edges:
                if a * b * c > data.max_chips:
                    break  # c only grows
                if cubes.sorted_axes and not a <= b <= c:
                    continue
                chips = a * b * c
                if chips // cubes.edge**3 <= cubes.max_cubes and chips <= data.max_chips:
                    out.add(f"{a}x{b}x{c}")
    return out


@pytest.mark.parametrize("spec", SLICED, ids=[s.id for s in SLICED])
def test_every_slice_in_the_data_obeys_the_rule(spec):
    data = spec.slices
    listed = [s.topology for s in data.shapes]
    offered = topologies(spec)
    assert offered[: len(listed)] == listed and len(set(offered)) == len(offered)
    if data.cubes is not None:
        assert set(offered) - set(listed) == _brute_force_cube_shapes(spec) - set(listed)
    prefix = spec.identify.accelerator_types[0]
    for s in all_slices(spec):
        dims = [int(n) for n in s.topology.split("x")]
        assert len(dims) == data.axes
        assert s.chips == math.prod(dims) <= data.max_chips
        assert s.tensorcores == s.chips * spec.chip.tensorcores_per_chip
        assert s.vms * s.chips_per_vm == s.chips
        assert s.hosts == Fraction(s.chips, spec.chip.chips_per_host)
        # An int when whole (fractions is then never imported), a Fraction below one host.
        assert type(s.hosts) is (int if s.chips % spec.chip.chips_per_host == 0 else Fraction)
        suffix = s.tensorcores if prefix.suffix_counts == "cores" else s.chips
        assert s.accelerator_type == f"{prefix.prefix}-{suffix}"
        # The accelerator type names a slice of the same size, on the default machine type.
        back = slice_of(CATALOG, s.accelerator_type)
        assert back.chips == s.chips and back.topology in offered
        if data.wrap_axis_multiple is None:
            assert s.wraparound is None
        else:
            whole = data.cubes is None or all(d % data.cubes.edge == 0 for d in dims)
            assert s.wraparound == tuple(whole and d % data.wrap_axis_multiple == 0 for d in dims)


def test_largest_slice_is_not_the_pod():
    v5p = CATALOG["v5p"]
    assert (v5p.chip.max_pod_chips, v5p.slices.max_chips) == (8960, 6144)
    largest = slice_of(CATALOG, "v5p-12288")
    assert (largest.topology, largest.chips, largest.vms) == ("16x16x24", 6144, 1536)
    with pytest.raises(SliceError, match="v5p offers no slice of 6400 chips"):
        slice_of(CATALOG, "v5p-12800")


# --------------------------------------------------------------------------- Cloud pages


def _pages() -> list[dict]:
    return tomllib.loads((DATA / "cloud_pages.toml").read_text())["page"]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: f"{p['generation']}:{p['url']}")
def test_cloud_page_tables(page):
    assert page["url"].startswith("https://docs.cloud.google.com/")
    spec = CATALOG[page["generation"]]
    for row in page["rows"]:
        cells = dict(zip(page["columns"], row, strict=True))
        s = describe(spec, cells["topology"], cells.get("machine_type") or None)
        got = {
            "topology": s.topology,
            "chips": s.chips,
            "cores": s.tensorcores,
            "hosts": hosts_text(s.hosts),
            "vms": s.vms,
            "accelerator_type": s.accelerator_type,
            "machine_type": s.machine_type,
            "wraparound": "all" if s.wraparound and all(s.wraparound) else s.wraparound,
        }
        for col, want in cells.items():
            if want != "":
                assert got[col] == want, (cells["topology"], col)
        if cells.get("accelerator_type"):
            assert slice_of(CATALOG, cells["accelerator_type"]).topology == cells["topology"]
    if "largest_chips" in page:
        assert spec.slices.max_chips == page["largest_chips"]
        assert max(describe(spec, t).chips for t in topologies(spec)) == page["largest_chips"]
    if "largest_topology" in page:
        top = slice_of(
            CATALOG,
            f"{spec.identify.accelerator_types[0].prefix}-"
            f"{page['largest_chips'] * spec.chip.tensorcores_per_chip}",
        )
        assert top.topology == page["largest_topology"]
    if "pod_chips" in page:
        assert spec.chip.max_pod_chips == page["pod_chips"]
    if "vm_chips" in page:
        assert sorted(v.chips for v in spec.slices.vm_types) == page["vm_chips"]
    if "vm" in page:
        vm = next(v for v in spec.slices.vm_types if v.machine_type == page["vm"]["machine_type"])
        for k, v in page["vm"].items():
            assert getattr(vm, k) == v, k
    if "dcn_gbps_per_chip" in page:
        assert spec.slices.dcn_gbps_per_chip == page["dcn_gbps_per_chip"]


# --------------------------------------------------------------------------- xpk

XPK_MODULE = "xpk/core/system_characteristics.py"


def _xpk_tables():
    """xpk's TPU table, read as data: xpk is installed without its dependencies (kubernetes,
    google-cloud-*, docker: see the Makefile), so its package is not imported; the module's
    source is executed with its two package-relative imports replaced (a topology helper read
    from xpk's own file, and no-op GPU decorators). Returns the table and the keys xpk marks
    as the default topology of their accelerator type."""
    try:
        dist = distribution("xpk")
    except PackageNotFoundError:
        pytest.fail("xpk is not installed: run `make .venv/.installed` (pip install --no-deps)")
    pinned = tomllib.loads((DATA / "xpk_differences.toml").read_text())["xpk_version"]
    assert dist.version == pinned, "a new xpk: review tests/data/slices/xpk_differences.toml"

    def source(rel: str) -> str:
        return Path(dist.locate_file(rel)).read_text()

    topo: dict = {}
    exec(
        compile(
            source("xpk/utils/topology.py"), "xpk/utils/topology.py", "exec", dont_inherit=True
        ),
        topo,
    )
    body = [
        n
        for n in ast.parse(source(XPK_MODULE)).body
        if not (isinstance(n, ast.ImportFrom) and n.level)
    ]
    [table] = [
        n
        for n in body
        if isinstance(n, ast.Assign)
        and [getattr(t, "id", "") for t in n.targets] == ["UserFacingNameToSystemCharacteristics"]
    ]
    noop = types.SimpleNamespace(decorate_jobset=lambda *a, **k: None)
    ns = {
        "__name__": "xpk_system_characteristics",
        "rdma_decorator": noop,
        "tcpx_decorator": noop,
        "tcpxo_decorator": noop,
        "get_topology_product": topo["get_topology_product"],
    }
    exec(
        compile(ast.Module(body[: body.index(table)], []), XPK_MODULE, "exec", dont_inherit=True),
        ns,
    )
    defaults: set[str] = set()
    build = ns["get_tpu_system_characteristics_map"]

    def recording(prefix, *args, default_topologies=None, **kw):
        defaults.update(f"{prefix}-{t}" for t in default_topologies or ())
        return build(prefix, *args, default_topologies=default_topologies, **kw)

    ns["get_tpu_system_characteristics_map"] = recording
    exec(compile(ast.Module([table], []), XPK_MODULE, "exec", dont_inherit=True), ns)
    tpu = ns["AcceleratorType"].TPU
    return {
        k: v
        for k, v in ns["UserFacingNameToSystemCharacteristics"].items()
        if v.accelerator_type == tpu
    }, defaults


def _differences_from_xpk() -> set[tuple[str, str]]:
    xpk, defaults = _xpk_tables()
    assert len(xpk) > 1000  # the table was read, not an empty shell
    found: set[tuple[str, str]] = set()
    for key, sc in xpk.items():
        gens = CATALOG.lookup("gke_accelerator", sc.gke_accelerator)
        if len(gens) != 1:
            found.add((key, "generation"))
            continue
        spec = CATALOG[next(iter(gens))]
        prefix = key.rpartition("-")[0]
        if key == sc.device_type:  # an accelerator type: its default topology and VM type
            try:
                ours = slice_of(CATALOG, key)
            except SliceError:
                found.add((key, "not offered"))
                continue
            if f"{prefix}-{sc.topology}" in defaults and ours.topology != sc.topology:
                found.add((key, "default topology"))
            if ours.topology == sc.topology and ours.machine_type != sc.gce_machine_type:
                found.add((key, "machine_type"))
            continue
        try:
            ours = describe(spec, sc.topology, sc.gce_machine_type)
        except SliceError:
            found.add((key, "not offered"))
            continue
        for field, theirs, mine in (
            ("accelerator_type", sc.device_type, ours.accelerator_type),
            ("chips_per_vm", sc.chips_per_vm, ours.chips_per_vm),
            ("vms", sc.vms_per_slice, ours.vms),
        ):
            if theirs != mine:
                found.add((key, field))
    for spec in SLICED:
        prefix = spec.identify.accelerator_types[0].prefix
        found |= {(f"{prefix}-{t}", "not in xpk") for t in topologies(spec)} - {
            (k, "not in xpk") for k in xpk
        }
    return found


def test_differences_from_xpk_are_the_documented_ones():
    documented = tomllib.loads((DATA / "xpk_differences.toml").read_text())["difference"]
    listed = {(k, d["kind"]) for d in documented for k in d["keys"]}
    assert all(d["why"].strip() for d in documented)
    assert sum(len(d["keys"]) for d in documented) == len(listed)  # no key twice
    found = _differences_from_xpk()
    assert sorted(found - listed) == [], "undocumented differences from xpk"
    assert sorted(listed - found) == [], "documented differences that no longer exist"


# --------------------------------------------------------------------------- CLI, README, API

README = (REPO / "README.md").read_text()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (the console script itself is run in test_detect_json...)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_slice_examples_are_the_real_output(capsys):
    examples = re.findall(r"```\n\$ tpu-registry slice (\S+)\n(.*?)```", README, re.S)
    assert [name for name, _ in examples] == [
        "v5p-128",
        "v6e-16",
        "v5litepod-8",
        "v6e-256",
        "tpu7x-8",
        "v4-8",
    ]
    for name, shown in examples:
        code, out, err = cli(capsys, "slice", name)
        assert code == 0, err
        assert out == shown, name


def test_readme_python_example():
    [block] = re.findall(
        r"```python\n(>>> from tpu_registry import load_catalog, slice_of.*?)```", README, re.S
    )
    test = doctest.DocTestParser().get_doctest(block, {}, "README", "README.md", 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert (runner.failures, runner.tries) == (0, 4)


def test_slice_record_is_frozen_and_public():
    import tpu_registry

    s = tpu_registry.slice_of(tpu_registry.load_catalog(), "v6e-16")
    with pytest.raises(AttributeError):
        s.chips = 1  # type: ignore[misc]
    assert isinstance(s, tpu_registry.Slice)


def test_cli_slice_json_list_and_topology(capsys):
    out = json.loads(cli(capsys, "slice", "4x4x8", "--generation", "v5p", "--json")[1])
    assert (out["accelerator_type"], out["chips"], out["vms"], out["hosts"]) == (
        "v5p-256",
        128,
        32,
        "32",
    )
    assert out["wraparound"] == [True, True, True]
    out = json.loads(
        cli(capsys, "slice", "v6e-8", "--machine-type", "ct6e-standard-4t", "--json")[1]
    )
    assert (out["vms"], out["chips_per_vm"]) == (2, 4)
    lines = cli(capsys, "slice", "--list", "--generation", "v5e")[1].splitlines()
    assert lines[0].split() == [
        "accelerator",
        "type",
        "topology",
        "chips",
        "VMs",
        "chips/VM",
        "machine",
        "type",
    ]
    assert [ln.split()[1] for ln in lines[2:]] == [
        "1x1",
        "2x2",
        "2x4",
        "2x4",
        "4x4",
        "4x8",
        "8x8",
        "8x16",
        "16x16",
    ]
    out = json.loads(cli(capsys, "slice", "1x1", "--generation", "v6e", "--json")[1])
    assert out["hosts"] == "1/8"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["v6e-12"],
            "error: v6e offers no slice of 12 chips (v6e-12); the largest single slice "
            "has 256 chips",
        ),
        (
            ["v5p-7"],
            "error: 'v5p-7': the suffix counts cores (2 per chip), so it must be a "
            "positive multiple of 2",
        ),
        (
            ["v5p-٨"],
            "error: 'v5p-٨' is not a v5p accelerator type (write v5p-N, N the number of cores)",
        ),
        (
            ["v99-8"],
            "error: 'v99-8' is not an accelerator type of any generation (write PREFIX-N "
            "such as v5p-128, v6e-16, v5litepod-8, tpu7x-8)",
        ),
        (["4x4"], "error: topology '4x4' names no generation: add --generation (e.g. v5p)"),
        (
            ["3x3", "--generation", "v6e"],
            "error: v6e offers no slice of topology '3x3' "
            "(offered: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16; `tpu-registry slice --list "
            "--generation v6e` lists all)",
        ),
        (
            ["v6e-16", "--machine-type", "ct6e-standard-8t"],
            "error: a v6e slice of topology 4x4 "
            "does not run on machine type 'ct6e-standard-8t' (it runs on ct6e-standard-4t)",
        ),
        (["v6e-16", "--generation", "v5p"], "error: 'v6e-16' is a v6e accelerator type, not v5p"),
        (
            ["v2-8"],
            "error: v2 has no [slices] data in its catalog file (CONTRIBUTING.md, 'Add a "
            "generation', shows how to describe its slices)",
        ),
        ([], "error: give an accelerator type (v5p-128) or a topology with --generation (4x4x8)"),
        (["--list"], "error: --list takes --generation ID and no accelerator type"),
    ],
)
def test_slice_bad_input_is_one_clear_line(capsys, args, message):
    code, out, err = cli(capsys, "slice", *args)
    assert (code, out) == (2, "")
    assert err.strip() == message


# --------------------------------------------------------------------------- file validation


def _with_slices(tmp_path, edit) -> list[str]:
    text = edit((REPO / "hardware" / "v6e.toml").read_text())
    path = tmp_path / "v6e.toml"
    path.write_text(text)
    _, problems = validate_paths([path])
    return [str(p).replace(str(path), "FILE") for p in problems]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '{ topology = "4x8" }',
            '{ topology = "4x8", machine_types = ["ct6e-standard-2t"] }',
            "machine type 'ct6e-standard-2t' is not in slices.vm_types (add a "
            "[[slices.vm_types]] entry for it, or fix the name)",
        ),
        (
            '{ topology = "4x8" }',
            '{ topology = "4x8x1" }',
            "topology '4x8x1' has 3 axes; this generation's slices have 2 (write 2 numbers "
            "separated by x)",
        ),
        (
            '{ topology = "2x2" }',
            '{ topology = "2x2", machine_types = ["ct6e-standard-8t"] }',
            "topology '2x2' (4 chips) cannot be split into VMs of ct6e-standard-8t (8 chips) "
            "(name a machine type whose chip count divides the slice)",
        ),
        (
            "max_chips = 256\nwrap",
            "max_chips = 512\nwrap",
            "slices.max_chips (512) exceeds chip.max_pod_chips (256): a slice cannot be larger "
            "than its pod (check both counts)",
        ),
        (
            "vcpus = 180, memory_gb = 720",
            "vcpus = 180, memory_gb = 720, numa_nodes = 2",
            "no source covers slices.vm_types.ct6e-standard-4t.numa_nodes",
        ),
    ],
)
def test_bad_slice_data_is_a_clear_error(tmp_path, old, new, message):
    problems = _with_slices(tmp_path, lambda t: t.replace(old, new, 1))
    assert len(problems) == 1 and message in problems[0], problems
    assert problems[0].startswith("FILE:")


# --------------------------------------------------------------------------- detection

GOOGLE = 0x1AE0
# A VM in a multi-host slice of each generation: what GKE and the TPU VM put in the environment.
MULTI_HOST = [
    # gid, pci device, accelerator type, topology, host bounds, chips/VM, VMs, machine type
    ("v5e", 0x0063, "v5litepod-16", "4x4", "2,2,1", 4, 4, "ct5lp-hightpu-4t"),
    ("v6e", 0x006F, "v6e-16", "4x4", "2,2,1", 4, 4, "ct6e-standard-4t"),
    ("v5p", 0x0062, "v5p-128", "4x4x4", "2,2,4", 4, 16, "ct5p-hightpu-4t"),
    ("tpu7x", 0x0076, "tpu7x-64", "2x4x4", "1,2,4", 4, 8, "tpu7x-standard-4t"),
]


@pytest.mark.parametrize("case", MULTI_HOST, ids=[c[2] for c in MULTI_HOST])
def test_a_vm_in_a_multi_host_slice(tmp_path, case):
    gid, device, accel, topo, host_bounds, per_vm, vms, machine = case
    root = make_sysfs(tmp_path, [(GOOGLE, device, None)] * per_vm)
    env = {
        "TPU_ACCELERATOR_TYPE": accel,
        "TPU_TOPOLOGY": topo,
        "TPU_CHIPS_PER_HOST_BOUNDS": "2,2,1",
        "TPU_HOST_BOUNDS": host_bounds,
    }
    d = detect(CATALOG, env=env, sysfs_root=root)
    assert (d.generation, d.chips_per_host, d.slice_chips, d.topology) == (
        gid,
        per_vm,
        per_vm * vms,
        topo,
    )
    assert (d.slice.vms, d.slice.machine_type, d.slice.accelerator_type) == (vms, machine, accel)
    assert d.conflicts == ()
    # The environment alone (no sysfs) gives the same chips per VM, from the slice data.
    d = detect(CATALOG, env={"TPU_ACCELERATOR_TYPE": accel}, sysfs_root=tmp_path / "none")
    assert (d.chips_per_host, d.slice.vms) == (per_vm, vms)


def test_detect_json_carries_the_slice():
    r = run_cli("detect", "--json", env={"TPU_ACCELERATOR_TYPE": "v6e-16"})  # the real script
    out = json.loads(r.stdout)
    assert out["chips_per_host"] == 4 and out["slice"]["machine_type"] == "ct6e-standard-4t"


@pytest.mark.parametrize(
    ("env", "conflict"),
    [
        (
            {"TPU_ACCELERATOR_TYPE": "v6e-16", "TPU_TOPOLOGY": "2x4"},
            "env TPU_ACCELERATOR_TYPE says 'v6e-16' (16 chips, 4x4) but env TPU_TOPOLOGY says "
            "'2x4' (8 chips); the accelerator type is trusted more",
        ),
        (
            {"TPU_ACCELERATOR_TYPE": "v6e-16", "TPU_HOST_BOUNDS": "1,1,1"},
            "env TPU_HOST_BOUNDS says '1,1,1' (1 hosts) but a 4x4 v6e slice on "
            "ct6e-standard-4t has 4 VMs",
        ),
        (
            {"TPU_ACCELERATOR_TYPE": "v6e-16", "TPU_CHIPS_PER_HOST_BOUNDS": "2,4,1"},
            "env TPU_CHIPS_PER_HOST_BOUNDS says '2,4,1' (8 chips on this VM) but a v6e-16 VM of "
            "ct6e-standard-4t has 4; the host count is used",
        ),
        (
            {"TPU_ACCELERATOR_TYPE": "v6e-12"},
            "env TPU_ACCELERATOR_TYPE says 'v6e-12': v6e offers no slice of 12 chips (v6e-12); "
            "the largest single slice has 256 chips",
        ),
        (
            {"TPU_ACCELERATOR_TYPE": "v5p-128", "TPU_TOPOLOGY": "3x3x3"},
            "env TPU_TOPOLOGY says '3x3x3': v5p offers no slice of topology '3x3x3'",
        ),
    ],
)
def test_evidence_that_disagrees_on_the_shape_is_a_conflict(env, conflict):
    d = detect(CATALOG, env=env, sysfs_root="/nonexistent")
    assert d.generation == env["TPU_ACCELERATOR_TYPE"].split("-")[0].replace("v5litepod", "v5e")
    assert any(c.startswith(conflict) for c in d.conflicts), d.conflicts


def test_same_chips_other_shape_is_not_a_conflict():
    d = detect(
        CATALOG,
        env={"TPU_ACCELERATOR_TYPE": "v4-256", "TPU_TOPOLOGY": "8x4x4"},
        sysfs_root="/nonexistent",
    )
    assert (d.topology, d.slice.chips, d.conflicts) == ("8x4x4", 128, ())


# --------------------------------------------------------------------------- unnamed chips


@pytest.mark.parametrize(
    ("kind", "value", "chip"),
    [
        ("device_kind", "TPU v4 lite", "TPU v4i ('TPU v4 lite'), the inference variant of TPU v4"),
        ("device_kind", "TPU7", "TPU7, a chip distinct from TPU7x (Ironwood)"),
        ("gke_accelerator", "tpu7", "TPU7, a chip distinct from TPU7x (Ironwood)"),
        ("accelerator_type", "tpu7-8", "TPU7, a chip distinct from TPU7x (Ironwood)"),
        (
            "machine_type",
            "projects/1/machineTypes/tpu7-standard-4t",
            "TPU7, a chip distinct from TPU7x (Ironwood)",
        ),
        ("pci", "1ae0:0056", "Google PCI device 0x0056, a test part with no public name"),
    ],
)
def test_chips_the_catalog_recognises_but_does_not_describe(kind, value, chip):
    from tpu_registry.detection import Evidence, reconcile

    d = reconcile(CATALOG, [Evidence(kind, value, "test")])
    assert (d.generation, d.status) == (None, "none")
    assert f"; recognised: {chip}: not in the catalog (" in d.reason
    # It names no generation: TPU7 is not TPU7x.
    assert d.findings[0].candidates == () and d.findings[0].status == "unknown"


def test_unrecognised_identifiers_still_say_so():
    from tpu_registry.detection import Evidence, reconcile

    d = reconcile(CATALOG, [Evidence("device_kind", "TPU v99", "test")])
    assert d.reason == (
        "no evidence named a known generation (not recognised: device_kind 'TPU v99' from test)"
    )
