"""Validated snapshots: what a process reads instead of validating, and when it may not.

Every test runs the real CLI or real loaders in fresh processes against real TOML files, with a
private cache folder (``TPU_REGISTRY_CACHE_DIR``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HARDWARE, REPO, run_cli

from tpu_registry import records, snapshot
from tpu_registry.tomlfile import tomllib

V6E = HARDWARE / "v6e.toml"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(folder))
    return folder


def _catalog(tmp_path: Path, hbm: int = 32) -> Path:
    """A folder with one extra generation file (a copy of v6e with its own identifiers)."""
    folder = tmp_path / "cat"
    folder.mkdir(exist_ok=True)
    text = V6E.read_text()
    for old, new in (
        ('id = "v6e"', 'id = "snap"'),
        ("hbm_gib = 32", f"hbm_gib = {hbm}"),
    ):
        assert old in text
        text = text.replace(old, new, 1)
    import re

    for key in ("aliases", "device_kinds", "gke_accelerators", "accelerator_types", "pci"):
        text = re.sub(rf"^{key} = \[.*\]$", f"{key} = []", text, count=1, flags=re.M)
    (folder / "snap.toml").write_text(text)
    return folder


def _show(folder: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("show", "snap", "--json", "--catalog", str(folder), env=env)


PROBE = r"""
import io, json, sys, contextlib
{patch}
from tpu_registry import cli
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main({argv!r})
heavy = sorted(m for m in ("pydantic", "pluggy", "importlib.metadata", "tomllib", "tomli")
               if m in sys.modules)
print(json.dumps({{"rc": rc, "out": buf.getvalue(), "heavy": heavy}}))
"""


def _probe(argv: list[str], patch: str = "") -> dict:
    """Run the CLI in a fresh interpreter; its exit code, output and the heavy modules it loaded."""
    code = PROBE.format(argv=argv, patch=patch)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["err"] = r.stderr
    return out


def _snapshots(cache: Path, kind: str = "generation") -> list[Path]:
    return sorted((cache / "snapshots").glob(f"{kind}-*.json"))


# ---------------------------------------------------------------------------------------------
# One set of types
# ---------------------------------------------------------------------------------------------


def test_records_module_is_what_the_generator_renders():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_records
    finally:
        sys.path.pop(0)
    assert gen_records.render() == (REPO / "tpu_registry" / "records.py").read_text(), (
        "run python scripts/gen_records.py"
    )


def test_records_hold_exactly_what_the_models_validate():
    """Every shipped data file: the record's fields, in order, equal the model's dump."""
    from tpu_registry.policies.schemas import Table
    from tpu_registry.spec import Generation

    files = [(Generation, records.Generation, p) for p in sorted(HARDWARE.glob("*.toml"))]
    files += [(Table, records.Table, p) for p in sorted((HARDWARE / "tuning").glob("*.toml"))]
    assert len(files) > 10
    for model, record, path in files:
        validated = model.model_validate(tomllib.loads(path.read_text()))
        dumped = json.loads(json.dumps(validated.model_dump()))
        rec = record.from_dict(dumped)
        assert rec.to_dict() == validated.model_dump(mode="json"), path
        assert list(rec.to_dict()) == list(model.model_fields), path
    chip = records.Generation.from_dict(
        json.loads(
            json.dumps(Generation.model_validate(tomllib.loads(V6E.read_text())).model_dump())
        )
    ).chip
    assert chip.vmem_bytes_per_core == 128 * 1024 * 1024  # derived values: one definition
    assert dict(chip)["hbm_gib"] == 32


def test_version_is_the_installed_one():
    from importlib.metadata import version

    from tpu_registry.version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"] == version("tpu-registry")


# ---------------------------------------------------------------------------------------------
# What must show
# ---------------------------------------------------------------------------------------------


def test_an_edited_file_is_seen_by_the_next_process(tmp_path, cache):
    folder = _catalog(tmp_path, hbm=32)
    first = _show(folder)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["chip"]["hbm_gib"] == 32
    [snap] = [p for p in _snapshots(cache) if "snap.toml" in p.read_text()]
    path = folder / "snap.toml"
    st = path.stat()
    # Same size, same modification time: only the content (and ctime) tell the edit apart.
    path.write_text(path.read_text().replace("hbm_gib = 32", "hbm_gib = 64", 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    second = _show(folder)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["chip"]["hbm_gib"] == 64
    assert 'hbm_gib":64' in snap.read_text().replace(" ", "")


def test_an_unchanged_catalog_is_served_without_pydantic_or_plugins(tmp_path, cache):
    folder = _catalog(tmp_path)
    first = _probe(["show", "snap", "--json", "--catalog", str(folder)])
    assert first["rc"] == 0 and "pydantic" in first["heavy"]  # validated once
    for argv in (["show", "snap", "--json", "--catalog", str(folder)], ["list", "--json"]):
        again = _probe(argv)
        assert again["rc"] == 0, again["err"]
        assert again["heavy"] == [], argv  # no pydantic, no pluggy, no importlib.metadata
    assert again["err"] == ""
    assert json.loads(_probe(["show", "snap", "--json", "--catalog", str(folder)])["out"]) == (
        json.loads(first["out"])
    )


def test_a_corrupt_snapshot_is_rebuilt_with_a_warning(tmp_path, cache):
    folder = _catalog(tmp_path, hbm=32)
    assert _show(folder).returncode == 0
    [snap] = [p for p in _snapshots(cache) if "snap.toml" in p.read_text()]
    good = snap.read_bytes()
    for bad in (good[: len(good) // 2], good.replace(b"32", b"99"), b"not a snapshot"):
        snap.write_bytes(bad)
        r = _show(folder)
        assert r.returncode == 0
        assert json.loads(r.stdout)["chip"]["hbm_gib"] == 32  # never what the bad copy said
        assert f"warning: snapshot {snap} is corrupt" in r.stderr
        assert snapshot.read_blob(snap) is not None  # rewritten whole
    assert _show(folder).stderr == ""


def test_an_unwritable_cache_folder_works(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    folder = _catalog(tmp_path, hbm=32)
    for _ in range(2):
        r = _show(folder)
        assert r.returncode == 0
        assert json.loads(r.stdout)["chip"]["hbm_gib"] == 32
        assert "warning: cannot write snapshots to" in r.stderr
        assert "set TPU_REGISTRY_CACHE_DIR to a writable folder, or to off" in r.stderr
    off = _show(folder, env={"TPU_REGISTRY_CACHE_DIR": "off"})
    assert off.returncode == 0 and off.stderr == ""
    assert not (tmp_path / "cache").exists()


def test_a_changed_package_version_invalidates(tmp_path, cache):
    folder = _catalog(tmp_path)
    argv = ["show", "snap", "--json", "--catalog", str(folder)]
    assert _probe(argv)["rc"] == 0
    assert _probe(argv)["heavy"] == []
    before = set(_snapshots(cache))
    bumped = _probe(argv, patch="import tpu_registry.version as v; v.__version__ = '99.0'")
    assert "pydantic" in bumped["heavy"]  # validated again, not served from 0.1.0's snapshot
    assert set(_snapshots(cache)) > before
    assert json.loads(bumped["out"]) == json.loads(_probe(argv)["out"])


def test_two_concurrent_writers_leave_a_valid_snapshot(tmp_path, cache):
    folder = tmp_path / "many"
    folder.mkdir()
    base = _catalog(tmp_path).joinpath("snap.toml").read_text()
    for n in range(40):
        text = base.replace('id = "snap"', f'id = "snap{n}"')
        (folder / f"snap{n}.toml").write_text(text)
    code = (
        "import sys; from tpu_registry.catalog import load_catalog; "
        "assert len(load_catalog([sys.argv[1]])) > 40"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(folder)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0 and err == "", err
    snaps = [p for p in _snapshots(cache) if "snap39.toml" in p.read_text()]
    assert len(snaps) == 1
    doc = snapshot.read_blob(snaps[0])
    assert len(doc["files"]) == 40
    assert not [p for p in (cache / "snapshots").iterdir() if p.name.endswith(".tmp")]
    served = _probe(["show", "snap7", "--json", "--catalog", str(folder)])
    assert served["heavy"] == [] and json.loads(served["out"])["id"] == "snap7"


def test_validate_always_runs_pydantic(tmp_path, cache):
    """Even when a snapshot vouches for a file, ``validate`` checks the file itself."""
    folder = _catalog(tmp_path)
    assert _show(folder).returncode == 0
    [snap] = [p for p in _snapshots(cache) if "snap.toml" in p.read_text()]
    path = folder / "snap.toml"
    path.write_text(path.read_text().replace("hbm_gib = 32", "hbm_gib = 999999", 1))
    # Make the snapshot vouch for the edited file (as if the edit kept its stat signature).
    doc, tail = snapshot.read_parts(snap)
    os.utime(path, ns=(1, 1))  # long ago: not "racily clean"
    doc["files"][str(path)]["st"] = snapshot._signature(path.stat())
    snapshot.write_blob(snap, doc, tail)
    served = _show(folder)
    assert json.loads(served.stdout)["chip"]["hbm_gib"] == 32  # the snapshot was trusted
    r = run_cli("validate", str(folder))
    assert r.returncode == 2
    assert "chip.hbm_gib" in r.stderr and "999999" in r.stderr
    probe = _probe(["validate", str(path)])
    assert probe["rc"] == 2 and "pydantic" in probe["heavy"]
    assert "pydantic" in _probe(["schema"])["heavy"]


def test_import_tpu_registry_imports_nothing_else():
    code = (
        "import sys; before = set(sys.modules); import tpu_registry; "
        "print(sorted(set(sys.modules) - before))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.replace("'", '"')) == ["tpu_registry"]


def test_a_snapshot_cache_others_can_write_is_not_used(tmp_path, cache, caplog):
    """A snapshot stands in for the files: one planted in a folder others can write to must not
    change what a file says."""
    import logging

    from tpu_registry import catalog

    folder = _catalog(tmp_path, hbm=32)
    assert catalog.load_catalog([folder])["snap"].chip.hbm_gib == 32
    [snap] = [p for p in _snapshots(cache) if "snap.toml" in p.read_text()]
    doc, tail = snapshot.read_parts(snap)
    tail = bytes(tail)  # a view into the bytes read
    entry = doc["files"][str(folder / "snap.toml")]
    start, n = entry["at"]
    planted = tail[start : start + n].replace(b'"hbm_gib":32', b'"hbm_gib":4096')
    assert planted != tail[start : start + n]
    os.utime(folder / "snap.toml", ns=(1, 1))  # long ago: trusted on its stat signature
    entry["st"] = snapshot._signature((folder / "snap.toml").stat())
    entry["at"] = [len(tail), len(planted)]
    snapshot.write_blob(snap, doc, tail + planted)
    catalog.clear_cache()
    assert catalog.load_catalog([folder])["snap"].chip.hbm_gib == 4096  # control: it is used
    (cache / "snapshots").chmod(0o777)
    try:
        catalog.clear_cache()
        with caplog.at_level(logging.WARNING, logger="tpu_registry"):
            assert catalog.load_catalog([folder])["snap"].chip.hbm_gib == 32
        assert [r.getMessage() for r in caplog.records] == [
            f"snapshot cache {cache / 'snapshots'} is writable by other users or not yours; not "
            "using it (chmod 700 it, or set TPU_REGISTRY_CACHE_DIR)"
        ]
    finally:
        (cache / "snapshots").chmod(0o700)
        catalog.clear_cache()


# ---------------------------------------------------------------------------------------------
# Plugins loaded when their hooks are called
# ---------------------------------------------------------------------------------------------

LAZY_PROBE = r"""
import io, json, sys, contextlib
from tpu_registry import cli, settings
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main({argv!r})
print(json.dumps({{"rc": rc, "out": buf.getvalue(),
                  "loaded": sorted(m for m in sys.modules if m.startswith("lazy_tpu_")),
                  "settings": sorted(s.name for s in settings.all_settings()),
                  "key": [k for k, _ in settings.resolve_key({{}})]}}))
"""


@pytest.fixture
def lazy_site(tmp_path, monkeypatch, cache) -> Path:
    """An installed distribution with two plugins: one detects, one only adds a doctor section
    and declares a variable that changes resolve()."""
    site = tmp_path / "site"
    info = site / "lazy_tpu_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    # The cached list is keyed on the modification times of the sys.path folders: Python
    # creating __pycache__ here on the first import would make the second run a fresh scan
    # (as installing a plugin does). A real site-packages has its __pycache__ already.
    (site / "__pycache__").mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lazy-tpu-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[tpu_registry]\nlazy_detect = lazy_tpu_detect\nlazy_doctor = lazy_tpu_doctor\n"
    )
    (site / "lazy_tpu_detect.py").write_text(
        "import tpu_registry\n\n\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_detect(context):\n"
        "    return None\n"
    )
    (site / "lazy_tpu_doctor.py").write_text(
        "import tpu_registry\n\n\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_doctor(context):\n"
        "    return {'lazy': 'here'}\n\n\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_settings():\n"
        "    return [tpu_registry.Setting('LAZY_TPU_KNOB', 'a test variable', "
        "affects_resolve=True)]\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def _lazy(argv: list[str]) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_plugin_is_imported_only_when_one_of_its_hooks_is_called(lazy_site):
    first = _lazy(["detect", "--json"])  # nothing known yet: every plugin is loaded once
    assert first["rc"] == 0 and first["loaded"] == ["lazy_tpu_detect", "lazy_tpu_doctor"]
    again = _lazy(["detect", "--json"])
    assert again["rc"] == 0 and again["loaded"] == ["lazy_tpu_detect"]
    assert json.loads(again["out"]) == json.loads(first["out"])
    assert "LAZY_TPU_KNOB" not in again["settings"]
    # resolve() keys its cache on every variable that changes it, the plugin's included.
    resolved = _lazy(
        [
            "resolve",
            "--simulate",
            "v6e",
            "--heads",
            "8",
            "--kv-heads",
            "8",
            "--head-dim",
            "128",
            "--json",
        ]
    )
    # What the plugin declared is remembered from its first load: it is not imported again.
    assert resolved["rc"] == 0 and resolved["loaded"] == ["lazy_tpu_detect"]
    assert "LAZY_TPU_KNOB" in resolved["settings"]
    assert "LAZY_TPU_KNOB" in resolved["key"]  # part of resolve()'s cache key
    listed = _lazy(["plugins", "--json"])
    names = {p["name"] for p in json.loads(listed["out"])["plugins"]}
    assert {"lazy_detect", "lazy_doctor"} <= names
    assert "LAZY_TPU_KNOB" in listed["settings"]


def test_an_edited_plugin_is_loaded_again_to_learn_its_hooks(lazy_site):
    assert _lazy(["detect", "--json"])["rc"] == 0
    assert _lazy(["detect", "--json"])["loaded"] == ["lazy_tpu_detect"]
    doctor = lazy_site / "lazy_tpu_doctor.py"
    doctor.write_text(
        doctor.read_text() + "\n\n@tpu_registry.hookimpl\n"
        "def tpu_registry_detect(context):\n"
        "    return tpu_registry.Evidence('explicit', 'v5e', 'lazy plugin')\n"
    )
    out = _lazy(["detect", "--json"])
    assert out["loaded"] == ["lazy_tpu_detect", "lazy_tpu_doctor"]
    assert json.loads(out["out"])["generation"] == "v5e"
    assert _lazy(["detect", "--json"])["loaded"] == ["lazy_tpu_detect", "lazy_tpu_doctor"]


def test_a_misnamed_hook_is_an_error_every_time_not_once(lazy_site):
    (lazy_site / "lazy_tpu_doctor.py").write_text(
        "import tpu_registry\n\n\n@tpu_registry.hookimpl\ndef tpu_registry_doctr(context):\n"
        "    return {}\n"
    )
    for _ in range(2):
        r = run_cli("detect", "--json")
        assert r.returncode != 0
        assert "tpu_registry_doctr" in r.stderr and "docs/hooks.md" in r.stderr


def test_a_resolve_parses_the_rows_of_only_the_tables_it_looks_up(cache):
    """Tables are loaded with their kernel and generations; rows are parsed on first lookup."""
    from tpu_registry import Workload, resolve
    from tpu_registry.policies import tables

    for n in range(2):  # the second time from the snapshot, as every later process
        tables._cache.clear()
        cfg = resolve(Workload(32, 8, 128, max_model_len=3001 + n), simulate="v6e")
        assert cfg.generation == "v6e"
        loaded = tables.load_tables(tables.table_folders({}), "v6e")
        assert {t.kernel for t in loaded} == {"rpa_v2", "rpa_v3_hd64", "mla_v2"}
        parsed = sorted(t.path.name for t in loaded if t._table is not None)
        assert parsed == ["rpa_v2_tpu_v6.toml"]
    # Every table still reads in full when asked.
    assert all(len(t.table.rows) > 0 for t in loaded)


THREADS_PROBE = r"""
import json, sys, threading
from tpu_registry.detection import detect
barrier = threading.Barrier(8)
out = []
def run():
    barrier.wait()
    out.append(detect(env={}).generation)
threads = [threading.Thread(target=run) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
from tpu_registry.plugins import get_plugins
print(json.dumps({"gens": out, "faults": [f.message for f in get_plugins().load_faults]}))
"""


def test_threads_calling_a_deferred_plugins_hook_at_once_all_see_it(lazy_site):
    """The first call of a hook loads its deferred plugins; threads calling it meanwhile wait
    for the load instead of running without the plugin (its import is slow on purpose)."""
    (lazy_site / "lazy_tpu_detect.py").write_text(
        "import time\nimport tpu_registry\n\ntime.sleep(0.2)\n\n\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_detect(context):\n"
        "    return tpu_registry.Evidence('explicit', 'v5e', 'lazy plugin')\n"
    )
    assert _lazy(["detect", "--json"])["loaded"] == ["lazy_tpu_detect", "lazy_tpu_doctor"]
    r = subprocess.run(
        [sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"gens": ["v5e"] * 8, "faults": []}
