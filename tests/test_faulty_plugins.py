"""Faulty plugins (issue 7): each is reported with its name and skipped; strict fails the call.

Fake plugins are registered on the real plugin manager (and unregistered after); entry-point
failures use a real distribution (a ``.dist-info`` folder on sys.path) so the real loader
imports them. ``INJECTED`` counts the faults injected (printed by the last test with -s).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import threading
import time
from collections import Counter

import pytest
from conftest import cli_path, disable_plugins

import tpu_registry
from tpu_registry import Layer, Workload, plugins
from tpu_registry.catalog import load_catalog
from tpu_registry.detection import Evidence, Fault, detect
from tpu_registry.errors import DetectionError, Problem, RegistryError, TuningError
from tpu_registry.plugins import get_plugin_manager, get_plugins

resolve_mod = importlib.import_module("tpu_registry.resolution")
resolve = resolve_mod.resolve

WORKLOAD = Workload(num_q_heads=32, num_kv_heads=8, head_dim=128, max_model_len=4096)
INJECTED: list[str] = []
STRICT_HINT = "fix or disable the plugin (TPU_REGISTRY_DISABLE_PLUGINS)"


@pytest.fixture
def register():
    """Register fake plugins on the real manager for one test. (resolve's clear_cache() also
    forgets the manager, and with it these plugins: register after any such call.)"""
    names: list[str] = []

    def add(obj, name: str):
        get_plugin_manager().register(obj, name=name)
        names.append(name)
        INJECTED.append(name)
        return obj

    yield add
    pm = get_plugin_manager()
    for name in names:
        if pm.has_plugin(name):
            pm.unregister(name=name)
    resolve_mod.clear_cache()


def detector(fn, **marks):
    """A plugin object whose tpu_registry_detect is ``fn(context)``."""

    class Plugin:
        @tpu_registry.hookimpl(**marks)
        def tpu_registry_detect(self, context):
            return fn(context)

    return Plugin()


def policy(fn, **marks):
    class Plugin:
        @tpu_registry.hookimpl(**marks)
        def tpu_registry_tune(self, spec, workload, detection):
            return fn(spec, workload, detection)

    return Plugin()


def _env_evidence(monkeypatch):
    """Real evidence from the built-in env detector, so detection has something to decide."""
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-8")


# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------


def _raise(exc):
    def fn(context):
        raise exc

    return fn


DETECTOR_FAULTS = [
    ("raises", _raise(RuntimeError("sensor on fire")), "raised RuntimeError: sensor on fire"),
    (
        "raises_oserror",
        _raise(PermissionError(13, "Permission denied")),
        "raised PermissionError: [Errno 13] Permission denied",
    ),
    ("exits", _raise(SystemExit(3)), "raised SystemExit: 3"),
    ("keyboard", _raise(KeyboardInterrupt()), "raised KeyboardInterrupt: "),
    ("returns_str", lambda c: "v6e", "returned str, not Evidence, a list of Evidence, or None"),
    (
        "returns_dict",
        lambda c: {"kind": "device_kind", "value": "TPU v6 lite"},
        "returned dict, not Evidence, a list of Evidence, or None",
    ),
    (
        "returns_mixed_list",
        lambda c: [Evidence("device_kind", "TPU v6 lite", "fake"), "junk"],
        "returned list, not Evidence, a list of Evidence, or None",
    ),
    (
        "returns_generator",
        lambda c: (e for e in [Evidence("device_kind", "TPU v6 lite", "fake")]),
        "returned generator, not Evidence, a list of Evidence, or None",
    ),
    (
        "unknown_kind",
        lambda c: Evidence("vibes", "v6e", "fake"),
        "reported unknown evidence kind 'vibes' (known: explicit, pci, device_kind, "
        "accelerator_type, machine_type, gke_accelerator, torch_xla_version, generation_number, "
        "topology)",
    ),
]


@pytest.mark.parametrize("name,fn,message", DETECTOR_FAULTS, ids=[d[0] for d in DETECTOR_FAULTS])
def test_faulty_detector_is_reported_and_skipped(name, fn, message, register, monkeypatch):
    _env_evidence(monkeypatch)
    catalog = load_catalog()
    clean = detect(catalog, timeout_s=2)
    plugin = f"faulty_{name}"
    register(detector(fn), plugin)
    d = detect(catalog, timeout_s=2)
    assert Fault(plugin, message, stage="detect") in d.faults
    # The other detectors' answer stands, untouched by the faulty one.
    assert (
        (d.generation, d.status, d.slice_chips)
        == (clean.generation, clean.status, clean.slice_chips)
        == ("v6e", "detected", 8)
    )
    assert d.to_dict()["evidence"] == clean.to_dict()["evidence"]
    with pytest.raises(DetectionError) as info:
        detect(catalog, timeout_s=2, strict=True)
    assert Problem(f"detector {plugin}", None, "", message, STRICT_HINT) in info.value.problems
    with pytest.raises(DetectionError):
        resolve(WORKLOAD, simulate="v6e", strict=True)
    # Not strict: resolve carries on and shows the fault.
    assert (
        Fault(plugin, message, stage="detect") in resolve(WORKLOAD, simulate="v6e").detection.faults
    )


def test_hanging_detector_is_abandoned_after_its_budget(register, monkeypatch):
    _env_evidence(monkeypatch)
    release = threading.Event()
    started = threading.Event()

    def hang(context):
        started.set()
        release.wait(30)  # a detector stuck on a 30 s network call
        return Evidence("device_kind", "TPU v5 lite", "too late")

    register(detector(hang), "faulty_hangs")
    try:
        t0 = time.monotonic()
        d = detect(load_catalog(), timeout_s=0.3)
        elapsed = time.monotonic() - t0
        assert started.is_set()
        assert elapsed < 5, f"detect waited {elapsed:.1f} s for a hung detector"
        assert (
            Fault(
                "faulty_hangs",
                "gave no answer within 0.3 s; "
                "skipped (TPU_REGISTRY_DETECT_TIMEOUT sets the budget)",
                stage="detect",
            )
            in d.faults
        )
        assert (d.generation, d.status) == ("v6e", "detected")  # its late answer is not used
        t0 = time.monotonic()
        with pytest.raises(DetectionError) as info:
            detect(load_catalog(), timeout_s=0.3, strict=True)
        assert time.monotonic() - t0 < 5
        assert info.value.problems[0].path == "detector faulty_hangs"
        # The budget also comes from the environment, as resolve() uses it.
        monkeypatch.setenv("TPU_REGISTRY_DETECT_TIMEOUT", "0.3")
        t0 = time.monotonic()
        cfg = resolve(WORKLOAD, simulate="v6e")
        assert time.monotonic() - t0 < 5
        assert cfg.detection.faults[0].plugin == "faulty_hangs"
    finally:
        release.set()


def test_several_faulty_detectors_at_once(register, monkeypatch):
    _env_evidence(monkeypatch)
    release = threading.Event()
    for name, fn, _ in DETECTOR_FAULTS[:3]:
        register(detector(fn), f"many_{name}")
    register(detector(lambda c: release.wait(30)), "many_hangs")
    try:
        t0 = time.monotonic()
        d = detect(load_catalog(), timeout_s=0.3)
        assert time.monotonic() - t0 < 5
        assert {f.plugin for f in d.faults} >= {
            "many_raises",
            "many_raises_oserror",
            "many_exits",
            "many_hangs",
        }
        assert d.generation == "v6e"
    finally:
        release.set()


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------


def _clean_knobs(simulate: str = "v6e") -> dict:
    resolve_mod.clear_cache()
    out = resolve(WORKLOAD, simulate=simulate).tuning.values()
    resolve_mod.clear_cache()
    return out


V6E_VMEM = 128 * 1024 * 1024
POLICY_FAULTS = [
    ("raises", lambda s, w, d: 1 / 0, "raised ZeroDivisionError: division by zero"),
    ("raises_keyerror", lambda s, w, d: {}["page_size"], "raised KeyError: 'page_size'"),
    ("returns_dict", lambda s, w, d: {"page_size": 32}, "returned dict, not a Layer or None"),
    ("returns_str", lambda s, w, d: "page_size=32", "returned str, not a Layer or None"),
    (
        "layer_knobs_list",
        lambda s, w, d: Layer("faulty_layer_knobs_list", [("page_size", 32)]),
        "returned a Layer whose knobs are a list, not a mapping of knob names to values",
    ),
    (
        "bad_knob_value",
        lambda s, w, d: Layer("faulty_bad_knob_value", {"page_size": "big"}),
        "page_size must be a whole number, got 'big' (write the number without quotes)",
    ),
    (
        "unknown_knob",
        lambda s, w, d: Layer("faulty_unknown_knob", {"pagesize": 32}),
        "unknown knob 'pagesize' (did you mean 'page_size'?)",
    ),
    (
        "bad_tuple",
        lambda s, w, d: Layer(
            "faulty_bad_tuple", {"rpa_v3.d_block_sizes": [1, float("inf"), 1, 1]}
        ),
        "rpa_v3.d_block_sizes must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), "
        "got [1, inf, 1, 1] (write an array of 4 whole numbers)",
    ),
    (
        "vmem_above_core",
        lambda s, w, d: Layer("faulty_vmem_above_core", {"rpa_v3.vmem_limit_bytes": 2 * V6E_VMEM}),
        f"knobs break kernel constraints, layer dropped: rpa_v3.vmem_limit_bytes {2 * V6E_VMEM} "
        f"is above the v6e core VMEM of {V6E_VMEM} bytes (128 MiB)",
    ),
    (
        "page_not_pow2",
        lambda s, w, d: Layer("faulty_page_not_pow2", {"page_size": 48}),
        "page_size 48 is not a power of two [rule page_power_of_two] (use 16, 32, 64, 128 or 256)",
    ),
    (
        "poses_as_overrides",
        lambda s, w, d: Layer("overrides", {"rpa_v3.vmem_limit_bytes": 10**12}),
        "named its layer 'overrides', which is reserved for a built-in layer; skipped",
    ),
    (
        "poses_as_baseline",
        lambda s, w, d: Layer("baseline", {"page_size": 16}),
        "named its layer 'baseline', which is reserved for a built-in layer; skipped",
    ),
]


@pytest.mark.parametrize("name,fn,message", POLICY_FAULTS, ids=[p[0] for p in POLICY_FAULTS])
def test_faulty_policy_is_reported_and_skipped(name, fn, message, register):
    clean = _clean_knobs()
    plugin = f"faulty_{name}"
    register(policy(fn), plugin)
    cfg = resolve(WORKLOAD, simulate="v6e")
    assert Fault(plugin, message, stage="tune") in cfg.tuning.faults
    assert cfg.tuning.values() == clean, "a skipped policy must leave every knob as without it"
    assert plugin not in cfg.tuning.layers
    assert f"policy fault: {plugin}: {message}" in cfg.explain()
    with pytest.raises(TuningError) as info:  # strict is part of the cache key
        resolve(WORKLOAD, simulate="v6e", strict=True)
    assert isinstance(info.value, RegistryError)
    if "kernel constraints" in message:
        # Under strict the constraint itself is the error, blamed on the layer.
        violation = message.split("layer dropped: ")[1]
        [problem] = info.value.problems
        assert (problem.path, problem.field) == (f"layer {plugin}", violation.split(" ")[0])
        assert problem.message.startswith(violation + " [rule ") and problem.hint
    else:
        assert (
            Problem(f"policy {plugin}", None, "", message, STRICT_HINT + ", or drop strict")
            in info.value.problems
        )


def test_faulty_policy_from_cli_is_shown_not_fatal(register, capsys):
    from tpu_registry import cli

    register(policy(lambda s, w, d: 1 / 0), "faulty_cli")
    args = ["resolve", "--simulate", "v6e", "--heads", "32", "--kv-heads", "8", "--head-dim", "128"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "policy fault: faulty_cli: raised ZeroDivisionError: division by zero" in out
    assert cli.main([*args, "--strict"]) == 2
    out, err = capsys.readouterr()
    assert (
        "error: policy faulty_cli: raised ZeroDivisionError: division by zero" in err
        and "Traceback" not in out + err
    )


def test_well_behaved_policy_next_to_faulty_ones_still_applies(register):
    register(policy(lambda s, w, d: 1 / 0), "faulty_next_raises")
    register(policy(lambda s, w, d: Layer("good", {"page_size": 32})), "good")
    cfg = resolve(WORKLOAD, simulate="v6e")
    assert (cfg.value("page_size"), cfg.layer("page_size")) == (32, "good")
    assert [f.plugin for f in cfg.tuning.faults] == ["faulty_next_raises"]
    INJECTED.remove("good")  # not a fault


BAD_KNOB_VALUES = {
    "page_size": [0, -16, 1, 2, 8, 4096, 2**20, 2**40, 48],
    "min_page_size": [0, 3],
    "max_num_seqs_smem": [0, -5],
    "head_dim_padded": [1, 129, 10**6],
    "vmem_limit_bytes": [0, -1, 1, 2**20, 10**15],
    "rpa_v2.vmem_limit_bytes": [1, 10**15],
    "rpa_v3.vmem_limit_bytes": [1, 2**40],
    "rpa_v2.num_kv_pages_per_block": [0, -1, 10**9],
    "rpa_v2.num_queries_per_block": [0, 10**9],
    "rpa_v3.d_block_sizes": [(0, 0, 0, 0), (1, 7, 1, 7), (10**9,) * 4, (1, 16, 1, 32)],
    "rpa_v3.p_block_sizes": [(-1, 16, 1, 16)],
}


def test_no_knob_value_from_a_plugin_fails_a_plain_resolve(register):
    """Whatever a plugin sets, a non-strict resolve answers (dropping its layer when the
    value breaks a kernel constraint), including constraints between two knobs such as a
    VMEM ceiling below the kernels' limits, and page sizes the block sizes must follow."""
    box: dict = {}
    register(policy(lambda s, w, d: Layer("probe", dict(box))), "probe")
    runs = dropped = 0
    for gen in ("v6e", "v5e", "v5p", "tpu7x", "v3"):
        for w in (
            WORKLOAD,
            Workload(32, 8, 128, max_model_len=32768),
            Workload(8, 1, 64, page_size=16, max_num_seqs=8),
        ):
            for knob, values in BAD_KNOB_VALUES.items():
                for value in values:
                    box.clear()
                    box[knob] = value
                    resolve_mod._cache.clear()
                    cfg = resolve(w, simulate=gen)  # never raises
                    runs += 1
                    if cfg.tuning.faults:
                        dropped += 1
                        assert [f.plugin for f in cfg.tuning.faults] == [
                            "probe"
                        ] and "probe" not in cfg.tuning.layers
                    if (
                        "probe" in cfg.tuning.layers
                    ):  # kept: its value is used, or beaten by a more trusted layer
                        k = cfg.knobs[knob]
                        assert (k.layer, k.value) == ("probe", value) or (
                            "probe",
                            value,
                        ) in k.overrode
    INJECTED.remove("probe")
    INJECTED.extend(["knob value breaking a constraint"] * dropped)  # the others were valid values
    print(f"\nknob injections: {runs}, dropped as faults: {dropped}, failed resolves: 0")
    assert dropped > runs // 3


# ---------------------------------------------------------------------------------------------
# Entry points that fail to load (a real distribution on sys.path)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "faulty_tpu_plugins-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: faulty-tpu-plugins\nVersion: 1.2.3\n"
    )
    (info / "entry_points.txt").write_text(
        "[tpu_registry]\n"
        "missing_module = faulty_tpu_no_such_module\n"
        "exploding = faulty_tpu_exploding\n"
        "missing_attr = faulty_tpu_ok:nothing_here\n"
        "working = faulty_tpu_ok\n"
    )
    (site / "faulty_tpu_exploding.py").write_text('raise RuntimeError("import-time failure")\n')
    (site / "faulty_tpu_ok.py").write_text(
        "import tpu_registry\n\n\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_detect(context):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(site))
    for mod in ("faulty_tpu_ok", "faulty_tpu_exploding"):
        monkeypatch.delitem(__import__("sys").modules, mod, raising=False)
    plugins.reset()
    INJECTED.extend(["missing_module", "exploding", "missing_attr"])
    yield site
    plugins.reset()


LOAD_FAULTS = [
    (
        "missing_module",
        "failed to load: ModuleNotFoundError: No module named 'faulty_tpu_no_such_module'",
    ),
    ("exploding", "failed to load: RuntimeError: import-time failure"),
    (
        "missing_attr",
        "failed to load: AttributeError: module 'faulty_tpu_ok' has no attribute 'nothing_here'",
    ),
]


def test_entry_point_that_fails_to_import_is_reported_not_fatal(fake_distribution, monkeypatch):
    get_plugin_manager()
    assert sorted((f.plugin, f.message) for f in plugins.get_plugins().load_faults) == sorted(
        LOAD_FAULTS
    )
    info = {p.name: p for p in get_plugins().describe()}
    assert info["working"].kind == "entry point"
    assert (info["working"].distribution, info["working"].version) == (
        "faulty-tpu-plugins",
        "1.2.3",
    )
    assert not {"missing_module", "exploding", "missing_attr"} & set(info)
    _env_evidence(monkeypatch)
    d = detect(load_catalog(), timeout_s=2)
    assert d.generation == "v6e"
    assert {(f.plugin, f.message) for f in d.faults} >= set(LOAD_FAULTS)
    with pytest.raises(DetectionError) as err:
        detect(load_catalog(), timeout_s=2, strict=True)
    assert {(p.path, p.message) for p in err.value.problems} >= {
        (f"detector {n}", m) for n, m in LOAD_FAULTS
    }


def test_entry_point_failures_from_the_command_line(fake_distribution):
    env = {**os.environ, "PYTHONPATH": str(fake_distribution)}
    r = subprocess.run(
        [cli_path(), "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr
    data = json.loads(r.stdout)
    assert sorted((f["plugin"], f["message"]) for f in data["load_faults"]) == sorted(LOAD_FAULTS)
    assert {
        "name": "working",
        "kind": "entry point",
        "distribution": "faulty-tpu-plugins",
        "version": "1.2.3",
        "hooks": ["tpu_registry_detect"],
    } in data["plugins"]
    r = subprocess.run(
        [cli_path(), "detect", "--simulate", "v6e", "--strict"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert sorted(r.stderr.splitlines()) == sorted(
        f"error: detector {n}: {m} ({STRICT_HINT})" for n, m in LOAD_FAULTS
    )
    r = subprocess.run(
        [cli_path(), "detect", "--simulate", "v6e"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0
    assert all(f"detector fault: {n}: {m}" in r.stdout for n, m in LOAD_FAULTS)


def test_entry_point_with_a_misspelled_hook_is_named_and_can_be_disabled(tmp_path, monkeypatch):
    """By design (docs/hooks.md) a hook typo fails loudly when the manager is built: our error
    type, naming the hook, and TPU_REGISTRY_DISABLE_PLUGINS gets the user going again."""
    site = tmp_path / "site"
    info = site / "typo_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tpu_registry]\ntypo = faulty_tpu_typo\n")
    (site / "faulty_tpu_typo.py").write_text(
        "import tpu_registry\n\n\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_detekt(context):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(site))
    INJECTED.append("typo")
    plugins.reset()
    try:
        with pytest.raises(RegistryError, match="unknown hook 'tpu_registry_detekt'"):
            get_plugin_manager()
        monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", disable_plugins("typo"))
        assert "typo" not in {p.name for p in get_plugins().describe()}
    finally:
        plugins.reset()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env["TPU_REGISTRY_DISABLE_PLUGINS"] = disable_plugins()
    r = subprocess.run(
        [cli_path(), "plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "tpu_registry_detekt" in r.stderr


def test_zz_report_faults_injected():
    """Prints how many faults this file injected (run with -s); runs last in this file."""
    print(f"\nfaults injected: {len(INJECTED)}: {dict(Counter(INJECTED))}")
