"""The built-in catalog: contents, lookups, replacement, the CLI over it, and JAX's own table."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import HARDWARE, REPO, run_cli

from tpu_registry.catalog import builtin_hardware_dir, load_catalog
from tpu_registry.errors import CatalogError
from tpu_registry.tomlfile import tomllib

# The generations this checkout ships, in `list` order. A file added to hardware/ (CONTRIBUTING
# "Add a TPU generation", step 5) adds to what the tests below read from the folder; these
# must still be there.
KNOWN = ["v2", "v3", "v4", "v5e", "v5p", "v6e", "tpu7x", "tpu8i", "tpu8t"]


def _file_ids() -> dict[str, bool]:
    """id -> provisional, read from each hardware/*.toml with the TOML parser (not the
    registry's loader, which is what is under test)."""
    out = {}
    for path in HARDWARE.glob("*.toml"):
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        out[doc["id"]] = doc.get("provisional", False)
    return out


def test_builtin_catalog_has_one_generation_per_file():
    cat = load_catalog()
    files = _file_ids()
    assert sorted(cat.ids()) == sorted(files) and set(KNOWN) <= set(files)
    assert {g.id for g in cat if g.provisional} == {gid for gid, p in files.items() if p}
    assert {"tpu8t", "tpu8i"} <= {g.id for g in cat if g.provisional}


def test_list_json_lists_the_generations_in_order():
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(_file_ids())
    assert [i for i in ids if i in KNOWN] == KNOWN  # by generation number, provisional last
    v6e = next(row for row in rows if row["id"] == "v6e")
    assert v6e["hbm_bandwidth_gb_s"] == 1638  # not the seed's 3584
    assert v6e["mxu"] == "2x256x256"


def test_list_table_has_the_documented_columns():
    r = run_cli("list")
    assert r.returncode == 0
    header = r.stdout.splitlines()[0].split()
    for col in ("id", "name", "HBM", "bf16", "VMEM", "MXU/core", "chips/host", "provisional"):
        assert col in header


@pytest.mark.parametrize(
    ("name", "gid"),
    [
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("TPU7x", "tpu7x"),
        ("trillium", "v6e"),
        ("v5p-128", "v5p"),
        ("v5litepod-16", "v5e"),
        ("tpu-v6e-slice", "v6e"),
        ("0x1ae0:0x0062", "v5p"),
        ("1ae0:0027:004f", "v3"),
    ],
)
def test_show_finds_by_id_alias_and_identifier(name, gid):
    r = run_cli("show", name, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id"] == gid


def test_show_text_lists_sources():
    r = run_cli("show", "v6e")
    assert r.returncode == 0
    assert "sources:" in r.stdout and "https://docs.cloud.google.com/tpu/docs/v6e" in r.stdout


def test_show_unknown_and_ambiguous_names_exit_2():
    r = run_cli("show", "no-such-tpu")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: no generation is named 'no-such-tpu' (try `tpu-registry list`)"
    )
    assert "Traceback" not in r.stderr


def test_every_chip_field_is_covered_by_a_source():
    for g in load_catalog():
        covered = {f for s in g.sources for f in s.fields}
        for name, value in g.chip:
            if value is not None:
                assert f"chip.{name}" in covered, (g.id, name)


def test_v2_and_v3_share_a_pci_device_split_by_subsystem():
    cat = load_catalog()
    assert cat.lookup("pci", "1ae0:0027/004e") == {"v2"}
    assert cat.lookup("pci", "1ae0:0027/004f") == {"v3"}
    assert cat.lookup("torch_xla_version", "5") == {"v5e", "v5p"}


def test_replacing_a_builtin_must_be_explicit(tmp_path, monkeypatch):
    text = (
        (HARDWARE / "v6e.toml")
        .read_text()
        .replace('name = "TPU v6e (Trillium)"', 'name = "TPU v6e (site copy)"')
    )
    (tmp_path / "v6e.toml").write_text(text)
    monkeypatch.setenv("TPU_REGISTRY_PATH", str(tmp_path))
    with pytest.raises(CatalogError) as e:
        load_catalog()
    assert (
        f"{tmp_path / 'v6e.toml'}:3: id: id 'v6e' is already defined in {HARDWARE / 'v6e.toml'} "
        '(pick another id, or write replaces = "v6e" to replace it)' in str(e.value)
    )
    (tmp_path / "v6e.toml").write_text(text.replace('id = "v6e"', 'id = "v6e"\nreplaces = "v6e"'))
    cat = load_catalog()
    assert cat["v6e"].name == "TPU v6e (site copy)"
    r = run_cli("list", "--json")
    row = next(x for x in json.loads(r.stdout) if x["id"] == "v6e")
    assert row["replaces"] == str(HARDWARE / "v6e.toml") and row["path"] == str(
        tmp_path / "v6e.toml"
    )
    assert "(replaces built-in)" in run_cli("list").stdout


def v9x_from_v6e(text: str, gid: str = "v9x", pci_device: int = 0x0999) -> str:
    """The edits 'Add a TPU generation' step 2 lists, made to a copy of v6e.toml: id, name,
    aliases, generation, and every identifier (``gid`` in place of v9x)."""
    for old, new in [
        ('id = "v6e"', f'id = "{gid}"'),
        ('name = "TPU v6e (Trillium)"', f'name = "TPU {gid}"'),
        ('aliases = ["trillium", "v6 lite", "tpu-v6e", "v6"]', "aliases = []"),
        ("generation = 6", "generation = 99"),
        ('device_kinds = ["TPU v6 lite", "TPU v6e"]', f'device_kinds = ["TPU {gid}"]'),
        ('gke_accelerators = ["tpu-v6e-slice"]', f'gke_accelerators = ["tpu-{gid}-slice"]'),
        ("torch_xla_versions = [6]", "torch_xla_versions = []"),
        ('prefix = "v6e"', f'prefix = "{gid}"'),
        ("device = 0x006f", f"device = 0x{pci_device:04x}"),
        ("ct6e-standard-", f"ct{gid[1:]}-standard-"),  # "rename copied ones"
    ]:
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_contributing_add_a_generation_walkthrough(tmp_path, monkeypatch):
    """CONTRIBUTING.md 'Add a TPU generation', step by step, exactly as written there."""
    doc = (REPO / "CONTRIBUTING.md").read_text()
    section = doc.split("<!-- section: add-generation -->")[1].split(
        "<!-- end: add-generation -->"
    )[0]
    assert "cp hardware/v6e.toml ~/tpu-site/v9x.toml" in section
    assert "export TPU_REGISTRY_PATH=~/tpu-site" in section
    # Once step 5 has moved a v9x into hardware/, steps 1-4 are followed with another id.
    gid, pci = ("v9x", 0x0999) if not (HARDWARE / "v9x.toml").exists() else ("v9y", 0x0998)
    site = tmp_path / "tpu-site"
    site.mkdir()
    shutil.copy(HARDWARE / "v6e.toml", site / f"{gid}.toml")
    (site / f"{gid}.toml").write_text(v9x_from_v6e((site / f"{gid}.toml").read_text(), gid, pci))
    assert "tpu-registry validate ~/tpu-site" in section
    r = run_cli("validate", str(site))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("0 problems")
    env = {"TPU_REGISTRY_PATH": str(site)}
    rows = json.loads(run_cli("list", "--json", env=env).stdout)
    assert gid in [x["id"] for x in rows]
    shown = json.loads(run_cli("show", gid, "--json", env=env).stdout)
    assert shown["name"] == f"TPU {gid}" and shown["path"] == str(site / f"{gid}.toml")
    assert json.loads(run_cli("show", f"TPU {gid}", "--json", env=env).stdout)["id"] == gid
    # Its slices, with no code change: the [slices] table copied from v6e, machine types renamed.
    assert "tpu-registry slice v9x-16" in section and "--list --generation v9x" in section
    shown = json.loads(run_cli("slice", f"{gid}-16", "--json", env=env).stdout)
    assert (shown["generation"], shown["topology"], shown["vms"], shown["machine_type"]) == (
        gid,
        "4x4",
        4,
        f"ct{gid[1:]}-standard-4t",
    )
    listed = run_cli("slice", "--list", "--generation", gid, env=env).stdout.splitlines()
    assert len(listed) == 2 + 9 and listed[-1].split()[:2] == [f"{gid}-256", "16x16"]
    quoted = re.search(r"```toml\n(.*?)\n *```", section, re.S).group(1)
    quoted = "\n".join(line[5:] for line in quoted.splitlines())  # the list item's indent
    assert quoted.startswith("shapes = [") and quoted in (HARDWARE / "v6e.toml").read_text()


def test_schema_command_emits_json_schema():
    r = run_cli("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False
    assert "chip" in schema["properties"] and "Chip" in schema["$defs"]
    assert schema["$defs"]["Chip"]["properties"]["hbm_bandwidth_gb_s"]["exclusiveMinimum"] == 10
    for kind in ("table", "overrides"):
        assert json.loads(run_cli("schema", "--kind", kind).stdout)["type"] == "object"


def test_builtin_dir_is_the_checkout_in_a_source_tree():
    assert builtin_hardware_dir() == HARDWARE


# ---------------------------------------------------------------------------------------------
# Cross-check against JAX's own per-chip table (jax.experimental.pallas.tpu).
# ---------------------------------------------------------------------------------------------

# Differences we chose, with their source. Anything else that differs fails the test.
EXPLAINED = {
    ("v3", "hbm_bandwidth_gb_s"): "Cloud v3 page: 900 GB/s (JAX 825)",
    ("v3", "peak_bf16_tflops"): "Cloud v3 page: 123 TFLOPS (JAX and the scaling book: 140)",
    ("v3", "hbm_gib"): "Cloud v3 page: 32 GiB (JAX 34.4e9 B = 32.04 GiB, rounding)",
    ("v4", "hbm_bandwidth_gb_s"): "Cloud v4 page: 1200 GB/s (JAX 1230)",
    ("v4", "hbm_gib"): "Cloud v4 page: 32 GiB (JAX 34.4e9 B)",
    (
        "v4",
        "peak_int8_tops",
    ): "Cloud v4 page: '275 teraflops (bf16 or int8)'; JAX: int8 not available",
    (
        "v4",
        "sparsecores_per_chip",
    ): "JAX sparsecore docs and the v4 paper: 4; TpuInfo None (JAX cannot program them)",
    ("v2", "hbm_gib"): "tpu-info / XLA: 8 GiB per core; JAX 16e9 B",
    ("v5e", "hbm_bandwidth_gb_s"): "Cloud v5e page: 819 GB/s (JAX 820)",
    ("v5e", "peak_int8_tops"): "Cloud v5e page: 393 TOPS (JAX 394)",
    ("v5p", "hbm_gib"): "Cloud v5p page: 95 GiB usable of 96 physical (JAX 103e9 B)",
    ("v5p", "hbm_bandwidth_gb_s"): "Cloud v5p page: 2765 GB/s (JAX 2460)",
    (
        "v5p",
        "peak_fp8_tflops",
    ): "Cloud v5p / TPU7x pages: fp8 at the bf16 rate (JAX: not available)",
    ("v6e", "hbm_bandwidth_gb_s"): "Cloud v6e page: 1638 GB/s (JAX 1640)",
    ("v6e", "peak_bf16_tflops"): "Cloud v6e page: 918 TFLOPS (JAX 920)",
    ("v6e", "peak_fp8_tflops"): "Cloud TPU7x comparison table: 918 (JAX 920)",
    ("v6e", "peak_int8_tops"): "Cloud v6e page: 1836 TOPS (JAX 1840)",
    ("tpu7x", "hbm_gib"): "Cloud TPU7x page: 192 GiB (JAX 206e9 B = 191.9 GiB, rounding)",
    ("tpu7x", "hbm_bandwidth_gb_s"): "Cloud TPU7x page: 7380 GB/s (JAX 7400)",
    ("tpu7x", "peak_bf16_tflops"): "Cloud TPU7x page: 2307 TFLOPS (JAX 2310)",
    ("tpu7x", "peak_fp8_tflops"): "Cloud TPU7x page: 4614 TFLOPS (JAX 4600)",
    (
        "tpu7x",
        "sparsecores_per_chip",
    ): "Cloud TPU7x page: 4 per chip; JAX: 2 per TensorCore-device (= 4)",
    ("tpu8i", "sparsecores_per_chip"): "JAX: 1 SparseCore per TensorCore-device, 2 per chip",
    ("tpu8i", "hbm_gib"): "announcement: 288 GB (JAX 309e9 B = 287.8 GiB, rounding)",
}
JAX_CHIPS = {
    "v2": "TPU_V2",
    "v3": "TPU_V3",
    "v4": "TPU_V4",
    "v5e": "TPU_V5E",
    "v5p": "TPU_V5P",
    "v6e": "TPU_V6E",
    "tpu7x": "TPU_7X",
    "tpu8i": "TPU_8I",
}


def _jax_chip_facts(pltpu, gid: str) -> dict:
    """JAX's TpuInfo for a generation, turned into per-chip figures in our units."""
    version = getattr(pltpu.ChipVersion, JAX_CHIPS[gid])
    cores = version.num_physical_tensor_cores_per_chip
    info = pltpu.get_tpu_info_for_chip(version, 1)  # per TensorCore ("split" mode)
    return {
        "tensorcores_per_chip": cores,
        "mxus_per_core": info.num_mxus,
        "mxu_cols": info.mxu_column_size,
        "lanes": info.num_lanes,
        "sublanes": info.num_sublanes,
        "vmem_mib_per_core": info.vmem_capacity_bytes / 2**20,
        "smem_kib_per_core": info.smem_capacity_bytes / 2**10,
        "hbm_gib": info.hbm_capacity_bytes * cores / 2**30,
        "hbm_bandwidth_gb_s": info.mem_bw_bytes_per_second * cores / 1e9,
        "peak_bf16_tflops": info.bf16_ops_per_second * cores / 1e12,
        "peak_int8_tops": (info.int8_ops_per_second * cores / 1e12) or None,
        "peak_fp8_tflops": (info.fp8_ops_per_second * cores / 1e12) or None,
        "sparsecores_per_chip": info.sparse_core.num_cores if info.sparse_core else 0,
    }


def _close(ours: float, theirs: float, rel: float = 0.005) -> bool:
    return abs(ours - theirs) <= rel * max(abs(theirs), 1e-9)


@pytest.mark.needs_jax
def test_catalog_agrees_with_jax_tpu_info():
    from jax.experimental.pallas import (
        tpu as pltpu,  # installed by `make test`; a failure, not a skip
    )

    cat = load_catalog()
    unexplained = []
    for gid in JAX_CHIPS:
        chip = cat[gid].chip
        theirs = _jax_chip_facts(pltpu, gid)
        for field, value in theirs.items():
            ours = getattr(chip, field)
            same = (ours is None and value is None) or (
                ours is not None and value is not None and _close(ours, value)
            )
            if not same and (gid, field) not in EXPLAINED:
                unexplained.append(f"{gid}.{field}: ours {ours}, JAX {value}")
    assert not unexplained, "\n".join(unexplained)


# chip.matmul_dtypes lists the dtypes with a rated matmul speed (spec.py says why). Against
# JAX's TpuInfo rates and against its is_matmul_supported (what Pallas/Mosaic lowers without a
# cast), every difference is listed here with its reason; the test holds both lists exact.
DTYPES_NOT_RATED_BY_JAX = {
    ("v4", "int8"): "Cloud v4 page: '275 teraflops (bf16 or int8)'; JAX: int8 not available",
    ("v5p", "fp8"): "Cloud v5p page: FP8 peak 459 TFLOPS (the bf16 rate); JAX: fp8 0",
    ("tpu8i", "int4"): "JAX at the commit tpu8i.toml cites (int4 weights); jax 0.10.2 lists no "
    "int4 rate",
}
DTYPES_MOSAIC_DIFFERS = {
    ("v2", "bf16"): "MXU rated in bf16 (TpuInfo bf16 rate); Mosaic takes only f32 x f32 on v2",
    ("v3", "bf16"): "MXU rated in bf16 (TpuInfo bf16 rate); Mosaic takes only f32 x f32 on v3",
    ("v4", "int8"): "Mosaic takes int8 only as the right-hand side of a bf16/f32 matmul",
    ("v5e", "fp8"): "Mosaic accepts fp8 inputs on v5e, but TpuInfo lists no fp8 rate: not listed",
    ("tpu8i", "int4"): "as above: not in jax 0.10.2",
}


@pytest.mark.needs_jax
def test_matmul_dtypes_against_jax():
    import jax.numpy as jnp
    from jax.experimental.pallas import tpu as pltpu

    kinds = {
        "f32": [jnp.float32],
        "bf16": [jnp.bfloat16],
        "int8": [jnp.int8],
        "int4": [jnp.int4],
        "fp8": [jnp.float8_e5m2, jnp.float8_e4m3fn, jnp.float8_e4m3b11fnuz],
    }
    cat = load_catalog()
    not_rated, mosaic = set(), set()
    for gid, name in JAX_CHIPS.items():
        info = pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, name), 1)
        rates = {
            "bf16": info.bf16_ops_per_second,
            "int8": info.int8_ops_per_second,
            "fp8": info.fp8_ops_per_second,
            "int4": info.int4_ops_per_second,
        }
        rated = {"f32"} | {d for d, r in rates.items() if r}
        lowered = {d for d, ts in kinds.items() if any(info.is_matmul_supported(t, t) for t in ts)}
        ours = set(cat[gid].chip.matmul_dtypes)
        assert rated <= ours, f"{gid}: JAX rates {sorted(rated - ours)} that the catalog omits"
        not_rated |= {(gid, d) for d in ours - rated}
        mosaic |= {(gid, d) for d in ours ^ lowered}
    assert not_rated == set(DTYPES_NOT_RATED_BY_JAX)
    assert mosaic == set(DTYPES_MOSAIC_DIFFERS)


@pytest.mark.needs_jax
def test_explained_differences_are_still_differences():
    """An explanation that no longer applies (the numbers now agree) must be removed."""
    from jax.experimental.pallas import tpu as pltpu

    stale = []
    cat = load_catalog()
    for gid, field in EXPLAINED:
        value = _jax_chip_facts(pltpu, gid)[field]
        ours = getattr(cat[gid].chip, field)
        if ours is not None and value is not None and _close(ours, value, 1e-9):
            stale.append(f"{gid}.{field}")
    assert not stale


def _catalog_copy(tmp_path, n: int):
    """A folder of ``n`` generation files derived from v6e.toml, each with its own identifiers."""
    text = (HARDWARE / "v6e.toml").read_text()
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        t = re.sub(r'^id = "v6e"$', f'id = "copy-{i}"', text, count=1, flags=re.M)
        t = re.sub(r"^name = .*$", f'name = "Copy {i}"', t, count=1, flags=re.M)
        for key in ("aliases", "device_kinds", "gke_accelerators"):
            t = re.sub(rf"^{key} = \[.*\]$", f'{key} = ["copy {key} {i}"]', t, count=1, flags=re.M)
        t = re.sub(
            r"^accelerator_types = \[.*\]$",
            f'accelerator_types = [{{ prefix = "copy{i}", suffix_counts = "chips" }}]',
            t,
            count=1,
            flags=re.M,
        )
        t = re.sub(
            r"^pci = \[.*\]$",
            f"pci = [{{ vendor = 0x1ae0, device = 0xb0{i:02x}, subsystem_device = 0x0001 }}]",
            t,
            count=1,
            flags=re.M,
        )
        (folder / f"copy-{i}.toml").write_text(t)
    return folder


def test_loading_leaves_no_young_objects_for_the_collector_to_scan(tmp_path, monkeypatch):
    """The catalog's objects go to the oldest generation: the first collection after a load
    must not walk every object the load made (10 % of loading 5,000 files)."""
    import gc

    from tpu_registry import catalog

    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(tmp_path / "snapshots"))
    folder = _catalog_copy(tmp_path, 30)
    for _ in range(2):  # the second load reads the snapshots, as every later process does
        catalog.clear_cache()
        cat = load_catalog([folder])
    assert len(cat) > 30
    # What the load built and keeps: the catalog, its entries and its identifier index.
    made = [cat, cat.entries, cat._index, *cat.entries.values()]
    young = {id(o) for o in gc.get_objects(generation=0)}
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert not [o for o in made if id(o) in young]
    assert all(id(o) in oldest for o in made)


def test_a_cached_catalog_leaves_the_programs_young_objects_young(tmp_path, monkeypatch):
    """Only a load moves objects: asking for a cached catalog (every detect() does) must not
    push the program's new objects, garbage included, out of the youngest generation."""
    import gc

    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(tmp_path / "snapshots"))
    folder = _catalog_copy(tmp_path, 3)
    load_catalog([folder])
    gc.collect()
    mine = [[n] for n in range(10)]  # tracked, young
    assert any(o is mine for o in gc.get_objects(generation=0))
    load_catalog([folder])
    assert any(o is mine for o in gc.get_objects(generation=0))


def test_loading_leaves_a_programs_frozen_objects_frozen(tmp_path, monkeypatch):
    """A pre-fork server freezes its objects; loading the catalog must not unfreeze them."""
    import gc

    from tpu_registry import catalog

    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(tmp_path / "snapshots"))
    folder = _catalog_copy(tmp_path, 3)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        catalog.clear_cache()
        load_catalog([folder])
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
