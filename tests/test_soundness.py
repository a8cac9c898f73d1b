"""Sound resolution: every config the registry hands out passes the kernel and page rules;
derived knobs follow the winners; bad overrides are refused by `validate` and `resolve` alike."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO, SHAPE, run_cli

import tpu_registry
from tpu_registry import Layer, Workload, kernels, plan, resolve
from tpu_registry.catalog import load_catalog
from tpu_registry.errors import CatalogError, RegistryError, TuningError
from tpu_registry.plugins import get_plugin_manager
from tpu_registry.resolution import clear_cache

V6E = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
# V6E's changes for a DeepSeek-V2-shaped MLA workload
MLA = dict(num_kv_heads=1, head_dim=576, kv_lora_rank=512, qk_rope_head_dim=64)


def overrides(tmp_path: Path, knobs: str, generation: str = "v6e", match: str = "") -> Path:
    # A new file each time: an edited file is seen within a second, by design (tested below)
    f = tmp_path / f"overrides-{len(list(tmp_path.glob('overrides-*.toml')))}.toml"
    text = f'schema_version = 1\n\n[[override]]\ngeneration = "{generation}"\n'
    text += f"match = {{ {match} }}\n" if match else ""
    f.write_text(text + f"[override.knobs]\n{knobs}\n")
    return f


# ------------------------------------------------------------------------ the table


def test_overridden_page_size_derives_sequences_per_smem(tmp_path):
    f = overrides(tmp_path, "page_size = 128")
    cfg = resolve(Workload(**V6E, max_model_len=32768), simulate="v6e", overrides=f)
    # 1 MiB of SMEM, half for block tables, 4 bytes per page, 32768 / 128 = 256 pages each
    assert cfg.value("max_num_seqs_smem") == 1024 * 1024 // 2 // 256 // 4 == 512
    assert cfg.knobs["max_num_seqs_smem"].derived_from == (("page_size", "overrides"),)
    assert (
        "max_num_seqs_smem = 512  [baseline; derived from page_size [overrides]]" in cfg.explain()
    )


# The console-script halves of these tests are tests of their own: they call the registry only
# in a subprocess, so `make mutate` does not run them for every mutant (docs/mutation.md).
def test_cli_explain_says_a_knob_derives_from_the_overridden_page(tmp_path):
    f = overrides(tmp_path, "page_size = 128")
    r = run_cli(
        "resolve",
        "--simulate",
        "v6e",
        *SHAPE,
        "--max-model-len",
        "32768",
        "--overrides",
        str(f),
        "--explain",
    )
    assert r.returncode == 0 and "derived from page_size [overrides]" in r.stdout


def test_page_below_the_smem_minimum_is_refused(tmp_path):
    f = overrides(tmp_path, "page_size = 16")
    w = Workload(**V6E, max_model_len=131072)
    with pytest.raises(TuningError) as e:
        resolve(w, simulate="v6e", overrides=f)
    # The page alone is reported: nothing computed for another page is blamed on it.
    assert str(e.value) == (
        "layer overrides: page_size: page_size 16 is below the SMEM minimum page 256 for "
        "max_model_len 131072 and max_num_seqs 256 on v6e [rule page_smem_minimum] "
        "(use a page of at least 256, or lower max_num_seqs)"
    )


def test_cli_refuses_a_page_below_the_smem_minimum_in_every_format(tmp_path):
    f = overrides(tmp_path, "page_size = 16")
    for fmt in ("vllm", "json", "text"):
        r = run_cli(
            "resolve",
            "--simulate",
            "v6e",
            *SHAPE,
            "--max-model-len",
            "131072",
            "--overrides",
            str(f),
            "--format",
            fmt,
        )
        assert (
            r.returncode == 2 and "--block-size" not in r.stdout and "page_smem_minimum" in r.stderr
        )


def test_cli_refuses_a_huge_page_size_with_the_bound():
    r = run_cli("resolve", "--simulate", "v6e", *SHAPE, "--page-size", str(2**40))
    assert r.returncode == 2
    assert r.stderr == (
        "error: workload: page_size: 1099511627776 is above 2048, the most a sequence of "
        "max_model_len 2048 needs (use a page of at most 2048)\n"
    )


def test_huge_page_sizes_are_refused_with_the_bound(tmp_path):
    with pytest.raises(TuningError) as e:
        resolve(Workload(**V6E, page_size=2**40), simulate="v6e")
    assert str(e.value) == (
        "workload: page_size: 1099511627776 is above 2048, the most a sequence of "
        "max_model_len 2048 needs (use a page of at most 2048)"
    )
    f = overrides(tmp_path, f"page_size = {2**40}")
    with pytest.raises(TuningError, match=r"page_size 1099511627776 is out of range 1\.\.65536"):
        resolve(Workload(**V6E), simulate="v6e", overrides=f)
    plugin = type(
        "Huge",
        (),
        {
            "tpu_registry_tune": tpu_registry.hookimpl(
                lambda self: Layer("huge", {"page_size": 2**40})
            )
        },
    )()
    get_plugin_manager().register(plugin, name="huge")
    try:
        cfg = resolve(Workload(**V6E), simulate="v6e")
    finally:
        get_plugin_manager().unregister(name="huge")
    assert cfg.layer("page_size") == "baseline"
    assert [(f.plugin, f.message) for f in cfg.tuning.faults] == [
        (
            "huge",
            "page_size 1099511627776 is out of range 1..65536 [rule knob_range] "
            "(check the value and its unit)",
        )
    ]


def test_a_common_vmem_ceiling_lowers_each_family_limit(tmp_path):
    f = overrides(tmp_path, "vmem_limit_bytes = 67108864")
    cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)
    for family in ("rpa_v2", "rpa_v3"):
        k = cfg.knobs[f"{family}.vmem_limit_bytes"]
        assert (k.value, k.layer, k.derived_from) == (
            67108864,
            "baseline",
            (("vmem_limit_bytes", "overrides"),),
        )
    # The same layer setting both inconsistently is its own contradiction: an error.
    f = overrides(tmp_path, 'vmem_limit_bytes = 67108864\n"rpa_v3.vmem_limit_bytes" = 100663296')
    with pytest.raises(
        TuningError,
        match=r"rpa_v3.vmem_limit_bytes 100663296 is above vmem_limit_bytes 67108864 "
        r"\[rule vmem_within_ceiling\]",
    ):
        resolve(Workload(**V6E), simulate="v6e", overrides=f)


def test_a_family_limit_equal_to_the_ceiling_is_left_alone(tmp_path):
    """Only a family limit above the common ceiling follows it (v6e's RPA v2 limit is
    120 MiB, its v3 limit the whole 128 MiB core)."""
    f = overrides(tmp_path, "vmem_limit_bytes = 125829120")
    cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)
    v2, v3 = cfg.knobs["rpa_v2.vmem_limit_bytes"], cfg.knobs["rpa_v3.vmem_limit_bytes"]
    assert (v2.value, v2.layer, v2.derived_from) == (125829120, "baseline", ())
    assert (v3.value, v3.derived_from) == (125829120, (("vmem_limit_bytes", "overrides"),))


def test_a_lowered_ceiling_refits_the_baseline_block_sizes(tmp_path):
    """The user's 16 MiB ceiling lowers the RPA v3 limit, and upstream's block sizes (which
    need 19-30 MB by upstream's estimate) shrink to fit it: query blocks halve first (p and m:
    256 -> 64, 14.7 MB; 128 would need 19.9 MB), then KV blocks in whole pages (d: 2048 ->
    1024 tokens, 9.5 MB)."""
    limit = 16 * 2**20
    f = overrides(tmp_path, f"vmem_limit_bytes = {limit}")
    w = Workload(**V6E)
    cfg = resolve(w, simulate="v6e", overrides=f)
    want = {"d": (1, 1024, 1, 1024), "p": (64, 1024, 64, 512), "m": (64, 1024, 64, 512)}
    for case, blocks in want.items():
        k = cfg.knobs[f"rpa_v3.{case}_block_sizes"]
        assert (k.value, k.layer, k.derived_from) == (
            blocks,
            "baseline",
            (("rpa_v3.vmem_limit_bytes", "overrides"),),
        )
        assert kernels.rpa_v3_vmem_bytes(w, blocks[0], blocks[1]) <= limit
    assert not cfg.tuning.faults
    # A ceiling below one page of KV leaves upstream's blocks as they are, and refused.
    f = overrides(tmp_path, "vmem_limit_bytes = 1048576")
    with pytest.raises(TuningError) as e:
        resolve(w, simulate="v6e", overrides=f)
    assert [p.message.rsplit("[rule ", 1)[1] for p in e.value.problems] == [
        "rpa_v3_vmem_estimate]"
    ] * 3
    # The user's own block sizes are never refitted: too large for their own ceiling, an error.
    f = overrides(
        tmp_path, f'vmem_limit_bytes = {limit}\n"rpa_v3.d_block_sizes" = [1, 2048, 1, 2048]'
    )
    with pytest.raises(TuningError) as e:
        resolve(w, simulate="v6e", overrides=f)
    assert str(e.value) == (
        "layer overrides: rpa_v3.d_block_sizes: rpa_v3.d_block_sizes (1, 2048, 1, 2048) needs "
        "18956288 bytes of VMEM, above rpa_v3.vmem_limit_bytes 16777216 [rule "
        "rpa_v3_vmem_estimate] (use smaller blocks or a larger VMEM limit)"
    )


def test_a_lowered_ceiling_refits_the_hd64_fallback_blocks(tmp_path, monkeypatch):
    """The head-dim-64 kernel's limit follows the user's 2.25 MiB ceiling, and its fallback
    blocks (16 pages of 128 tokens, 32 queries: 2752512 bytes by the estimate worked out for
    HD64_FITS, 1024 a KV token and 20480 a query) halve their queries to 8 (2260992 bytes)."""
    limit = 2359296
    f = overrides(tmp_path, f"vmem_limit_bytes = {limit}")
    # With the tables policy on, its measured row (the same 16 pages, 32 queries) no longer
    # fits: the tables layer is dropped, and said so; the baseline's blocks are refit.
    cfg = resolve(Workload(8, 2, 64), simulate="v6e", overrides=f)
    assert cfg.tuning.layers == ("overrides", "baseline")
    assert [(x.plugin, x.message) for x in cfg.tuning.faults] == [
        (
            "tables",
            "knobs break kernel constraints, layer dropped: rpa_v3_hd64 blocks of 16 pages and "
            "32 queries need 2752512 bytes of VMEM, above rpa_v3_hd64.vmem_limit_bytes 2359296",
        )
    ]
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "overrides")  # the fallback, not a table row
    cfg = resolve(Workload(8, 2, 64), simulate="v6e", overrides=f)
    hd64 = {n: cfg.knobs[n] for n in kernels.HD64_KNOBS + ("rpa_v3_hd64.vmem_limit_bytes",)}
    via_limit = (("rpa_v3_hd64.vmem_limit_bytes", "overrides"),)
    assert {n: (k.value, k.layer, k.derived_from) for n, k in hd64.items()} == {
        "rpa_v3_hd64.num_kv_pages_per_block": (16, "baseline", via_limit),
        "rpa_v3_hd64.num_queries_per_block": (8, "baseline", via_limit),
        "rpa_v3_hd64.vmem_limit_bytes": (limit, "baseline", (("vmem_limit_bytes", "overrides"),)),
    }
    assert not cfg.tuning.faults
    # The family's own limit, set by the user, is not a lowered ceiling: the blocks are not
    # refit behind the user's back, and the rule names the user's layer.
    f = overrides(tmp_path, f'"rpa_v3_hd64.vmem_limit_bytes" = {limit}')
    with pytest.raises(TuningError) as e:
        resolve(Workload(8, 2, 64), simulate="v6e", overrides=f)
    assert str(e.value) == (
        "layer overrides: rpa_v3_hd64.num_kv_pages_per_block: rpa_v3_hd64 blocks of 16 pages "
        "and 32 queries need 2752512 bytes of VMEM, above rpa_v3_hd64.vmem_limit_bytes 2359296 "
        "[rule rpa_v3_hd64_vmem_estimate] (use smaller blocks or a larger VMEM limit)"
    )


def test_a_plugin_layer_contradicting_its_own_ceiling_is_dropped(tmp_path):
    """A family limit above the common ceiling that the same layer set is that layer's
    contradiction (dropped), whatever the layer's rank."""
    from tpu_registry import hookimpl

    class Mine:
        @hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            knobs = {"vmem_limit_bytes": 2**26, "rpa_v3.vmem_limit_bytes": 3 * 2**25}
            return Layer("mine", knobs)

    f = overrides(tmp_path, "head_dim_padded = 256")  # a more trusted layer above "mine"
    pm = get_plugin_manager()
    pm.register(Mine(), name="mine")
    try:
        cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)
    finally:
        pm.unregister(name="mine")
    assert cfg.tuning.layers == ("overrides", "baseline")
    assert [(f.plugin, f.message) for f in cfg.tuning.faults] == [
        (
            "mine",
            "knobs break kernel constraints, layer dropped: rpa_v3.vmem_limit_bytes 100663296 "
            "is above vmem_limit_bytes 67108864",
        )
    ]


def test_a_layer_that_sets_the_page_owns_its_page_dependent_knobs(tmp_path):
    """Knobs set by the layer whose page won are that layer's own choice, not derived from
    its page; those of less trusted layers (the baseline's) are."""
    from tpu_registry import hookimpl

    class Mine:
        @hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("mine", {"page_size": 64, "rpa_v2.num_kv_pages_per_block": 4})

    f = overrides(tmp_path, "head_dim_padded = 256")  # a more trusted layer above "mine"
    pm = get_plugin_manager()
    pm.register(Mine(), name="mine")
    try:
        cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)
    finally:
        pm.unregister(name="mine")
    assert cfg.tuning.layers == ("overrides", "mine", "baseline")
    own = cfg.knobs["rpa_v2.num_kv_pages_per_block"]
    assert (own.value, own.layer, own.derived_from) == (4, "mine", ())
    derived = cfg.knobs["rpa_v3.p_block_sizes"]
    assert (derived.layer, derived.derived_from) == ("baseline", (("page_size", "mine"),))


@pytest.mark.parametrize(
    ("knob", "suggestion"),
    [
        ('"rpa_v3.d_block_size" = [1, 1024, 1, 1024]', "rpa_v3.d_block_sizes"),
        ('"rpa_v2.num_kv_page_per_block" = 8', "rpa_v2.num_kv_pages_per_block"),
    ],
)
def test_near_miss_knob_names_are_errors_with_a_suggestion(tmp_path, knob, suggestion):
    f = overrides(tmp_path, knob)
    with pytest.raises(TuningError) as e:
        resolve(Workload(**V6E), simulate="v6e", overrides=f)
    assert str(e.value).endswith(f"(did you mean {suggestion!r}?)") and f"{f}:6:" in str(e.value)
    r = run_cli("validate", str(f))
    assert r.returncode == 2 and f"did you mean {suggestion!r}" in r.stderr


@pytest.mark.parametrize(
    "knob",
    [
        '"rpa_v3.p_block_sizes" = "256, 1024, 128, 512"',
        "[override.knobs.rpa_v3]\nd_block_sizes = [1, 1024, 1, 1024]",
        "rpa_v3.d_block_sizes = [1, 1024, 1, 1024]",
    ],
    ids=["tuple-as-string", "nested-table", "unquoted-dotted-key"],
)
def test_strings_for_tuples_and_nested_tables_are_refused(tmp_path, knob):
    f = overrides(tmp_path, knob)
    with pytest.raises(TuningError):
        resolve(Workload(**V6E), simulate="v6e", overrides=f)
    assert run_cli("validate", str(f)).returncode == 2


def test_a_plugin_tuple_given_as_a_string_is_a_fault():
    plugin = type(
        "S",
        (),
        {
            "tpu_registry_tune": tpu_registry.hookimpl(
                lambda self: Layer("s", {"rpa_v3.p_block_sizes": "256,1024,128,512"})
            )
        },
    )()
    get_plugin_manager().register(plugin, name="s")
    try:
        cfg = resolve(Workload(**V6E), simulate="v6e")
    finally:
        get_plugin_manager().unregister(name="s")
    assert [(f.plugin, f.message, f.stage) for f in cfg.tuning.faults] == [
        (
            "s",
            "rpa_v3.p_block_sizes must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got "
            "'256,1024,128,512' (write an array: [bq_sz, bkv_sz, bq_csz, bkv_csz])",
            "tune",
        )
    ]
    assert "s" not in cfg.tuning.layers


@pytest.mark.parametrize(
    "knob",
    [
        '"rpa_v3.m_block_sizes" = [256, -1024, 128, 512]',
        f'"rpa_v3.m_block_sizes" = [256, {2**40}, 128, 512]',
        "page_size = 48",
        '"rpa_v3.p_block_sizes" = [256, 1024, 96, 512]',
    ],
)
def test_validate_refuses_what_resolve_refuses(tmp_path, knob):
    f = overrides(tmp_path, knob)
    with pytest.raises(TuningError) as e:
        resolve(Workload(**V6E), simulate="v6e", overrides=f)
    r = run_cli("validate", str(f))
    assert r.returncode == 2 and r.stderr.splitlines() == [f"{p}" for p in e.value.problems]


def test_an_overrides_file_with_no_entries_is_valid(tmp_path):
    f = tmp_path / "empty.toml"
    f.write_text("schema_version = 1\n")
    r = run_cli("validate", str(f))
    assert (r.returncode, r.stderr) == (0, "") and r.stdout.strip().endswith(" checked, 0 problems")
    cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)
    assert cfg.tuning.layers == ("baseline",)


def test_the_baseline_is_essential(monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "tables")
    cfg = resolve(Workload(**V6E), simulate="v6e")
    assert cfg.layer("page_size") == "baseline" and "baseline" in cfg.tuning.layers
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "")
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", "baseline")
    with pytest.raises(
        RegistryError,
        match="TPU_REGISTRY_DISABLE_PLUGINS names 'baseline', which is essential and cannot be "
        "disabled",
    ):
        resolve(Workload(**V6E), simulate="v6e")


def test_a_baseline_that_fails_stops_the_resolve(monkeypatch):
    """The baseline raising (a bug: it is built in) is not a plugin fault to go on without:
    nothing else sets the page size, so the resolve fails and says the baseline did not run."""
    from tpu_registry.policies import baseline

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(baseline, "knobs_for", broken)
    with pytest.raises(TuningError) as e:
        resolve(Workload(**V6E), simulate="v6e")
    assert str(e.value) == "the baseline policy did not run: it is essential and cannot be disabled"


def test_cli_keeps_the_baseline_whatever_the_environment_asks(monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "tables")
    r = run_cli("resolve", "--simulate", "v6e", *SHAPE, "--format", "vllm")
    assert r.returncode == 0 and "--block-size 128" in r.stdout and "None" not in r.stdout
    monkeypatch.setenv("TPU_REGISTRY_POLICIES", "")
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", "baseline")
    for fmt in ("json", "vllm"):
        r = run_cli("resolve", "--simulate", "v6e", *SHAPE, "--format", fmt)
        assert r.returncode == 2 and "essential" in r.stderr
        if fmt == "vllm":
            assert r.stdout == ""
        else:  # JSON output asked for: the error is JSON too (README, "Errors as JSON")
            error = json.loads(r.stdout)["error"]
            assert (error["type"], error["exit"]) == ("RegistryError", 2)
            assert "essential" in error["problems"][0]["message"]


def test_mla_models_get_the_mla_kernel_and_its_cache(tmp_path):
    """DeepSeek-V2-Lite's config.json: one latent of 512 + 64 per token, the MLA kernel's
    knobs (no RPA knob), the MLA backend's page of 1024 and a cache row of 640 lanes."""
    path = REPO / "tests" / "data" / "hf" / "deepseek-v2-lite.json"
    config = json.loads(path.read_text())
    assert config["kv_lora_rank"] == 512 and config["qk_rope_head_dim"] == 64
    w = Workload.from_hf_config(path)
    assert (w.num_q_heads, w.num_kv_heads, w.head_dim) == (config["num_attention_heads"], 1, 576)
    cfg = resolve(w, simulate="v6e")
    assert cfg.value("page_size") == 1024
    assert not [k for k in cfg.knobs if k.startswith("rpa_")]
    assert cfg.value("mla_v2.decode_batch_size") == 4  # get_tuned_params' fallback
    assert cfg.value("mla_v2.mixed_queries_per_block") == 16
    assert cfg.value("mla_v2.vmem_limit_bytes") == 128 * 2**20  # the core's VMEM
    p = plan(cfg)
    assert p.layouts == ("tpu_inference",)
    assert p.kv_cache_shape("tpu_inference", 10) == (10, 1024 // 32, 32, 640)
    assert p.kv_bytes_per_token("tpu_inference") == 640 * 2
    assert p.kernel_kwargs("mla_v2")["num_kv_pages_per_block"] == (3, 1, 1)
    with pytest.raises(ValueError, match="MLA has no vllm_pallas KV cache"):
        p.kv_cache_shape("vllm_pallas", 10)


def test_cli_resolves_an_mla_config_to_the_mla_knobs():
    path = REPO / "tests" / "data" / "hf" / "deepseek-v2-lite.json"
    r = run_cli("resolve", "--simulate", "v6e", "--hf-config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    w = out["workload"]
    assert (w["num_q_heads"], w["num_kv_heads"], w["head_dim"]) == (16, 1, 576)
    knobs = out["knobs"]
    assert knobs["page_size"]["value"] == 1024
    assert not [k for k in knobs if k.startswith("rpa_")]
    assert knobs["mla_v2.decode_batch_size"]["value"] == 4
    assert knobs["mla_v2.mixed_queries_per_block"]["value"] == 16
    assert knobs["mla_v2.vmem_limit_bytes"]["value"] == 128 * 2**20


def test_mla_and_sinks_workloads_are_checked():
    mla = dict(num_q_heads=16, num_kv_heads=1, kv_lora_rank=512, qk_rope_head_dim=64)
    assert Workload(head_dim=576, **mla).is_mla
    with pytest.raises(TuningError, match="kv_lora_rank \\+ qk_rope_head_dim = 576"):
        Workload(head_dim=512, **mla)
    with pytest.raises(TuningError, match="needs both kv_lora_rank and qk_rope_head_dim"):
        Workload(16, 1, 576, kv_lora_rank=512)
    with pytest.raises(TuningError, match="use num_kv_heads 1"):
        Workload(16, 16, 576, kv_lora_rank=512, qk_rope_head_dim=64)
    with pytest.raises(TuningError, match="attention sinks need head_dim 64"):
        Workload(8, 2, 128, attention_sinks=True)
    # tensor parallelism does not split MLA heads (tpu-inference runs MLA data-parallel)
    w = Workload(head_dim=576, tensor_parallel=8, **mla)
    assert (w.q_heads_per_device, w.kv_heads_per_device) == (16, 1)


def test_head_dim_64_and_sinks_select_the_hd64_kernel():
    from tpu_registry.kernels import families_for

    spec = load_catalog()["v6e"]
    assert families_for(spec, Workload(32, 8, 128)) == ("rpa_v2", "rpa_v3")
    assert families_for(spec, Workload(32, 8, 64)) == ("rpa_v2", "rpa_v3_hd64")
    assert families_for(spec, Workload(64, 8, 64, attention_sinks=True)) == ("rpa_v3_hd64",)
    mla = Workload(16, 1, 576, kv_lora_rank=512, qk_rope_head_dim=64)
    assert families_for(spec, mla) == ("mla_v2",)
    assert families_for(load_catalog()["v4"], mla) == ()
    gpt_oss = REPO / "tests" / "data" / "hf" / "gpt-oss-20b.json"
    w = Workload.from_hf_config(gpt_oss)
    assert (w.head_dim, w.attention_sinks, w.sliding_window) == (64, True, 128)
    assert "sliding window 128, attention sinks" in resolve(w, simulate="v6e").explain()


def test_a_resolved_config_is_read_only():
    cfg = resolve(Workload(**V6E), simulate="v6e")
    with pytest.raises(TypeError):
        cfg.knobs["page_size"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        cfg.knobs["page_size"].value = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.tuning.knobs._data = {}  # type: ignore[attr-defined]
    assert resolve(Workload(**V6E), simulate="v6e").value("page_size") == 128


def test_edited_files_are_seen_within_a_second(tmp_path, monkeypatch):
    f = overrides(tmp_path, "page_size = 64")
    w = Workload(**V6E)
    assert resolve(w, simulate="v6e", overrides=f).value("page_size") == 64
    f.write_text(f.read_text().replace("page_size = 64", "page_size = 32"))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # a visibly newer mtime
    time.sleep(1.05)
    assert resolve(w, simulate="v6e", overrides=f).value("page_size") == 32
    f.write_text(f.read_text().replace("page_size = 32", "page_size = 16"))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    clear_cache()  # forces it at once
    assert resolve(w, simulate="v6e", overrides=f).value("page_size") == 16


def test_a_broken_generation_file_fails_only_what_uses_it(tmp_path, caplog):
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "v97.toml").write_text('schema_version = 1\nid = "v97"\nname = "broken"\n')
    w = Workload(**V6E)
    with pytest.raises(CatalogError, match="v97.toml"):
        load_catalog([folder])  # list/show/validate stay strict
    cfg = resolve(w, simulate="v6e", catalog_dirs=(folder,))
    assert cfg.generation == "v6e"
    assert any("v97.toml" in n and "left out of the catalog" in n for n in cfg.notes)
    assert any("v97.toml is invalid and was left out" in r.getMessage() for r in caplog.records)
    with pytest.raises(CatalogError, match="v97.toml"):
        resolve(w, simulate="v97", catalog_dirs=(folder,))


def test_cli_warns_of_a_broken_generation_file_it_does_not_use(tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "v97.toml").write_text('schema_version = 1\nid = "v97"\nname = "broken"\n')
    r = run_cli("resolve", "--simulate", "v5e", *SHAPE, "--catalog", str(folder))
    assert r.returncode == 0 and "warning: catalog file" in r.stderr and "v97.toml" in r.stderr


# ------------------------------------------------------------------------ per-call knobs


def test_per_call_knobs_follow_the_token_bucket_and_the_shard():
    cfg = resolve(Workload(**V6E, max_num_batched_tokens=2048, tensor_parallel=2), simulate="v6e")
    assert cfg.for_call(2048) is cfg
    # upstream: bq_sz = min(1024 // q_per_kv, max_q // 2), bq_csz = min(512 // q_per_kv, max_q)
    for n in (16, 32, 64, 128, 256, 512, 1024):
        call = cfg.for_call(n)
        assert call.workload.num_tokens == n and call.value("page_size") == cfg.value("page_size")
        bq, _, bq_c, _ = call.value("rpa_v3.p_block_sizes")
        assert (bq, bq_c) == (min(1024 // 4, n // 2), min(512 // 4, n))
        assert call.value("rpa_v3.d_block_sizes") == cfg.value("rpa_v3.d_block_sizes")
    shard = cfg.for_call(64, q_heads=8, kv_heads=1)  # 8 q heads per KV head in this shard
    assert shard.value("rpa_v3.p_block_sizes")[0] == min(1024 // 8, 64 // 2)


def test_an_override_can_name_its_bucket(tmp_path):
    f = overrides(tmp_path, '"rpa_v3.m_block_sizes" = [16, 512, 16, 256]', match="num_tokens = 16")
    cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)
    assert cfg.layer("rpa_v3.m_block_sizes") == "baseline"
    assert cfg.for_call(16).value("rpa_v3.m_block_sizes") == (16, 512, 16, 256)
    assert cfg.for_call(32).layer("rpa_v3.m_block_sizes") == "baseline"


# ------------------------------------------------------------------------ one case per rule

# (rule, generation, workload changes, knobs, the violation's knob) - each breaks that rule only
RULE_CASES = {
    "page_power_of_two": ("v6e", {}, {"page_size": 48}, "page_size"),
    "knob_range": ("v6e", {}, {"head_dim_padded": 8192}, "head_dim_padded"),
    "page_smem_minimum": ("v6e", {"max_model_len": 131072}, {"page_size": 128}, "page_size"),
    "page_within_sequence": ("v6e", {}, {"page_size": 4096}, "page_size"),
    "page_kv_packing": (
        "v6e",
        {"kv_dtype": "float8_e4m3fn", "max_model_len": 16, "max_num_seqs": 1},
        {"page_size": 2},
        "page_size",
    ),
    "vmem_positive": ("v6e", {}, {"rpa_v3.vmem_limit_bytes": 0}, "rpa_v3.vmem_limit_bytes"),
    "vmem_within_core": ("v6e", {}, {"vmem_limit_bytes": 2**28}, "vmem_limit_bytes"),
    "vmem_within_ceiling": (
        "v6e",
        {},
        {"vmem_limit_bytes": 2**26, "rpa_v3.vmem_limit_bytes": 2**27},
        "rpa_v3.vmem_limit_bytes",
    ),
    "head_padding": ("v6e", {}, {"head_dim_padded": 192}, "head_dim_padded"),
    "rpa_v2_heads_tileable": (
        "v5e",
        {"num_q_heads": 6, "num_kv_heads": 3, "kv_dtype": "float8_e4m3fn"},
        {"page_size": 128, "rpa_v2.num_kv_pages_per_block": 8},
        "rpa_v2.num_kv_pages_per_block",
    ),
    "rpa_v2_kv_pages_in_range": (
        "v5e",
        {},
        {"page_size": 128, "rpa_v2.num_kv_pages_per_block": 17},
        "rpa_v2.num_kv_pages_per_block",
    ),
    "rpa_v2_queries_in_range": (
        "v5e",
        {},
        {"page_size": 128, "rpa_v2.num_queries_per_block": 4096},
        "rpa_v2.num_queries_per_block",
    ),
    "rpa_v3_float_kv": (
        "v6e",
        {"kv_dtype": "int8"},
        {"page_size": 128, "rpa_v3.d_block_sizes": (1, 2048, 1, 2048)},
        "rpa_v3.d_block_sizes",
    ),
    "rpa_v3_block_divisibility": (
        "v6e",
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 1024, 96, 512)},
        "rpa_v3.p_block_sizes",
    ),
    "rpa_v3_kv_page_multiple": (
        "v6e",
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 960, 128, 320)},
        "rpa_v3.p_block_sizes",
    ),
    "rpa_v3_kv_block_bounds": (
        "v6e",
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 4096, 128, 512)},
        "rpa_v3.p_block_sizes",
    ),
    "rpa_v3_q_block_bounds": (
        "v6e",
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (4096, 1024, 128, 512)},
        "rpa_v3.p_block_sizes",
    ),
    "rpa_v3_vmem_estimate": (
        "v6e",
        {},
        {
            "page_size": 128,
            "rpa_v3.vmem_limit_bytes": 2**20,
            "rpa_v3.d_block_sizes": (1, 2048, 1, 2048),
        },
        "rpa_v3.d_block_sizes",
    ),
    "rpa_v3_smem_estimate": (
        "v6e",
        {"max_model_len": 16, "max_num_seqs": 100000},
        {"page_size": 16, "rpa_v3.d_block_sizes": (1, 16, 1, 16)},
        "page_size",
    ),
    "rpa_v3_hd64_float_kv": (
        "v6e",
        {"head_dim": 64, "kv_dtype": "int8"},
        {"page_size": 128, "rpa_v3_hd64.num_kv_pages_per_block": 8},
        "rpa_v3_hd64.num_kv_pages_per_block",
    ),
    "rpa_v3_hd64_blocks_in_range": (
        "v6e",
        {"head_dim": 64},
        {"page_size": 128, "rpa_v3_hd64.num_kv_pages_per_block": 17},
        "rpa_v3_hd64.num_kv_pages_per_block",
    ),
    "rpa_v3_hd64_vmem_estimate": (
        "v6e",
        {"head_dim": 64},
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 16,
            "rpa_v3_hd64.num_queries_per_block": 32,
            "rpa_v3_hd64.vmem_limit_bytes": 2**20,
        },
        "rpa_v3_hd64.num_kv_pages_per_block",
    ),
    "rpa_v3_hd64_smem_estimate": (
        "v6e",
        {"head_dim": 64, "max_model_len": 16, "max_num_seqs": 100000},
        {"page_size": 16, "rpa_v3_hd64.num_kv_pages_per_block": 1},
        "page_size",
    ),
    "mla_v2_float_kv": (
        "v6e",
        {**MLA, "kv_dtype": "int8"},
        {"page_size": 1024, "mla_v2.decode_batch_size": 4},
        "mla_v2.decode_batch_size",
    ),
    "mla_v2_kv_packing": (
        ("v6e", 2),  # a catalog whose MLA kv_packing (2) does not hold whole fp8 words (4)
        {**MLA, "kv_dtype": "float8_e4m3fn"},
        {"page_size": 1024, "mla_v2.decode_batch_size": 4},
        "mla_v2.decode_batch_size",
    ),
    "mla_v2_page_packing": (
        "v6e",
        MLA,
        {"page_size": 16, "mla_v2.decode_batch_size": 4},
        "page_size",
    ),
    "mla_v2_q_split_divides": (
        "v6e",
        MLA,
        {"page_size": 1024, "mla_v2.mixed_queries_per_block": 16, "mla_v2.mixed_q_split": 3},
        "mla_v2.mixed_queries_per_block",
    ),
}


def _spec(gid):
    """A catalog generation, or one with its MLA kv_packing replaced: ``(id, kv_packing)``."""
    if isinstance(gid, str):
        return load_catalog()[gid]
    spec = load_catalog()[gid[0]]
    mla = spec.kernels.mla_v2.model_copy(update={"kv_packing": gid[1]})
    return spec.model_copy(update={"kernels": spec.kernels.model_copy(update={"mla_v2": mla})})


def test_every_rule_has_a_case_and_a_documented_source():
    assert set(RULE_CASES) == set(kernels.RULES)
    doc = (REPO / "docs" / "overrides.md").read_text()
    for rule, text in kernels.RULES.items():
        assert f"| `{rule}` | {text} |" in doc
        assert text.startswith(("registry:", "tpu-inference", "torch_xla", "vLLM"))


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_each_rule_refuses_exactly_its_case(rule):
    gid, changes, knobs, knob = RULE_CASES[rule]
    spec = _spec(gid)
    w = replace(Workload(**V6E), **changes)
    found = kernels.check(spec, w, knobs)
    assert [(v.rule, v.knob) for v in found] == [(rule, knob)], found
    assert (found[0].message, found[0].hint) == RULE_MESSAGES[rule]
    # every knob the rule read, for blame: the reported one first
    assert found[0].knobs == (knob, *RULE_ALSO_READS.get(rule, ()))


RULE_ALSO_READS = {
    "mla_v2_q_split_divides": ("mla_v2.mixed_q_split",),
    "rpa_v3_hd64_vmem_estimate": (
        "rpa_v3_hd64.num_queries_per_block",
        "rpa_v3_hd64.vmem_limit_bytes",
    ),
    "vmem_within_ceiling": ("vmem_limit_bytes",),
    "rpa_v3_kv_page_multiple": ("page_size",),
    "rpa_v3_vmem_estimate": ("rpa_v3.vmem_limit_bytes",),
}


# What each case above is told: the figures the rule computed, and the fix.
RULE_MESSAGES = {
    "head_padding": (
        "head_dim_padded 192 must be at least head_dim 128 and a multiple of 128 lanes",
        "",
    ),
    "knob_range": ("head_dim_padded 8192 is outside its range", "see docs/overrides.md"),
    "page_kv_packing": ("page_size 2 is not a multiple of the float8_e4m3fn packing 4", ""),
    "page_power_of_two": (
        "page_size 48 is not a positive power of two",
        "use 16, 32, 64, 128 or 256",
    ),
    "page_smem_minimum": (
        "page_size 128 is below the SMEM minimum page 256 for max_model_len 131072 and "
        "max_num_seqs 256 on v6e",  # 1 MiB / 2 / 256 sequences / 4 bytes = 512 pages each
        "use a page of at least 256, or lower max_num_seqs",
    ),
    "page_within_sequence": (
        "page_size 4096 is above 2048, the most a sequence of max_model_len 2048 needs",
        "use a page of at most 2048",
    ),
    "rpa_v2_heads_tileable": (
        "rpa_v2.num_kv_pages_per_block: 6 combined KV heads cannot be tiled for float8_e4m3fn",
        "the RPA v2 kernel cannot run this shape",
    ),
    "rpa_v2_kv_pages_in_range": (
        "rpa_v2.num_kv_pages_per_block 17 must be in 1..16 (pages per sequence)",
        "",
    ),
    "rpa_v2_queries_in_range": (
        "rpa_v2.num_queries_per_block 4096 must be in 1..2048 (max batched tokens)",
        "",
    ),
    "rpa_v3_block_divisibility": (
        "rpa_v3.p_block_sizes (256, 1024, 96, 512): bq_sz must be a multiple of bq_csz and "
        "bkv_sz of bkv_csz",
        "",
    ),
    "rpa_v3_float_kv": (
        "rpa_v3.d_block_sizes: the RPA v3 kernel does not take an int8 KV cache",
        "use a floating-point KV dtype (bf16, fp8)",
    ),
    "rpa_v3_kv_block_bounds": (
        "rpa_v3.p_block_sizes (256, 4096, 128, 512): KV blocks must satisfy bkv_csz <= bkv_sz "
        "<= 2048 (tokens per sequence)",
        "",
    ),
    "rpa_v3_kv_page_multiple": (
        "rpa_v3.p_block_sizes (256, 960, 128, 320): KV block sizes must be multiples of "
        "page_size 128",
        "",
    ),
    "rpa_v3_q_block_bounds": (
        "rpa_v3.p_block_sizes (4096, 1024, 128, 512): query blocks must be within 2048 batched "
        "tokens",
        "",
    ),
    "rpa_v3_smem_estimate": (
        # (3 tables of 100096 words + 512) * 4 bytes
        "page_size 16: the RPA v3 kernel's tables take 1203200 bytes of SMEM, above the v6e "
        "core's 1048576",
        "use a larger page or lower max_num_seqs",
    ),
    "rpa_v3_vmem_estimate": (
        "rpa_v3.d_block_sizes (1, 2048, 1, 2048) needs 18956288 bytes of VMEM, above "
        "rpa_v3.vmem_limit_bytes 1048576",
        "use smaller blocks or a larger VMEM limit",
    ),
    "vmem_positive": ("rpa_v3.vmem_limit_bytes 0 is not positive", ""),
    "mla_v2_float_kv": (
        "mla_v2.decode_batch_size: the MLA v2 kernel does not take an int8 KV cache",
        "use a floating-point KV dtype (bf16, fp8)",
    ),
    "mla_v2_kv_packing": (
        "the MLA kv_packing 2 of v6e is not a multiple of the float8_e4m3fn packing 4",
        "fix [kernels.mla_v2] kv_packing",
    ),
    "mla_v2_page_packing": (
        "page_size 16 is not a multiple of the MLA kv_packing 32: the cache rounds each page up "
        "to 32 tokens and the kernel reads pages of that size",
        "use a page that is a multiple of 32",
    ),
    "mla_v2_q_split_divides": (
        "mla_v2.mixed_queries_per_block 16 is not a multiple of mla_v2.mixed_q_split 3",
        "use a query block that the split divides",
    ),
    "rpa_v3_hd64_blocks_in_range": (
        "rpa_v3_hd64.num_kv_pages_per_block 17 must be in 1..16 (pages per sequence)",
        "",
    ),
    "rpa_v3_hd64_float_kv": (
        "rpa_v3_hd64.num_kv_pages_per_block: the head-dim-64 RPA v3 kernel does not take an int8 "
        "KV cache",
        "use a floating-point KV dtype (bf16, fp8)",
    ),
    "rpa_v3_hd64_smem_estimate": (
        "page_size 16: the head-dim-64 RPA v3 kernel's tables take 1203200 bytes of SMEM, above "
        "the v6e core's 1048576",
        "use a larger page or lower max_num_seqs",
    ),
    "rpa_v3_hd64_vmem_estimate": (
        "rpa_v3_hd64 blocks of 16 pages and 32 queries need 11010048 bytes of VMEM, above "
        "rpa_v3_hd64.vmem_limit_bytes 1048576",
        "use smaller blocks or a larger VMEM limit",
    ),
    "vmem_within_ceiling": (
        "rpa_v3.vmem_limit_bytes 134217728 is above vmem_limit_bytes 67108864",
        "use at most 67108864, or raise vmem_limit_bytes",
    ),
    "vmem_within_core": (
        "vmem_limit_bytes 268435456 is above the v6e core VMEM of 134217728 bytes (128 MiB)",
        "use at most 134217728",
    ),
}

# The case of each bounded rule moved one step inside its bound: nothing is refused (the rule
# is a bound, not a ban). (workload changes, knobs)
INSIDE = {
    "page_power_of_two": ({}, {"page_size": 64}),
    "page_smem_minimum": ({"max_model_len": 131072}, {"page_size": 256}),
    "page_within_sequence": ({}, {"page_size": 2048}),
    "page_kv_packing": (
        {"kv_dtype": "float8_e4m3fn", "max_model_len": 16, "max_num_seqs": 1},
        {"page_size": 4},
    ),
    "vmem_positive": ({}, {"rpa_v3.vmem_limit_bytes": 1}),
    "vmem_within_core": ({}, {"vmem_limit_bytes": 2**27}),
    "vmem_within_ceiling": ({}, {"vmem_limit_bytes": 2**26, "rpa_v3.vmem_limit_bytes": 2**26}),
    "head_padding": ({}, {"head_dim_padded": 128}),
    "rpa_v2_heads_tileable": (
        {"num_q_heads": 8, "num_kv_heads": 4, "kv_dtype": "float8_e4m3fn"},
        {"page_size": 128, "rpa_v2.num_kv_pages_per_block": 8},
    ),
    "rpa_v2_kv_pages_in_range": ({}, {"page_size": 128, "rpa_v2.num_kv_pages_per_block": 16}),
    "rpa_v2_queries_in_range": ({}, {"page_size": 128, "rpa_v2.num_queries_per_block": 2048}),
    "rpa_v3_float_kv": ({}, {"page_size": 128, "rpa_v3.d_block_sizes": (1, 2048, 1, 2048)}),
    "rpa_v3_block_divisibility": (
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 1024, 128, 512)},
    ),
    "rpa_v3_kv_page_multiple": (
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 1024, 128, 256)},
    ),
    "rpa_v3_kv_block_bounds": (
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 2048, 128, 2048)},
    ),
    "rpa_v3_q_block_bounds": (
        {},
        {"page_size": 128, "rpa_v3.p_block_sizes": (2048, 1024, 2048, 512)},
    ),
    "rpa_v3_vmem_estimate": (
        {},
        {
            "page_size": 128,
            "rpa_v3.vmem_limit_bytes": 18956288,
            "rpa_v3.d_block_sizes": (1, 2048, 1, 2048),
        },
    ),
    "rpa_v3_smem_estimate": (
        # (87168 + 87168 + 87296 words + 512) * 4 bytes = 1048576: the whole 1 MiB, allowed
        {"max_model_len": 16, "max_num_seqs": 87168},
        {"page_size": 16, "rpa_v3.d_block_sizes": (1, 16, 1, 16)},
    ),
    "rpa_v3_hd64_smem_estimate": (  # the same tables, the same whole 1 MiB
        {"head_dim": 64, "max_model_len": 16, "max_num_seqs": 87168},
        {"page_size": 16, "rpa_v3_hd64.num_kv_pages_per_block": 1},
    ),
    "rpa_v3_hd64_vmem_estimate": (  # exactly the 11010048 bytes its case needs
        {"head_dim": 64},
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 16,
            "rpa_v3_hd64.num_queries_per_block": 32,
            "rpa_v3_hd64.vmem_limit_bytes": 11010048,
        },
    ),
}


@pytest.mark.parametrize("rule", sorted(INSIDE))
def test_one_step_inside_each_bound_passes(rule):
    changes, knobs = INSIDE[rule]
    w = replace(Workload(**V6E), **changes)
    assert kernels.check(load_catalog()["v6e"], w, knobs) == []


# Cases the table above cannot isolate: the kernel's own default tuples skip the checks it
# applies to explicit arguments only, which leaves the registry's bounds on their own.
# (knobs, which are defaults, workload changes, the violations as (rule, knob))
MORE_CASES = {
    "bkv_csz_above_bkv_sz": (
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 512, 128, 1024)},
        {"rpa_v3.p_block_sizes"},
        {},
        [("rpa_v3_kv_block_bounds", "rpa_v3.p_block_sizes")],
    ),
    "bq_csz_above_the_tokens": (
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 1024, 4096, 512)},
        {"rpa_v3.p_block_sizes"},
        {},
        [("rpa_v3_q_block_bounds", "rpa_v3.p_block_sizes")],
    ),
    "a_default_tuple_may_break_divisibility": (
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 1024, 96, 320)},
        {"rpa_v3.p_block_sizes"},
        {},
        [],
    ),
    "no_block_may_be_zero": (
        {"page_size": 128, "rpa_v3.m_block_sizes": (256, 1024, 0, 512)},
        set(),
        {},
        [("rpa_v3_block_divisibility", "rpa_v3.m_block_sizes")],
    ),
    "no_kv_pages": (
        {"page_size": 128, "rpa_v2.num_kv_pages_per_block": 0},
        set(),
        {},
        [("rpa_v2_kv_pages_in_range", "rpa_v2.num_kv_pages_per_block")],
    ),
    "no_queries": (
        {"page_size": 128, "rpa_v2.num_queries_per_block": 0},
        set(),
        {},
        [("rpa_v2_queries_in_range", "rpa_v2.num_queries_per_block")],
    ),
    "a_negative_page": ({"page_size": -64}, set(), {}, [("page_power_of_two", "page_size")]),
    "a_zero_page": ({"page_size": 0}, set(), {}, [("page_power_of_two", "page_size")]),
    "one_query_per_block": ({"page_size": 128, "rpa_v2.num_queries_per_block": 1}, set(), {}, []),
    "untileable_heads_named_by_the_queries_knob": (
        {"page_size": 128, "rpa_v2.num_queries_per_block": 16},
        set(),
        {"num_q_heads": 6, "num_kv_heads": 3, "kv_dtype": "float8_e4m3fn"},
        [("rpa_v2_heads_tileable", "rpa_v2.num_queries_per_block")],
    ),
    "bkv_csz_off_the_page": (
        {"page_size": 128, "rpa_v3.p_block_sizes": (256, 1024, 128, 64)},
        set(),
        {},
        [("rpa_v3_kv_page_multiple", "rpa_v3.p_block_sizes")],
    ),
    "a_zero_block_does_not_hide_the_next_case": (
        {
            "page_size": 128,
            "rpa_v3.d_block_sizes": (0, 128, 1, 128),
            "rpa_v3.p_block_sizes": (4096, 1024, 128, 512),
        },
        set(),
        {},
        [
            ("rpa_v3_block_divisibility", "rpa_v3.d_block_sizes"),
            ("rpa_v3_q_block_bounds", "rpa_v3.p_block_sizes"),
        ],
    ),
    "a_default_is_not_held_to_the_knob_range": (
        {"head_dim_padded": 8192},
        {"head_dim_padded"},
        {},
        [],
    ),
    "a_family_limit_above_the_core_is_not_also_above_the_ceiling": (
        {"vmem_limit_bytes": 2**26, "rpa_v2.vmem_limit_bytes": 2**28},
        set(),
        {},
        [("vmem_within_core", "rpa_v2.vmem_limit_bytes")],
    ),
    "int8_kv_has_no_v3_vmem_estimate": (
        {
            "page_size": 128,
            "rpa_v3.vmem_limit_bytes": 2**20,
            "rpa_v3.d_block_sizes": (1, 2048, 1, 2048),
        },
        set(),
        {"kv_dtype": "int8"},
        [("rpa_v3_float_kv", "rpa_v3.d_block_sizes")],
    ),
    "v3_smem_is_checked_for_the_vmem_knob_alone": (
        {"page_size": 16, "rpa_v3.vmem_limit_bytes": 2**26},
        set(),
        {"max_model_len": 16, "max_num_seqs": 100000},
        [("rpa_v3_smem_estimate", "page_size")],
    ),
    "no_v3_smem_check_without_v3_knobs": (
        {"page_size": 16, "rpa_v2.num_kv_pages_per_block": 1},
        set(),
        {"max_model_len": 16, "max_num_seqs": 100000},
        [],
    ),
    "hd64_one_page_and_one_query": (
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 1,
            "rpa_v3_hd64.num_queries_per_block": 1,
        },
        set(),
        {"head_dim": 64},
        [],
    ),
    "hd64_no_kv_pages": (
        {"page_size": 128, "rpa_v3_hd64.num_kv_pages_per_block": 0},
        set(),
        {"head_dim": 64},
        [("rpa_v3_hd64_blocks_in_range", "rpa_v3_hd64.num_kv_pages_per_block")],
    ),
    "hd64_no_queries": (
        {"page_size": 128, "rpa_v3_hd64.num_queries_per_block": 0},
        set(),
        {"head_dim": 64},
        [("rpa_v3_hd64_blocks_in_range", "rpa_v3_hd64.num_queries_per_block")],
    ),
    "hd64_no_estimate_without_both_blocks": (
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 16,
            "rpa_v3_hd64.vmem_limit_bytes": 2**20,
        },
        set(),
        {"head_dim": 64},
        [],
    ),
    "hd64_zero_limit_is_not_also_estimated": (
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 1,
            "rpa_v3_hd64.num_queries_per_block": 1,
            "rpa_v3_hd64.vmem_limit_bytes": 0,
        },
        set(),
        {"head_dim": 64},
        [("vmem_positive", "rpa_v3_hd64.vmem_limit_bytes")],
    ),
    "hd64_one_byte_limit_is_estimated": (
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 1,
            "rpa_v3_hd64.num_queries_per_block": 1,
            "rpa_v3_hd64.vmem_limit_bytes": 1,
        },
        set(),
        {"head_dim": 64},
        [("rpa_v3_hd64_vmem_estimate", "rpa_v3_hd64.num_kv_pages_per_block")],
    ),
    "page_kv_packing_for_the_hd64_kernel_alone": (  # sinks: only the hd64 kernel runs
        {"page_size": 2},
        set(),
        {
            "head_dim": 64,
            "attention_sinks": True,
            "kv_dtype": "float8_e4m3fn",
            "max_model_len": 16,
            "max_num_seqs": 1,
        },
        [("page_kv_packing", "page_size")],
    ),
    "a_user_page_above_an_mla_sequence": (
        {"page_size": 1024},
        set(),
        {**MLA, "max_model_len": 512},
        [("page_within_sequence", "page_size")],
    ),
    "the_mla_backends_own_page_may_exceed_the_sequence": (
        {"page_size": 1024},
        {"page_size"},
        {**MLA, "max_model_len": 512},
        [],
    ),
    "a_default_page_above_the_sequence_of_another_model": (
        {"page_size": 4096},
        {"page_size"},
        {},
        [("page_within_sequence", "page_size")],
    ),
    "hd64_kv_pages_out_of_range_are_not_also_estimated": (
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 17,
            "rpa_v3_hd64.num_queries_per_block": 1,
            "rpa_v3_hd64.vmem_limit_bytes": 2**20,
        },
        set(),
        {"head_dim": 64},
        [("rpa_v3_hd64_blocks_in_range", "rpa_v3_hd64.num_kv_pages_per_block")],
    ),
    "hd64_queries_out_of_range_are_not_also_estimated": (
        {
            "page_size": 128,
            "rpa_v3_hd64.num_kv_pages_per_block": 1,
            "rpa_v3_hd64.num_queries_per_block": 4096,
            "rpa_v3_hd64.vmem_limit_bytes": 2**20,
        },
        set(),
        {"head_dim": 64},
        [("rpa_v3_hd64_blocks_in_range", "rpa_v3_hd64.num_queries_per_block")],
    ),
    "hd64_int8_kv_named_by_the_limit_alone": (
        {"page_size": 128, "rpa_v3_hd64.vmem_limit_bytes": 2**26},
        set(),
        {"head_dim": 64, "kv_dtype": "int8"},
        [("rpa_v3_hd64_float_kv", "rpa_v3_hd64.vmem_limit_bytes")],
    ),
}


def test_hd64_blocks_out_of_range_are_each_named_and_not_also_estimated():
    """Both hd64 blocks out of range: one violation each, with its bound; the VMEM estimate,
    which needs both, is not also reported for them (under a 1 MiB limit it would be)."""
    w = Workload(**{**V6E, "head_dim": 64})
    knobs = {
        "page_size": 128,
        "rpa_v3_hd64.num_kv_pages_per_block": 17,
        "rpa_v3_hd64.num_queries_per_block": 4096,
        "rpa_v3_hd64.vmem_limit_bytes": 2**20,
    }
    found = kernels.check(load_catalog()["v6e"], w, knobs)
    assert [(v.rule, v.knobs, v.message) for v in found] == [
        (
            "rpa_v3_hd64_blocks_in_range",
            ("rpa_v3_hd64.num_kv_pages_per_block",),
            "rpa_v3_hd64.num_kv_pages_per_block 17 must be in 1..16 (pages per sequence)",
        ),
        (
            "rpa_v3_hd64_blocks_in_range",
            ("rpa_v3_hd64.num_queries_per_block",),
            "rpa_v3_hd64.num_queries_per_block 4096 must be in 1..2048 (max batched tokens)",
        ),
    ]


def test_a_zero_block_says_so():
    w = Workload(**V6E)
    knobs = {"page_size": 128, "rpa_v3.m_block_sizes": (256, 1024, 0, 512)}
    (v,) = kernels.check(load_catalog()["v6e"], w, knobs)
    assert v.message == "rpa_v3.m_block_sizes (256, 1024, 0, 512) must be positive"


def test_check_refuses_sequences_that_leave_no_smem_for_block_tables():
    """Past 131072 sequences (1 MiB / 2 / 4 bytes), not even one page each fits: no page can
    be judged, so the workload itself is refused, naming the generation."""
    w = Workload(**V6E, max_num_seqs=131073)
    with pytest.raises(TuningError) as e:
        kernels.check(load_catalog()["v6e"], w, {"page_size": 128})
    assert str(e.value) == (
        "workload: max_num_seqs: 131073 sequences leave no SMEM for block tables on v6e "
        "(at most 131072) (lower max_num_seqs)"
    )


@pytest.mark.parametrize("case", sorted(MORE_CASES))
def test_rules_left_to_the_registry_and_the_lower_bounds(case):
    knobs, defaults, changes, expected = MORE_CASES[case]
    w = replace(Workload(**V6E), **changes)
    found = kernels.check(load_catalog()["v6e"], w, knobs, defaults=frozenset(defaults))
    assert [(v.rule, v.knob) for v in found] == expected, found


def test_a_one_token_page_is_a_power_of_two():
    """2**0: on a generation without the RPA v3 kernel (no KV packing rule), a page of one
    token for a 16-token sequence breaks no rule."""
    w = Workload(**V6E, max_model_len=16, max_num_seqs=1)
    assert kernels.check(load_catalog()["v4"], w, {"page_size": 1}) == []


# tpu-inference's get_smem_estimate_bytes, in 32-bit words each aligned to 128: kv_lens
# [max_num_seqs], page_indices [max_num_seqs * pages_per_seq], cu_q_lens [max_num_seqs + 1],
# and four 128-word tables. (max_num_seqs, pages_per_seq, bytes)
SMEM_ESTIMATES = [
    (127, 1, (128 + 128 + 128 + 512) * 4),
    (128, 1, (128 + 128 + 256 + 512) * 4),  # cu_q_lens' extra entry starts a new 128
    (128, 3, (128 + 384 + 256 + 512) * 4),
    (1, 1, (128 + 128 + 128 + 512) * 4),
]


@pytest.mark.parametrize("seqs, pages, expected", SMEM_ESTIMATES)
def test_rpa_v3_smem_estimate_counts_every_table(seqs, pages, expected):
    assert kernels.rpa_v3_smem_bytes(seqs, pages) == expected


# The v3 kernel's check of explicit block sizes, which the adapters apply before passing a tuple.
REJECTIONS = [
    ((256, 1024, 128, 512), 128, None),
    ((1, 128, 1, 128), 128, None),  # a chunk of one query divides anything
    ((256, 1024, 0, 512), 128, "bq_sz 256 is not a multiple of bq_csz 0"),
    ((256, 1024, 96, 512), 128, "bq_sz 256 is not a multiple of bq_csz 96"),
    ((256, 1024, 128, 0), 128, "bkv_sz 1024 is not a multiple of bkv_csz 0"),
    ((256, 1024, 128, 384), 128, "bkv_sz 1024 is not a multiple of bkv_csz 384"),
    ((256, 960, 128, 320), 128, "KV blocks 960/320 are not multiples of page size 128"),
    ((256, 1024, 128, 64), 128, "KV blocks 1024/64 are not multiples of page size 128"),
    ((256, 1024, 128, 1), 128, "KV blocks 1024/1 are not multiples of page size 128"),
]


@pytest.mark.parametrize("blocks, page, why", REJECTIONS)
def test_rpa_v3_rejection_names_the_first_broken_check(blocks, page, why):
    assert kernels.rpa_v3_rejection(blocks, page) == why


def test_the_overrides_doc_tables_are_generated():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_docs
    finally:
        sys.path.pop(0)
    doc = (REPO / "docs" / "overrides.md").read_text()
    assert gen_docs.render_overrides_doc(doc) == doc, "run python scripts/gen_docs.py"


def test_the_baseline_never_breaks_a_rule():
    """Upstream's own defaults, reproduced, pass every rule or are refused with a reason."""
    import random

    rng = random.Random(11)
    checked = refused = 0
    for gid in ("v4", "v5e", "v5p", "v6e", "tpu7x", "tpu8t", "tpu8i"):
        for _ in range(150):
            kv = rng.choice([1, 2, 4, 8, 16])
            q = kv * rng.choice([1, 2, 4, 8])
            tp = rng.choice([t for t in (1, 2, 4, 8) if q % t == 0])
            w = Workload(
                q,
                kv,
                rng.choice([64, 80, 128, 256]),
                q_dtype=rng.choice(["bfloat16", "float32"]),
                kv_dtype=rng.choice(["bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"]),
                max_model_len=rng.choice([128, 1000, 4096, 32768, 131072, 1 << 20]),
                max_num_seqs=rng.choice([1, 16, 256, 1024]),
                max_num_batched_tokens=rng.choice([16, 256, 2048, 8192]),
                tensor_parallel=tp,
            )
            try:
                cfg = resolve(w, simulate=gid)
            except TuningError as e:
                assert "bytes of VMEM for one page" in str(e) or "leave no SMEM" in str(e), e
                refused += 1
                continue
            assert not cfg.tuning.faults
            assert (
                kernels.check(cfg.spec, w, cfg.tuning.values(), defaults=frozenset(cfg.knobs)) == []
            )
            checked += 1
    assert checked > 900 and refused < checked // 20


def test_overrides_for_a_kernel_that_does_not_run_are_left_out_and_said(tmp_path):
    """One overrides file for several models: RPA v3 blocks do not reach a head-dim-64 model
    (the hd64 kernel runs it), so they are not reported as set; the note says so."""
    f = overrides(tmp_path, '"rpa_v3.d_block_sizes" = [1, 256, 1, 128]\npage_size = 64')
    cfg = resolve(Workload(8, 2, 64), simulate="v6e", overrides=f)
    assert cfg.value("rpa_v3.d_block_sizes") is None
    assert cfg.layer("page_size") == "overrides"
    assert any(
        "not applied (the kernels that run this workload: rpa_v2, rpa_v3_hd64): "
        "rpa_v3.d_block_sizes" in n
        for n in cfg.notes
    ), cfg.notes
    cfg = resolve(Workload(**V6E), simulate="v6e", overrides=f)  # and applied where it runs
    assert cfg.value("rpa_v3.d_block_sizes") == (1, 256, 1, 128)


def test_baseline_notes_reach_the_resolved_config():
    """The baseline says where it departs from upstream (here: hd64's 100 MiB default VMEM
    limit capped at TPU7x's 64 MiB)."""
    cfg = resolve(Workload(64, 8, 64), simulate="tpu7x")
    assert cfg.value("rpa_v3_hd64.vmem_limit_bytes") == 64 * 2**20
    assert any(
        n.startswith("baseline: rpa_v3_hd64.vmem_limit_bytes 67108864") for n in cfg.notes
    ), cfg.notes


@pytest.mark.parametrize(
    "name,heads",
    [("deepseek-v2-lite", 16), ("deepseek-v3", 128), ("kimi-k2", 64)],
)
def test_mla_configs_give_the_mla_family_and_bytes(name, heads):
    """DeepSeek-V2-Lite, DeepSeek-V3 and Kimi-K2 config.json shapes: every head reads one
    512 + 64 latent per token (640 lanes in the cache), whatever the head count or TP."""
    path = REPO / "tests" / "data" / "hf" / f"{name}.json"
    w = Workload.from_hf_config(path, tensor_parallel=8)
    assert (w.num_q_heads, w.num_kv_heads, w.kv_lora_rank, w.qk_rope_head_dim) == (
        heads,
        1,
        512,
        64,
    )
    cfg = resolve(w, simulate="v5p")
    p = plan(cfg)
    assert p.families == ("mla_v2",)
    assert p.kv_bytes_per_token("tpu_inference", num_layers=61) == 640 * 2 * 61
    assert cfg.value("mla_v2.vmem_limit_bytes") == 64 * 2**20  # v5p's core VMEM
    assert ", MLA latent 512 + rope 64" in cfg.explain()


# ------------------------------------------------------------------------ kernel arguments


def test_the_mla_kernel_gets_the_catalog_fallbacks_as_its_per_case_tuples():
    """``mla_attention`` passes (decode, prefill, mixed) tuples: decode from the catalog's
    batched-decode fallback, prefill and mixed from its mixed one; the scalars as they are,
    and the core's whole VMEM (read here from v6e.toml, not from the code under test)."""
    from tpu_registry.tomlfile import tomllib  # tomli on Python 3.10

    facts = tomllib.loads((REPO / "hardware" / "v6e.toml").read_text())["kernels"]["mla_v2"]
    d, m = facts["decode"], facts["mixed"]
    cfg = resolve(replace(Workload(**V6E), **MLA), simulate="v6e")
    assert cfg.kernel_kwargs("mla_v2") == {
        "num_kv_pages_per_block": (
            d["num_kv_pages_per_block"],
            m["num_kv_pages_per_block"],
            m["num_kv_pages_per_block"],
        ),
        "num_queries_per_block": (
            d["num_queries_per_block"],
            m["num_queries_per_block"],
            m["num_queries_per_block"],
        ),
        "decode_batch_size": d["decode_batch_size"],
        "mixed_q_split": m["q_split"],
        "vmem_limit_bytes": 128 * 2**20,
    }


def test_kernel_arguments_pass_rpa_knobs_through_and_build_mla_tuples_only_when_whole():
    flat = {"d_block_sizes": (1, 2048, 1, 2048), "vmem_limit_bytes": 2**26}
    assert kernels.kernel_arguments("rpa_v3", flat) == flat
    # a tuple missing one case is left to the kernel rather than passed with a None in it
    partial = {"decode_kv_pages_per_block": 3, "prefill_kv_pages_per_block": 1}
    assert kernels.kernel_arguments("mla_v2", {**partial, "decode_batch_size": 4}) == {
        "decode_batch_size": 4
    }


# hd64's VMEM estimate (get_vmem_estimate_bytes) for Workload(8, 2, 64) in bf16, worked by hand:
# K and V share 128 lanes (2 KV heads, 4 query heads each, 16-bit words), so T KV tokens and
# bq queries take 2*T*2*128*16 + 2*(2*2*bq*4*128)*16 + 2*(2*bq*4*128)*32 + 2*bq*4*128*32 bits
# = 1024*T + 20480*bq bytes; with 128-token pages, 131072 bytes a page.
HD64_FITS = [
    # (KV pages, queries) asked, limit, fitted
    ((16, 32), 131072 * 16 + 20480 * 32, (16, 32)),  # exactly at the limit: kept
    ((16, 32), 131072 * 16 + 20480 * 32 - 1, (16, 16)),  # one byte over: queries halved first
    ((16, 32), 131072 * 2 + 20480, (2, 1)),  # queries down to 1, then KV pages halved
    ((16, 32), 131072 + 20480 - 1, None),  # not even one page and one query
]


@pytest.mark.parametrize("blocks, limit, fitted", HD64_FITS)
def test_hd64_blocks_are_halved_queries_first_until_they_fit(blocks, limit, fitted):
    w = Workload(8, 2, 64)
    assert kernels.rpa_v3_hd64_vmem_bytes(w, 32, 16 * 128) == 131072 * 16 + 20480 * 32
    assert kernels.rpa_v3_hd64_fit_vmem(w, 128, blocks, limit) == fitted


# torch_xla's RPA v2 estimate of the VMEM its blocks take (it halves the KV block while this is
# at or above the catalog's threshold), worked by hand for 8 KV pages of 16 tokens, 32 queries,
# 4 query heads over 2 KV heads, head dim 128: q in and out, double-buffered,
# 2 * (2 * 32 * 4 * 128 * q bytes); KV 2 * 8 * 16 * 2 * 2 * 128 * kv bytes; l and m
# 2 * (2 * 32 * 2 * (4 // 2) * 128 * 4); the f32 accumulator 32 * 4 * 128 * 4.
RPA_V2_BLOCK_BYTES = [
    ("bfloat16", "bfloat16", 2 * 2 * 32768 + 262144 + 2 * 131072 + 65536),
    ("float32", "bfloat16", 2 * 2 * 65536 + 262144 + 2 * 131072 + 65536),
    ("bfloat16", "float8_e4m3fn", 2 * 2 * 32768 + 131072 + 2 * 131072 + 65536),
]


@pytest.mark.parametrize("q_dtype, kv_dtype, expected", RPA_V2_BLOCK_BYTES)
def test_rpa_v2_block_bytes_counts_every_buffer(q_dtype, kv_dtype, expected):
    got = kernels.rpa_v2_block_bytes(8, 32, 4, 2, 128, 16, q_dtype, kv_dtype)
    assert (got, type(got)) == (expected, int)
