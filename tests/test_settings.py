"""The settings registry: every variable documented, plugin-declared settings, the trace switch,
and hooks that get their context instead of reading process state."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import REPO, SHAPE, make_sysfs, run_cli

import tpu_registry
from tpu_registry import Layer, Setting, Workload, resolve, settings
from tpu_registry.plugins import get_plugins, reset

# String constants that look like variables but name something else.
NOT_VARIABLES = {"TPU_REGISTRY"}  # the vLLM attention backend's name
VARIABLE = re.compile(r"^(TPU_[A-Z0-9_]+|CHIPS_PER_HOST_BOUNDS|HOST_BOUNDS)$")
SOURCES = [REPO / "tpu_registry", *sorted((REPO / "plugins").glob("*/tpu_registry_*"))]


def _gen_docs():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_docs
    finally:
        sys.path.pop(0)
    return gen_docs


def _strings_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_every_variable_the_code_names_is_a_declared_setting():
    declared = {s.name for s in _gen_docs().repo_settings()}
    named = set()
    for folder in SOURCES:
        for path in folder.rglob("*.py"):
            named |= {s for s in _strings_in(path) if VARIABLE.match(s)}
    named -= NOT_VARIABLES
    assert named, "the scan found no variables at all"
    assert sorted(named - declared) == [], "read by the code but not declared as a setting"
    assert sorted(declared - named) == [], "declared but never read"


def test_readme_settings_table_is_generated_from_the_registry():
    gen_docs = _gen_docs()
    readme = (REPO / "README.md").read_text()
    assert gen_docs.render(readme) == readme, "run python scripts/gen_docs.py"
    for s in gen_docs.repo_settings():
        assert f"| `{s.name}` |" in readme


def test_no_plugin_variable_in_the_core():
    for path in (REPO / "tpu_registry").rglob("*.py"):
        assert "TPU_REGISTRY_GCE" not in path.read_text(), path
        assert "TPU_REGISTRY_VLLM" not in path.read_text(), path


def test_a_plugin_declared_setting_is_part_of_the_resolve_cache_key(monkeypatch):
    plugin = types.ModuleType("team_policy")
    plugin.tpu_registry_settings = tpu_registry.hookimpl(
        lambda: [Setting("TEAM_PAGE", "our page size", affects_resolve=True)]
    )

    def tune(context):
        page = context.env.get("TEAM_PAGE")
        return Layer("team", {"page_size": int(page)}) if page else None

    plugin.tpu_registry_tune = tpu_registry.hookimpl(tune)
    get_plugins().register(plugin, "team_policy")
    try:
        declared = {s.name: s for s in settings.all_settings()}
        assert (
            declared["TEAM_PAGE"].owner == "team_policy" and declared["TEAM_PAGE"].affects_resolve
        )
        w = Workload(32, 8, 128)
        monkeypatch.setenv("TEAM_PAGE", "32")
        assert resolve(w, simulate="v6e").value("page_size") == 32
        monkeypatch.setenv("TEAM_PAGE", "64")  # no cache reset: the key must see the change
        assert resolve(w, simulate="v6e").value("page_size") == 64
    finally:
        reset()


def test_a_setting_declared_twice_is_a_fault_of_the_second_plugin():
    plugin = types.ModuleType("clash")
    plugin.tpu_registry_settings = tpu_registry.hookimpl(
        lambda: [Setting("TPU_REGISTRY_PATH", "mine")]
    )
    plugins = get_plugins()
    plugins.register(plugin, "clash")
    try:
        [fault] = [f for f in plugins.settings_faults if f.plugin == "clash"]
        assert fault.message == (
            "declared bad settings: ValueError: setting TPU_REGISTRY_PATH is declared twice "
            "(tpu-registry and clash)"
        )
        assert fault.stage == "load"
    finally:
        reset()


def test_trace_switch_logs_every_hook_call(tmp_path):
    root = make_sysfs(tmp_path, [(0x1AE0, 0x006F, None)])
    env = {
        "TPU_REGISTRY_TRACE_PLUGINS": "1",
        "TPU_REGISTRY_SYSFS_ROOT": str(root),
        "TPU_REGISTRY_PLUGINS_AUTOLOAD": "0",
    }
    r = run_cli(
        "resolve", "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--json", env=env
    )
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("tpu-registry trace: ")]
    called = [
        re.match(r"tpu-registry trace: (\w+) \[(\w+)\] \d+\.\d\d ms -> ", x).groups() for x in lines
    ]
    for detector in ("env", "sysfs", "jax", "torch_xla"):
        assert ("tpu_registry_detect", detector) in called
    for policy in ("overrides", "tables", "baseline"):
        assert ("tpu_registry_tune", policy) in called
    [sysfs] = [x for x in lines if "[sysfs]" in x]
    assert "Evidence(kind='pci', value='1ae0:006f'" in sysfs
    [baseline] = [x for x in lines if "tpu_registry_tune [baseline]" in x]
    assert "Layer(name='baseline'" in baseline
    quiet = run_cli(
        "resolve",
        *SHAPE,
        "--json",
        env={**env, "TPU_REGISTRY_TRACE_PLUGINS": ""},
    )
    assert "tpu-registry trace" not in quiet.stderr


def test_trace_shows_a_raising_plugin(capsys):
    plugin = types.ModuleType("boom")

    def detect(context):
        raise RuntimeError("no luck")

    plugin.tpu_registry_detect = tpu_registry.hookimpl(detect)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPU_REGISTRY_TRACE_PLUGINS", "1")
        reset()
        get_plugins().register(plugin, "boom")
        try:
            d = tpu_registry.detect()
        finally:
            reset()
    assert [(f.plugin, f.message) for f in d.faults if f.plugin == "boom"] == [
        ("boom", "raised RuntimeError: no luck")
    ]
    assert re.search(
        r"^tpu-registry trace: tpu_registry_detect \[boom\] "
        r"\d+\.\d\d ms -> raised RuntimeError: no luck$",
        capsys.readouterr().err,
        re.M,
    )


# --------------------------------------------------------------------------- contexts


def _v98_catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "cat"
    folder.mkdir()
    text = (REPO / "hardware" / "v6e.toml").read_text()
    for old, new in [
        ('id = "v6e"', 'id = "v98"'),
        ('aliases = ["trillium", "v6 lite", "tpu-v6e", "v6"]', "aliases = []"),
        ('device_kinds = ["TPU v6 lite", "TPU v6e"]', "device_kinds = []"),
        ('gke_accelerators = ["tpu-v6e-slice"]', "gke_accelerators = []"),
        (
            'accelerator_types = [{ prefix = "v6e", suffix_counts = "chips" }]',
            "accelerator_types = []",
        ),
        ("pci = [{ vendor = 0x1ae0, device = 0x006f }]", "pci = []"),
    ]:
        assert old in text
        text = text.replace(old, new)
    (folder / "v98.toml").write_text(text)
    return folder


OVERRIDES = (
    'schema_version = 1\n\n[[override]]\ngeneration = "v98"\n[override.knobs]\npage_size = 32\n'
)


def test_overrides_see_the_catalog_folders_passed_to_resolve(tmp_path):
    """Regression: the overrides policy reloaded the catalog itself, without catalog_dirs, and
    refused a generation that lives only there ("'v98' names no generation")."""
    folder = _v98_catalog(tmp_path)
    (tmp_path / "o.toml").write_text(OVERRIDES)
    cfg = resolve(
        Workload(32, 8, 128), simulate="v98", overrides=tmp_path / "o.toml", catalog_dirs=(folder,)
    )
    assert cfg.generation == "v98"
    assert (cfg.value("page_size"), cfg.layer("page_size")) == (32, "overrides")


def test_cli_passes_catalog_folders_without_editing_the_environment(tmp_path):
    folder = _v98_catalog(tmp_path)
    (tmp_path / "o.toml").write_text(OVERRIDES)
    args = (
        "resolve",
        "--simulate",
        "v98",
        "--catalog",
        str(folder),
        "--overrides",
        str(tmp_path / "o.toml"),
    )
    r = run_cli(*args, "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["generation"] == "v98" and out["knobs"]["page_size"]["value"] == 32
    source = (REPO / "tpu_registry" / "cli.py").read_text()
    assert (
        "os.environ[" not in source and "os.environ.update" not in source and "putenv" not in source
    )


def test_policies_read_the_environment_of_their_context(tmp_path, monkeypatch):
    """The tables policy reads TPU_REGISTRY_TABLES_PATH from its context, not os.environ."""
    from tpu_registry.catalog import load_catalog
    from tpu_registry.detection import detect
    from tpu_registry.tune import tune
    from tpu_registry.types import TuneContext

    monkeypatch.setenv("TPU_REGISTRY_TABLES_PATH", str(tmp_path / "missing"))  # would be an error
    cat = load_catalog()
    w = Workload(32, 8, 128)
    ctx = TuneContext(cat, cat["v6e"], w, detect(cat, simulate="v6e"), env={})
    assert tune(get_plugins(), ctx, strict=True).knobs["page_size"].layer == "baseline"
    with pytest.raises(
        tpu_registry.CatalogError,
        match="tuning-table folder from TPU_REGISTRY_TABLES_PATH does not exist",
    ):
        tune(
            get_plugins(),
            TuneContext(
                cat,
                cat["v6e"],
                w,
                ctx.detection,
                env={"TPU_REGISTRY_TABLES_PATH": str(tmp_path / "missing")},
            ),
            strict=True,
        )


def test_import_loads_nothing_until_a_name_is_used():
    code = (
        "import sys, tpu_registry; print(sorted(m for m in sys.modules "
        "if m.startswith(('tpu_registry', 'pydantic', 'pluggy'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['tpu_registry']"
    code = (
        "import sys, tpu_registry; tpu_registry.hookimpl; print(sorted(m for m in sys.modules "
        "if m.startswith(('tpu_registry', 'pydantic'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['tpu_registry', 'tpu_registry.hookspecs']"
