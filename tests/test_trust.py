"""Trust model (issue 7, SECURITY.md): data files are data, code comes from listed plugins,
and folders or files other users can write draw a warning."""

from __future__ import annotations

import importlib
import json
import logging
import stat
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import HARDWARE, REPO, SHAPE, run_cli

from tpu_registry import Workload, cli
from tpu_registry.catalog import load_catalog
from tpu_registry.errors import CatalogError, TuningError
from tpu_registry.plugins import BUILTIN_PLUGINS, get_plugin_manager, short_name
from tpu_registry.tomlfile import tomllib

resolve_mod = importlib.import_module("tpu_registry.resolution")
BASE = REPO / "tests" / "data" / "bad" / "_base.toml"  # a valid generation file, id "corpus"
WORKLOAD = Workload(num_q_heads=32, num_kv_heads=8, head_dim=128)


def _folder(tmp_path: Path, mode: int) -> Path:
    folder = tmp_path / f"catalog-{mode:o}"
    folder.mkdir()
    (folder / "corpus.toml").write_text(BASE.read_text())
    folder.chmod(mode)
    return folder


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tpu_registry" and r.levelno == logging.WARNING
    ]


# ---------------------------------------------------------------------------------------------
# Folders and files other users can write
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,who",
    [(0o777, "all users"), (0o775, "its group"), (0o757, "all users"), (0o1777, "all users")],
)
def test_catalog_folder_writable_by_others_draws_a_warning(
    mode, who, tmp_path, monkeypatch, caplog, capsys
):
    folder = _folder(tmp_path, mode)
    message = (
        f"catalog folder {folder} (from TPU_REGISTRY_PATH) is writable by {who}; "
        "anyone who can write there chooses your TPU facts and kernel knobs "
        f"(chmod go-w {folder})"
    )
    monkeypatch.setenv("TPU_REGISTRY_PATH", str(folder))
    with caplog.at_level(logging.WARNING, logger="tpu_registry"):
        catalog = load_catalog()
    assert "corpus" in catalog  # a warning, not an error
    assert _warnings(caplog) == [message]
    # Shown on stderr by the commands that read the catalog.
    for args in (["validate"], ["list"]):
        load_catalog.__globals__["clear_cache"]()
        rc = cli.main(args)
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert f"warning: {message}" in err.splitlines()


def test_catalog_folder_from_argument_is_named_as_such(tmp_path, capsys):
    folder = _folder(tmp_path, 0o777)
    assert cli.main(["list", "--catalog", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"warning: catalog folder {folder} (from argument) is writable by all users; "
        f"anyone who can write there chooses your TPU facts and kernel knobs (chmod go-w {folder})"
    ]


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o700, 0o555])
def test_private_catalog_folder_draws_no_warning(mode, tmp_path, monkeypatch, caplog, capsys):
    folder = _folder(tmp_path, mode)
    monkeypatch.setenv("TPU_REGISTRY_PATH", str(folder))
    with caplog.at_level(logging.WARNING, logger="tpu_registry"):
        assert "corpus" in load_catalog()
        assert cli.main(["validate"]) == 0
    assert _warnings(caplog) == []
    assert capsys.readouterr().err == ""


def test_the_built_in_folders_draw_no_warning(caplog, capsys):
    for folder in (HARDWARE, HARDWARE / "tuning"):
        assert not folder.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    with caplog.at_level(logging.WARNING, logger="tpu_registry"):
        assert cli.main(["validate"]) == 0
    assert _warnings(caplog) == [] and capsys.readouterr().err == ""


def _overrides(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / f"overrides-{mode:o}.toml"
    path.write_text(
        'schema_version = 1\n\n[[override]]\ngeneration = "v6e"\nknobs = { page_size = 64 }\n'
    )
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_overrides_file_writable_by_others_draws_a_warning(mode, tmp_path, caplog, capsys):
    path = _overrides(tmp_path, mode)
    message = (
        f"overrides file {path} is writable by other users; "
        f"anyone who can write it chooses your kernel knobs (chmod go-w {path})"
    )
    with caplog.at_level(logging.WARNING, logger="tpu_registry"):
        cfg = resolve_mod.resolve(WORKLOAD, simulate="v6e", overrides=path)
    assert (cfg.value("page_size"), cfg.layer("page_size")) == (64, "overrides")  # still applied
    assert _warnings(caplog) == [message]  # once, though the policies ran twice
    caplog.clear()
    # `validate` says so too, on stderr, and the file is otherwise fine.
    with caplog.at_level(logging.WARNING, logger="tpu_registry"):
        rc = cli.main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err.splitlines() == [f"warning: {message}"]


def test_cli_resolve_prints_the_writable_warning_once(tmp_path):
    path = _overrides(tmp_path, 0o666)
    message = (
        f"overrides file {path} is writable by other users; "
        f"anyone who can write it chooses your kernel knobs (chmod go-w {path})"
    )
    r = run_cli(
        "resolve",
        "--simulate",
        "v6e",
        *SHAPE,
        "--overrides",
        str(path),
    )
    assert r.returncode == 0 and r.stderr.splitlines() == [f"warning: {message}"]


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o444])
def test_private_overrides_file_draws_no_warning(mode, tmp_path, caplog, capsys):
    path = _overrides(tmp_path, mode)
    with caplog.at_level(logging.WARNING, logger="tpu_registry"):
        cfg = resolve_mod.resolve(WORKLOAD, simulate="v6e", overrides=path)
        assert cli.main(["validate", str(path)]) == 0
    assert cfg.layer("page_size") == "overrides"
    assert _warnings(caplog) == []
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Data files are data
# ---------------------------------------------------------------------------------------------

CODE_LIKE = [
    '__import__("os").system("touch {marker}")',
    "$(touch {marker})",
    "`touch {marker}`",
    "{{{{ lipsum.__globals__.os.popen('touch {marker}') }}}}",
    "${{HOME}}/../{marker}",
    "!!python/object/apply:os.system ['touch {marker}']",
    "#include <{marker}>",
]


@pytest.mark.parametrize("payload", CODE_LIKE)
def test_code_in_a_string_is_just_a_string(payload, tmp_path):
    marker = tmp_path / "pwned"
    quoted = json.dumps(payload.format(marker=marker))
    text = BASE.read_text().replace(
        'name = "Corpus test chip"',
        f"name = {quoted}\nnotes = {quoted}",
    )
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "corpus.toml").write_text(text)
    spec = load_catalog([tmp_path / "catalog"])["corpus"]
    assert spec.name == spec.notes == payload.format(marker=marker)  # verbatim, unexpanded
    assert not marker.exists()


INCLUDE_LIKE = [
    ('include = "{other}"', "include"),
    ('includes = ["{other}"]', "includes"),
    ('import = "{other}"', "import"),
    ('extends = "{other}"', "extends"),
    ('exec = "import os"', "exec"),
    ('"__class__" = "x"', "__class__"),
    ('[include]\npath = "{other}"', "include"),
]


@pytest.mark.parametrize("line,key", INCLUDE_LIKE, ids=[k for _, k in INCLUDE_LIKE])
def test_include_and_code_keys_are_rejected_as_unknown(line, key, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "other.toml"  # a real, valid file it tries to pull in
    other.parent.mkdir()
    other.write_text(BASE.read_text().replace('id = "corpus"', 'id = "smuggled"'))
    folder = tmp_path / "catalog"
    folder.mkdir()
    path = folder / "corpus.toml"
    # Top-level keys go before the first table; a table goes at the end.
    text = BASE.read_text()
    snippet = line.format(other=other)
    text = (
        text + "\n" + snippet + "\n"
        if snippet.startswith("[")
        else text.replace("schema_version = 1\n", f"schema_version = 1\n{snippet}\n", 1)
    )
    path.write_text(text)
    n = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(snippet.splitlines()[0]))
    expected = (
        f"{path}:{n}: {key}: unknown key "
        "(unknown key: check its spelling against `tpu-registry schema`)"
    )
    with pytest.raises(CatalogError) as info:
        load_catalog([folder])
    assert [str(p) for p in info.value.problems] == [expected]
    assert cli.main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [expected]
    assert "smuggled" not in load_catalog()  # nothing was pulled in


def test_replaces_names_an_id_never_a_path(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    target = HARDWARE / "v6e.toml"
    (folder / "corpus.toml").write_text(
        BASE.read_text().replace('id = "corpus"', f'id = "corpus"\nreplaces = "{target}"')
    )
    with pytest.raises(CatalogError) as info:
        load_catalog([folder])
    assert [p.message for p in info.value.problems] == [
        f"replaces {str(target)!r}, but the file's id is 'corpus'; a replacement keeps the id "
        "it replaces"
    ]


def test_overrides_file_with_code_like_values_is_rejected_or_inert(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "overrides.toml"
    path.write_text(
        "schema_version = 1\n\n[[override]]\n"
        f'generation = "v6e"\nnote = "$(touch {marker})"\n'
        "[override.knobs]\npage_size = \"__import__('os').getpid()\"\n"
    )
    with pytest.raises(TuningError) as info:
        resolve_mod.resolve(WORKLOAD, simulate="v6e", overrides=path)
    assert (
        info.value.problems[0].message
        == "page_size must be a whole number, got \"__import__('os').getpid()\""
    )
    assert not marker.exists()


def test_data_files_in_the_catalog_are_plain_toml():
    """Every shipped data file parses with the plain TOML parser alone: no preprocessing."""
    for path in sorted(HARDWARE.rglob("*.toml")):
        assert isinstance(tomllib.loads(path.read_text(encoding="utf-8")), dict), path


# ---------------------------------------------------------------------------------------------
# Code comes only from plugins, and every plugin is listed
# ---------------------------------------------------------------------------------------------


def test_plugins_json_lists_every_plugin_with_distribution_and_version():
    r = run_cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    own = version("tpu-registry")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert own == pyproject
    listed = {p["name"]: p for p in data["plugins"]}
    for module in BUILTIN_PLUGINS:
        p = listed[short_name(module)]
        assert (p["kind"], p["distribution"], p["version"]) == ("built-in", "tpu-registry", own)
        assert p["hooks"] and all(h.startswith("tpu_registry_") for h in p["hooks"])
    for p in data["plugins"]:
        assert p["distribution"] and p["version"], f"{p['name']} does not say where it comes from"
    # Nothing runs that is not listed: the CLI lists exactly what the manager holds.
    held = {
        short_name(n) if n in BUILTIN_PLUGINS else n
        for n, plugin in get_plugin_manager().list_name_plugin()
        if plugin is not None
    }
    assert set(listed) == held
    assert data["load_faults"] == []


def test_autoload_off_runs_built_ins_only():
    r = run_cli("plugins", "--json", env={"TPU_REGISTRY_PLUGINS_AUTOLOAD": "0"})
    names = {p["name"] for p in json.loads(r.stdout)["plugins"]}
    assert names == {short_name(m) for m in BUILTIN_PLUGINS}
