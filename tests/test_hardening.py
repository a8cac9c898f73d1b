"""Hardening, second round (issue 15): special files, bounded reads, identifier hijacks,
impossible counts, output that cannot forge lines, and a command line that behaves.

Inputs that cannot be committed (FIFOs, /dev/zero, a 1.5 GB sparse file) are built in
tmp_path. Every command that could hang runs in a subprocess with a time-out, so a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import HARDWARE, REPO, SHAPE, run_cli

from tpu_registry import Evidence, Workload, cli, load_catalog
from tpu_registry.catalog import builtin_hardware_dir
from tpu_registry.detection import detect, reconcile
from tpu_registry.errors import CatalogError, Problem, TuningError
from tpu_registry.files import FileRefused, read_capped
from tpu_registry.policies import overrides as overrides_mod
from tpu_registry.resolution import resolve
from tpu_registry.tomlfile import MAX_FILE_BYTES
from tpu_registry.workload import MAX_HF_CONFIG_BYTES

BAD = Path(__file__).resolve().parent / "data" / "bad"
W = Workload(num_q_heads=32, num_kv_heads=8, head_dim=128)
FIFO_MSG = (
    "is a FIFO (named pipe), not a regular file (name a regular file; data is never streamed)"
)
CHR_MSG = "is a character device, not a regular file (name a regular file; data is never streamed)"


@pytest.fixture(autouse=True)
def private_parse_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(tmp_path / "parse-cache"))


def _cli(*args: str, env: dict | None = None):
    r = run_cli(*args, env=env)  # 120 s time-out: a hang fails, it does not block the suite
    assert "Traceback" not in r.stdout + r.stderr
    return r


# ---------------------------------------------------------------------------------------------
# Special files are refused at once; every read is bounded
# ---------------------------------------------------------------------------------------------


def test_fifo_anywhere_a_file_is_read_is_refused_at_once(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    fifo = folder / "gen.toml"
    os.mkfifo(fifo)
    for args, env in (
        (["list"], {"TPU_REGISTRY_PATH": str(folder)}),
        (["validate", str(folder)], None),
        (["validate", str(fifo)], None),
        (["resolve", "--simulate", "v6e", *SHAPE, "--overrides", str(fifo)], None),
        (["resolve", "--simulate", "v6e", "--hf-config", str(fifo)], None),
    ):
        r = _cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert f"{fifo}: {FIFO_MSG}" in r.stderr, (args, r.stderr)


def test_dev_zero_is_refused_not_read(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "z.toml").symlink_to("/dev/zero")
    r = _cli("list", env={"TPU_REGISTRY_PATH": str(folder)})
    assert (r.returncode, r.stderr) == (2, f"error: {folder / 'z.toml'}: {CHR_MSG}\n")
    r = _cli("resolve", "--simulate", "v6e", "--hf-config", "/dev/zero")
    assert (r.returncode, r.stderr) == (2, f"error: /dev/zero: {CHR_MSG}\n")


def test_dev_zero_as_overrides_is_refused_not_read():
    with pytest.raises(TuningError) as info:
        resolve(W, simulate="v6e", overrides="/dev/zero")
    assert [str(p) for p in info.value.problems] == [f"/dev/zero: {CHR_MSG}"]


def test_huge_hf_config_is_refused_by_size_first(tmp_path):
    """1.5 GB (sparse: no disk or memory used) is refused from its size, before any read."""
    big = tmp_path / "config.json"
    with big.open("wb") as f:
        f.truncate(1536 * 1024 * 1024)
    r = _cli("resolve", "--simulate", "v6e", "--hf-config", str(big))
    size = big.stat().st_size
    assert r.returncode == 2
    assert r.stderr == (
        f"error: {big}: file is {size} bytes, over the {MAX_HF_CONFIG_BYTES}-byte limit "
        "(data files are small; is this the right file?)\n"
    )


def test_read_capped_reads_at_most_the_cap_plus_one_byte(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_capped(path, 10) == b"x" * 10
    with pytest.raises(FileRefused, match="file is 10 bytes, over the 9-byte limit"):
        read_capped(path, 9)
    with pytest.raises(FileRefused, match="is a folder, not a regular file"):
        read_capped(tmp_path, 10)
    with pytest.raises(FileRefused, match="cannot read file: No such file or directory"):
        read_capped(tmp_path / "missing", 10)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (MemoryError(), "MemoryError"),  # no message: the type alone, no dangling ": "
        (OSError(5, "Input/output error"), "OSError: [Errno 5] Input/output error"),
    ],
)
def test_an_overrides_file_that_cannot_be_read_is_an_error_never_skipped(
    error, said, tmp_path, monkeypatch
):
    """Reading raises (memory, I/O): the resolve fails naming the file and the error; it never
    goes on with baseline knobs and a "policy fault" line."""
    path = tmp_path / "overrides.toml"
    path.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v6e"\n[override.knobs]\npage_size = 64\n'
    )

    def broken(_path):
        raise error

    monkeypatch.setattr(overrides_mod, "read_toml", broken)
    overrides_mod.clear_cache()
    with pytest.raises(TuningError) as info:
        resolve(W, simulate="v6e", overrides=path)
    (problem,) = info.value.problems
    assert (problem.path, problem.message) == (str(path), f"cannot read the overrides file: {said}")
    rc = cli.main(["resolve", "--simulate", "v6e", *SHAPE, "--overrides", str(path)])
    assert rc == 2


def test_a_folder_given_as_overrides_is_refused(tmp_path):
    with pytest.raises(TuningError) as info:
        resolve(W, simulate="v6e", overrides=tmp_path)
    assert [p.message for p in info.value.problems] == ["is a folder, not a regular file"]


# ---------------------------------------------------------------------------------------------
# One namespace; replaces is one rule whatever the file order
# ---------------------------------------------------------------------------------------------


def test_the_issue_alias_hijack_is_refused_naming_both_files(tmp_path):
    text = (
        (BAD / "_base.toml")
        .read_text()
        .replace(
            'name = "Corpus test chip"',
            'name = "Corpus test chip"\n'
            'aliases = ["TPU v5 lite", "tpu-v6e-slice", "1ae0:006f", "v5p-8"]',
        )
    )
    (tmp_path / "x.toml").write_text(text)
    with pytest.raises(CatalogError) as info:
        load_catalog([tmp_path])
    msgs = [p.message for p in info.value.problems]
    assert len(msgs) == 4
    for value, owner in (
        ("TPU v5 lite", "v5e"),
        ("tpu-v6e-slice", "v6e"),
        ("1ae0:006f", "v6e"),
        ("v5p-8", "v5p"),
    ):
        (m,) = [m for m in msgs if m.startswith(f"alias {value!r}")]
        assert f"of {owner!r} in {HARDWARE / (owner + '.toml')}" in m
    assert {p.path for p in info.value.problems} == {str(tmp_path / "x.toml")}


def test_replaces_chain_gives_the_same_problems_in_any_file_order(tmp_path):
    src = BAD / "replaces_chain" / "a"
    results = []
    for names in (("a", "b", "c"), ("z", "y", "x")):
        folder = tmp_path / "".join(names)
        folder.mkdir()
        for name, f in zip(names, sorted(src.iterdir()), strict=True):
            shutil.copy(f, folder / f"{name}.toml")
        with pytest.raises(CatalogError) as info:
            load_catalog([folder])
        results.append(sorted(p.message for p in info.value.problems))
    assert results[0] == results[1] and len(results[0]) == 2


def test_a_replacement_keeping_its_id_is_accepted(tmp_path):
    text = (
        (HARDWARE / "v6e.toml")
        .read_text()
        .replace('\nid = "v6e"\n', '\nid = "v6e"\nreplaces = "v6e"\n')
    )
    (tmp_path / "mine.toml").write_text(text)
    assert load_catalog([tmp_path]).entries["v6e"].path == tmp_path / "mine.toml"


def test_names_typed_in_full_width_are_normalised():
    assert load_catalog().get("\uff56\uff16\uff45").id == "v6e"  # ｖ６ｅ


# ---------------------------------------------------------------------------------------------
# Counts: bounded by catalog facts, flagged with the reason
# ---------------------------------------------------------------------------------------------


def _detect(**env) -> object:
    return detect(env=env, sysfs_root="/nonexistent-sysfs-root")


@pytest.mark.parametrize(
    ("accel", "bounds", "host", "slice_", "flag"),
    [
        (
            "v6e-999999999999",
            None,
            None,
            None,
            "suffix '999999999999' is not a count (ASCII digits, at most 9)",
        ),
        (
            "v6e-999999999",
            None,
            None,
            None,
            "999999999 chips is more than a whole v6e pod (256 chips)",
        ),
        (
            "v5p-7",
            None,
            None,
            None,
            "7 cores is not a whole number of v5p chips (2 cores per chip)",
        ),
        (
            "v6e-\u0668",
            None,
            None,
            None,
            "suffix '\u0668' is not a count (ASCII digits, at most 9)",
        ),
        ("v6e-4", "2,2,4", 4, 4, "16 chips per host is more than a v6e host has (8)"),
        ("v6e-4", "2,2,2", 4, 4, "8 chips per host, more than the 4-chip slice"),
        ("v6e-8", "2,2,2", 8, 8, None),
    ],
)
def test_impossible_counts_are_flagged_and_not_used(accel, bounds, host, slice_, flag):
    env = {"TPU_ACCELERATOR_TYPE": accel}
    if bounds:
        env["TPU_CHIPS_PER_HOST_BOUNDS"] = bounds
    d = _detect(**env)
    assert d.generation == accel.split("-")[0]
    assert (d.chips_per_host, d.slice_chips) == (host, slice_)
    if flag is None:
        assert d.conflicts == ()
    else:
        assert any(flag in c for c in d.conflicts), d.conflicts


@pytest.mark.parametrize("bounds", ["9" * 5000, "2,x,1", "0,2,2"])
def test_a_host_shape_that_is_not_one_is_flagged(bounds):
    d = _detect(TPU_CHIPS_PER_HOST_BOUNDS=bounds, TPU_REGISTRY_GENERATION="v6e")
    assert (d.generation, d.chips_per_host) == ("v6e", None)
    shown = repr(bounds)
    assert d.conflicts == (
        f"env TPU_CHIPS_PER_HOST_BOUNDS says {shown}: not a shape of positive whole numbers "
        "(such as 2,2,1 or 2x4); its count is not used",
    )


def test_a_huge_suffix_beside_an_explicit_generation_keeps_the_explicit_one():
    d = _detect(TPU_ACCELERATOR_TYPE="v6e-" + "9" * 4300, TPU_REGISTRY_GENERATION="v5e")
    assert (d.generation, d.status) == ("v5e", "explicit")


def test_unrecognised_evidence_is_named_in_the_reason():
    d = _detect(TPU_ACCELERATOR_TYPE="v6e--8")
    assert d.status == "none"
    assert d.reason == (
        "no evidence named a known generation (not recognised: accelerator_type 'v6e--8' from "
        "env TPU_ACCELERATOR_TYPE)"
    )


def test_count_check_uses_catalog_facts_only():
    cat = load_catalog()
    ev = Evidence("accelerator_type", "v5p-6", "test", count=6, count_unit="suffix", scope="slice")
    d = reconcile(cat, [ev])
    assert (d.generation, d.slice_chips) == ("v5p", 3)  # 6 cores = 3 chips: plausible


# ---------------------------------------------------------------------------------------------
# Output cannot forge lines
# ---------------------------------------------------------------------------------------------


def test_control_characters_are_escaped_in_detect_and_errors():
    evil = "v6e-8\x1b[2J\nv5e  forged"
    r = _cli("detect", env={"TPU_ACCELERATOR_TYPE": evil})
    assert r.returncode == 0 and "\x1b" not in r.stdout and "forged" in r.stdout
    assert not any(line.startswith("v5e  forged") for line in r.stdout.splitlines())
    r = _cli("show", "\x1b[31mv6e\nforged")
    assert r.returncode == 2 and "\x1b" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_table_cells_are_escaped():
    out = cli.table(["a"], [["x\x1b[1m\ny"]])
    assert out.splitlines() == ["a", "-" * len("x\\x1b[1m\\ny"), "x\\x1b[1m\\ny"]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_schema_is_always_json():
    plain, with_flag = _cli("schema"), _cli("schema", "--json")
    assert plain.stdout == with_flag.stdout and json.loads(plain.stdout)["$schema"]
    assert "always JSON" in _cli("schema", "--help").stdout


def test_simulate_wins_over_an_exported_generation_and_says_so():
    env = {"TPU_REGISTRY_GENERATION": "v5e"}
    r = _cli("detect", "--simulate", "v6e", "--json", env=env)
    d = json.loads(r.stdout)
    assert (r.returncode, d["generation"], d["status"]) == (0, "v6e", "simulated")
    assert d["conflicts"] == [
        "env TPU_REGISTRY_GENERATION says 'v5e' (v5e) but --simulate overrides it with v6e"
    ]
    r = _cli("resolve", "--simulate", "v6e", *SHAPE, env=env)
    assert r.returncode == 0 and r.stdout.startswith("v6e ")


def test_explicit_shape_flags_win_over_hf_config_and_explain_says_so(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "hidden_size": 4096,
                "max_position_embeddings": 131072,
            }
        )
    )
    r = _cli(
        "resolve", "--simulate", "v6e", "--hf-config", str(config), "--kv-heads", "4", "--explain"
    )
    assert r.returncode == 0
    assert "workload: 32 q heads, 4 kv heads, head dim 128" in r.stdout
    assert f"  workload note: num_kv_heads 4 given explicitly, over 8 from {config}" in r.stdout
    assert (
        "  workload note: max_model_len 8192: the model's max_position_embeddings 131072 capped "
        "at 8192 (give --max-model-len to choose)" in r.stdout
    )
    config.write_text(json.dumps({"num_attention_heads": 8, "head_dim": 128}))
    r = _cli("resolve", "--simulate", "v6e", "--hf-config", str(config), "--json")
    assert json.loads(r.stdout)["workload_notes"] == [
        "max_model_len 2048: the default, the config has no max_position_embeddings (give "
        "--max-model-len to choose)"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--json", "--format", "vllm"], "--json and --format vllm ask for two outputs: give one"),
        (
            ["--json", "--explain"],
            "--explain is text output and --json is another: give one (the JSON holds every "
            "knob's layer and note)",
        ),
        (
            ["--format", "vllm", "--explain"],
            "--explain is text output and --format vllm is another: give one (the JSON holds "
            "every knob's layer and note)",
        ),
    ],
)
def test_conflicting_output_flags_are_an_error(flags, message):
    r = _cli("resolve", "--simulate", "v6e", *SHAPE, *flags)
    assert (r.returncode, r.stderr) == (2, f"error: {message}\n")


def test_errors_with_json_are_json_on_stdout():
    r = _cli("show", "v99", "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout) == {
        "error": {
            "type": "CatalogError",
            "exit": 2,
            "problems": [
                {
                    "path": "",
                    "line": None,
                    "field": "",
                    "message": "no generation is named 'v99' (try `tpu-registry list`)",
                    "hint": "",
                }
            ],
        }
    }
    readme = (HARDWARE.parent / "README.md").read_text()
    assert '{"error": {"type":' in readme and '"problems"' in readme


def test_every_flag_has_help():
    parser = cli.build_parser()
    missing = []
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sp in subparsers.choices.items():
        for action in sp._actions:
            if action.option_strings and not action.help:
                missing.append(f"{name} {action.option_strings[0]}")
            if not action.option_strings and action.dest != "help" and not action.help:
                missing.append(f"{name} {action.dest}")
    assert missing == []


def test_a_run_builds_only_its_command_and_parses_as_the_full_parser_does(capsys):
    """main() builds the running command's parser alone: its help and its parse must be the
    full parser's."""
    full = cli.build_parser()
    subparsers = next(a for a in full._actions if a.choices and isinstance(a.choices, dict))
    assert sorted(subparsers.choices) == sorted(cli.COMMANDS)
    resolve_args = ["--heads", "8", "--kv-heads", "8", "--head-dim", "64", "--tp", "2"]
    argvs = {
        "show": ["v6e", "--json"],
        "slice": ["v5p-128", "--machine-type", "ct5p-hightpu-4t"],
        "validate": ["a.toml", "b"],
        "schema": ["--kind", "table"],
        "detect": ["--simulate", "v5e", "--require"],
        "resolve": [*resolve_args, "--format", "vllm", "--attention-sinks"],
        "doctor": [*resolve_args, "--strict"],
    }
    for name in cli.COMMANDS:
        alone = cli.build_parser(only=name)
        argv = [name, *argvs.get(name, ["--json"])]
        assert vars(alone.parse_args(argv)) == vars(full.parse_args(argv)), name
        helps = []
        for parser in (alone, full):
            with pytest.raises(SystemExit):
                parser.parse_args([name, "--help"])
            helps.append(capsys.readouterr().out)
        assert helps[0] == helps[1] and "usage: tpu-registry " + name in helps[0]
    with pytest.raises(SystemExit):
        cli.build_parser(only="detect").parse_args(["detect", "--heads", "8"])
    assert "unrecognized arguments: --heads" in capsys.readouterr().err


def test_no_error_prints_a_placeholder_field():
    assert str(Problem("detection", None, "", "cannot resolve")) == "detection: cannot resolve"
    assert str(Problem("f.toml", 3, "", "bad")) == "f.toml:3: bad"
    assert str(Problem("f.toml", 3, "id", "bad", "fix")) == "f.toml:3: id: bad (fix)"
    r = _cli("detect", env={"TPU_REGISTRY_GENERATION": "v99"})
    assert r.returncode == 2 and "(file)" not in r.stderr


def test_hf_config_max_model_len_rule_is_documented():
    help_text = " ".join(_cli("resolve", "--help").stdout.split())
    assert "capped at 8192 (else 2048)" in help_text
    readme = " ".join((HARDWARE.parent / "README.md").read_text().split())
    assert "capped at 8192" in readme and "2048" in readme


def test_builtin_catalog_is_within_the_sane_ranges():
    """The ranges refuse slips, not the real chips: every shipped file validates."""
    assert len(load_catalog([], plugins=False)) == len(list(builtin_hardware_dir().glob("*.toml")))
    assert MAX_FILE_BYTES < MAX_HF_CONFIG_BYTES


# ---------------------------------------------------------------------------------------------
# SECURITY.md: every promise names a test that exists
# ---------------------------------------------------------------------------------------------

_NODE = re.compile(r"`((?:tests|plugins)/[\w./-]+\.py)::(\w+)`")


def _promises(text: str) -> list[str]:
    """Each list item, and each paragraph with a bold claim, of the sections before
    'Reporting a vulnerability' (the table of sources is a list of who sets what, not a
    promise)."""
    body = text.split("## Reporting a vulnerability")[0]
    out = []
    for para in re.split(r"\n\s*\n", body):
        if para.lstrip().startswith(("#", "|")):
            continue
        items = re.split(r"\n(?=- )", para)
        if items[0].lstrip().startswith("- "):
            out += items
        elif "**" in para:
            out.append(para)
    return out


def test_security_promises_name_existing_tests():
    text = (HARDWARE.parent / "SECURITY.md").read_text()
    promises = _promises(text)
    assert len(promises) >= 18
    unnamed = [p[:80] for p in promises if not _NODE.search(p)]
    assert unnamed == []
    missing = []
    for path, name in _NODE.findall(text):
        source = (HARDWARE.parent / path).read_text()
        if not re.search(rf"^def {name}\(", source, re.M):
            missing.append(f"{path}::{name}")
    assert missing == [] and len(_NODE.findall(text)) >= 30


def test_overrides_doc_lists_every_match_field_and_the_reading_rules():
    doc = (HARDWARE.parent / "docs" / "overrides.md").read_text()
    listed = re.search(r"\*\*`match`\*\* keys are workload fields \((.*?)\);", doc, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(overrides_mod.WORKLOAD_FIELDS)
    flat = " ".join(doc.split())
    assert "a regular file only" in flat and "never skipped" in flat
    assert f"at most {MAX_FILE_BYTES // (1024 * 1024)} MiB" in flat


def test_a_long_typed_name_is_quoted_short_in_errors():
    huge = "v6e-" + "5" * 5000
    r = _cli("detect", "--simulate", huge)
    shown = f"{huge[:60]}...(5004 characters)"
    assert (r.returncode, r.stderr) == (
        2,
        f"error: --simulate: explicit generation {shown!r} names no generation (use an id from "
        "`tpu-registry list`)\n",
    )


def test_a_fifo_in_a_fake_sysfs_tree_is_no_evidence(tmp_path):
    from conftest import make_sysfs

    root = make_sysfs(tmp_path, [(0x1AE0, 0x006F, None)])
    dev = next((root / "sys" / "bus" / "pci" / "devices").iterdir())
    (dev / "device").unlink()
    os.mkfifo(dev / "device")  # a read would block forever
    d = detect(env={}, sysfs_root=root)
    assert d.generation is None and d.findings == ()


def test_the_console_script_exits_with_mains_code_and_frozen_objects(monkeypatch):
    """run() (the console script) exits with main()'s code, its objects frozen so the
    interpreter's last collection skips them; main() itself leaves the collector alone."""
    import gc

    from tpu_registry.version import __version__  # noqa: F401 - imported before the freeze

    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run()
        assert exit_.value.code == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert gc.get_freeze_count() == 0
    from tpu_registry.tomlfile import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tpu-registry": "tpu_registry.cli:run"}
