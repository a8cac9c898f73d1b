"""Issue 12: a real model generates tokens through ``--attention-backend TPU_REGISTRY`` on CPU.

vLLM 0.32's engine with tpu-inference 0.32, in process, on XLA:CPU. A tiny random Llama
(``e2e_model.py``: GQA 4/2 heads, head dim 128, bfloat16, saved with ``save_pretrained``, a
tokenizer built offline) greedily continues four prompts; one of them is longer than
``max_num_batched_tokens`` (chunked prefill) and spans many pages. The CPU stand-ins for what
only runs on a TPU are in ``e2e_cpu_shims.py``, each naming the upstream line it replaces; the
registry's code runs unchanged. An overrides file sets the page size, the three RPA v3
block-size tuples and the VMEM limit, so the registry's answer differs from tpu-inference's.

Four engine runs, in parallel subprocesses (``e2e_child.py``), the same model, prompts and
overrides in all of them:

- ``registry``: ``attention_backend="TPU_REGISTRY"``, ``MODEL_IMPL_TYPE=vllm`` (vLLM's Llama,
  whose attention layer reaches the backend);
- ``upstream``: the same engine with tpu-inference's default attention backend (RPA);
- ``wrong_scale``: as ``registry`` with a kernel stand-in whose softmax scale is doubled (the
  negative control: the comparison below must fail on it);
- ``jax_native``: no ``MODEL_IMPL_TYPE``: tpu-inference runs Llama as a JAX module, which calls
  its RPA path without any backend; only the exported ``RPA_V3_*_BLOCK_SIZES`` reach it;
- ``hd64``: the same model with head dim 64 through ``TPU_REGISTRY``: the hd64 kernel
  (``e2e_cpu_shims.RecordingReferenceHd64``) with the registry's hd64 knobs, set by the
  overrides file's second entry.

The kernel stand-in is the same in every run (``e2e_cpu_shims.RecordingReference``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
from tpu_registry_vllm import tpu_inference_backend as backend

from tpu_registry import Workload, plan, resolve

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # e2e_model: what both stacks' end-to-end tests share
from e2e_model import (  # noqa: E402
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    LONG,
    MARGIN,
    MAX_MODEL_LEN,
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    MAX_TOKENS,
    PROMPTS,
    Q_HEADS,
    Oracle,
    build,
    collect,
    start_engine,
)

# num_gpu_blocks_override: a fixed KV cache, so nobody asks the (CPU) device for its HBM
NUM_BLOCKS = 64
ENGINE = dict(
    max_model_len=MAX_MODEL_LEN,
    max_num_seqs=MAX_NUM_SEQS,
    max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    num_gpu_blocks_override=NUM_BLOCKS,
    dtype="bfloat16",
    seed=0,
)
STAND_IN_TOLERANCE = (
    1.5e-2  # NumPy stand-in vs tpu-inference's reference, relative to the output's magnitude
)

OVERRIDES = """\
schema_version = 1

[[override]]
generation = "v6e"
note = "end-to-end test: every RPA v3 knob differs from the baseline"
[override.knobs]
page_size = 16
"rpa_v3.d_block_sizes" = [1, 256, 1, 128]
"rpa_v3.p_block_sizes" = [64, 256, 32, 128]
"rpa_v3.m_block_sizes" = [32, 128, 16, 64]
"rpa_v3.vmem_limit_bytes" = 67108864

[[override]]
generation = "v6e"
match = { head_dim = 64 }
note = "end-to-end test: the hd64 kernel's knobs differ from the baseline"
[override.knobs]
"rpa_v3_hd64.num_kv_pages_per_block" = 4
"rpa_v3_hd64.num_queries_per_block" = 16
"rpa_v3_hd64.vmem_limit_bytes" = 33554432
"""
HD64 = 64  # the head dim of the hd64 run's model

# check_reference: also run tpu-inference's reference on the first call of each kind (about
# ten seconds a run); the stand-in is the same code in every run, so the registry run checks it.
RUNS = {
    "registry": dict(
        engine={"attention_backend": "TPU_REGISTRY"},
        env={"MODEL_IMPL_TYPE": "vllm"},
        check_reference=True,
    ),
    "upstream": dict(engine={}, env={"MODEL_IMPL_TYPE": "vllm"}),
    "wrong_scale": dict(
        engine={"attention_backend": "TPU_REGISTRY"},
        env={"MODEL_IMPL_TYPE": "vllm"},
        sm_scale_factor=2.0,
    ),
    "jax_native": dict(engine={"attention_backend": "TPU_REGISTRY"}, env={"MODEL_IMPL_TYPE": None}),
    "hd64": dict(
        engine={"attention_backend": "TPU_REGISTRY"},
        env={"MODEL_IMPL_TYPE": "vllm"},
        model="hd64",
    ),
}
CHILD_ENV = {
    # the engine core in this process: the bound kernel is the one called
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "SKIP_JAX_PRECOMPILE": "1",  # compile the buckets this run uses, not all of them (time)
    "TPU_REGISTRY_VLLM": None,  # auto: libtpu is importable, so vLLM and the plugin see a TPU host
    "VLLM_PLUGINS": None,
}
TIMEOUT = 400


def expected_kernel_kwargs(cfg, call: dict) -> dict:
    """The registry's answer for one kernel call: the tuning keywords the v3 kernel must get.

    ``call`` holds the call's shapes (``q_tokens``: the padded token bucket, the kernel's
    ``max_num_tokens``; ``q_heads``, ``kv_heads``: one shard's). The registry resolves the
    knobs of each call for its bucket and shard, as upstream sizes blocks per call.
    """
    one = cfg.for_call(call["q_tokens"], q_heads=call["q_heads"], kv_heads=call["kv_heads"])
    return backend.kernel_kwargs(one)


def exported_block_sizes(cfg) -> dict:
    """What the platform plugin exports for JAX-native models (one answer per engine)."""
    return {
        name: cfg.value(knob)
        for name, knob in (
            ("d_block_sizes", "rpa_v3.d_block_sizes"),
            ("p_block_sizes", "rpa_v3.p_block_sizes"),
            ("m_block_sizes", "rpa_v3.m_block_sizes"),
        )
    }


def tuning_of(call: dict) -> dict:
    tuning = ("chunk_prefill_size", *backend.KERNEL_TUNING)
    return {
        k: tuple(v) if isinstance(v, list) else v for k, v in call["kwargs"].items() if k in tuning
    }


# ---------------------------------------------------------------------------- the runs


@dataclasses.dataclass
class E2E:
    model: Path
    overrides: Path
    results: dict[str, dict]
    seconds: float
    oracle: Oracle
    oracle_hd64: Oracle

    def config(self, head_dim: int = HEAD_DIM):
        """The registry's answer for this workload, resolved here, not by the plugin."""
        w = Workload(
            num_q_heads=Q_HEADS,
            num_kv_heads=KV_HEADS,
            head_dim=head_dim,
            q_dtype="bfloat16",
            kv_dtype="bfloat16",
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        )
        # The file the plugin reads from TPU_REGISTRY_OVERRIDES, passed explicitly: the result
        # remembers it, so the per-call configurations (for_call) apply it too.
        return resolve(w, overrides=self.overrides)

    def disagreements(self, name: str) -> tuple[list[tuple], int]:
        r = self.results[name]
        oracle = self.oracle_hd64 if name == "hd64" else self.oracle
        return oracle.disagreements(r["prompt_tokens"], r["tokens"])


def _spec(run: dict, models: dict[str, Path]) -> dict:
    return {
        "model": str(models[run.get("model", "main")]),
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
        "engine": {**ENGINE, **run["engine"]},
        "sm_scale_factor": run.get("sm_scale_factor", 1.0),
        "check_reference": run.get("check_reference", False),
    }


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> E2E:
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("e2e")
    models = {
        "main": build(work / "tiny-llama"),
        "hd64": build(work / "tiny-llama-hd64", head_dim=HD64),
    }
    overrides = work / "overrides.toml"
    overrides.write_text(OVERRIDES)
    child = HERE / "e2e_child.py"
    procs = {
        name: start_engine(
            name, _spec(run, models), child, {**CHILD_ENV, **run["env"]}, overrides, work
        )
        for name, run in RUNS.items()
    }
    results = collect(procs, work, t0, TIMEOUT)
    return E2E(
        models["main"],
        overrides,
        results,
        time.monotonic() - t0,
        Oracle(models["main"]),
        Oracle(models["hd64"]),
    )


# ---------------------------------------------------------------------------- tests


def test_runs_cover_decode_prefill_and_chunked_prefill(e2e):
    """What the runs exercised: the long prompt was prefilled in chunks over many pages; every
    run calls the kernel for decode-only, prefill-only and mixed batches."""
    r = e2e.results["registry"]
    assert [len(t) for t in r["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
    long_prompt = len(r["prompt_tokens"][LONG])
    assert long_prompt > 2 * MAX_NUM_BATCHED_TOKENS  # at least three chunks
    assert long_prompt > 10 * r["block_size"]
    for name, res in e2e.results.items():
        if name == "hd64":
            continue  # one kernel for every kind of batch: see test_hd64_model_*
        counts = res["runs"]["upstream" if name in ("upstream", "jax_native") else "registry"]
        assert all(counts[kind] > 0 for kind in ("decode", "prefill", "mixed")), (name, counts)
        assert res["prompt_tokens"] == r["prompt_tokens"], name
        assert res["model_impl"] == ("flax_nnx" if name == "jax_native" else "vllm"), name


def test_stand_in_agrees_with_tpu_inference_reference(e2e):
    """On the registry run's first decode, prefill and mixed call, the NumPy stand-in gave what
    tpu-inference's ref_ragged_paged_attention gives: the same KV cache bit for bit, the same
    attention output up to bfloat16 rounding."""
    checks = e2e.results["registry"]["checks"]
    assert sorted(c["kind"] for c in checks) == ["decode", "mixed", "prefill"]
    for c in checks:
        assert c["cache_equal"] and c["padding_zero"], c
        assert c["max_abs_diff"] <= STAND_IN_TOLERANCE * max(1.0, c["max_abs"]), c


def test_tokens_match_float32_transformers(e2e):
    bad, near_ties = e2e.disagreements("registry")
    assert not bad, (
        f"tokens that lose more than {MARGIN} logits to transformers' float32 argmax: {bad}"
    )
    assert near_ties <= len(PROMPTS) * MAX_TOKENS // 10, near_ties


def test_tokens_equal_upstream_backend(e2e):
    """The same engine with tpu-inference's own backend and the same kernel stand-in."""
    reg, up = e2e.results["registry"], e2e.results["upstream"]
    assert (
        reg["attention_backend"] == "AttentionBackendEnum.TPU_REGISTRY"
        and up["attention_backend"] == "None"
    )
    assert sum(reg["runs"]["registry"].values()) > 0 and sum(reg["runs"]["upstream"].values()) == 0
    assert sum(up["runs"]["upstream"].values()) > 0 and sum(up["runs"]["registry"].values()) == 0
    assert reg["tokens"] == up["tokens"]


def test_negative_control_wrong_softmax_scale_fails(e2e):
    """A kernel with the softmax scale doubled, through the same backend: the comparison with
    transformers must fail, on many tokens and by far more than the margin."""
    bad, _ = e2e.disagreements("wrong_scale")
    assert len(bad) >= len(PROMPTS) * MAX_TOKENS // 4, bad
    assert max(loss for *_, loss in bad) > 10 * MARGIN
    assert e2e.results["wrong_scale"]["tokens"] != e2e.results["registry"]["tokens"]
    assert {c["kwargs"]["sm_scale"] for c in e2e.results["wrong_scale"]["calls"]} == {
        HEAD_DIM**-0.5
    }  # the backend passed the right scale


def test_registry_answer_reaches_vllm_and_every_kernel_call(e2e):
    cfg = e2e.config()
    for knob in (
        "page_size",
        "rpa_v3.d_block_sizes",
        "rpa_v3.p_block_sizes",
        "rpa_v3.m_block_sizes",
        "rpa_v3.vmem_limit_bytes",
    ):
        assert cfg.layer(knob) == "overrides", knob
    r = e2e.results["registry"]
    assert r["registry"]["workload"] == dataclasses.asdict(
        cfg.workload
    )  # the plugin resolved this workload
    assert r["registry"]["layers"] == {n: k.layer for n, k in cfg.knobs.items()}

    # vLLM's block size and the KV cache the runner allocated.
    assert r["block_size"] == cfg.value("page_size") == 16
    want_shape = list(plan(cfg).kv_cache_shape("tpu_inference", NUM_BLOCKS))
    assert r["kv_cache_shapes"] == [want_shape] * LAYERS
    assert r["kv_cache_dtypes"] == ["bfloat16"] * LAYERS

    # Every kernel call: exactly the registry's tuning keywords, and the layer's own settings.
    calls = r["calls"]
    assert calls and {c["path"] for c in calls} == {"registry"}
    assert len({c["q_tokens"] for c in calls}) >= 2  # several token buckets were compiled
    for call in calls:
        want = expected_kernel_kwargs(cfg, call)
        assert set(want) == set(
            backend.KERNEL_TUNING
        )  # all four, none left to the kernel's defaults
        assert tuning_of(call) == want, call
        assert {k: v for k, v in call["kwargs"].items() if k not in want} == {
            "sm_scale": HEAD_DIM**-0.5,
            "sliding_window": None,
            "soft_cap": None,
            "q_scale": None,
            "k_scale": None,
            "v_scale": None,
            "update_kv_cache": True,
            "use_causal_mask": True,
        }
        assert (call["q_heads"], call["kv_heads"], call["head_dim"]) == (
            Q_HEADS,
            KV_HEADS,
            HEAD_DIM,
        )
        assert call["kv_cache_shape"] == want_shape

    # tpu-inference's own backend in the same engine reads only the exported block sizes.
    for call in e2e.results["upstream"]["calls"]:
        assert tuning_of(call) == exported_block_sizes(cfg), call


def test_jax_native_model_gets_the_exported_block_sizes(e2e):
    """Without MODEL_IMPL_TYPE tpu-inference runs Llama as a JAX module: the backend's
    attention() is never called, even with TPU_REGISTRY selected; the kernel gets the exported
    RPA_V3_*_BLOCK_SIZES, and no VMEM limit (nothing carries it there)."""
    cfg = e2e.config()
    r = e2e.results["jax_native"]
    assert r["env"]["MODEL_IMPL_TYPE"] is None
    assert sum(r["runs"]["registry"].values()) == 0 and not [
        c for c in r["calls"] if c["path"] == "registry"
    ]
    want = exported_block_sizes(cfg)
    for var, name in (
        ("RPA_V3_DECODE_BLOCK_SIZES", "d_block_sizes"),
        ("RPA_V3_PREFILL_BLOCK_SIZES", "p_block_sizes"),
        ("RPA_V3_MIXED_BLOCK_SIZES", "m_block_sizes"),
    ):
        assert r["env"][var] == ",".join(map(str, want[name]))
    calls = r["calls"]
    assert len(calls) >= LAYERS * 2  # each layer traced on its own, in at least two buckets
    for call in calls:
        assert tuning_of(call) == want, call
        assert "vmem_limit_bytes" not in call["kwargs"]
    assert r["block_size"] == cfg.value("page_size")
    bad, _ = e2e.disagreements("jax_native")  # the same weights, through tpu-inference's JAX Llama
    assert not bad, bad


def test_hd64_model_runs_the_hd64_kernel_with_the_registry_knobs(e2e):
    """Head dim 64 through ``TPU_REGISTRY``: every call goes to the hd64 kernel (none to the
    RPA v3 one), with exactly the registry's hd64 knobs for the call (the overrides' entry
    for head dim 64, clamped per call as upstream clamps them), and the tokens match
    transformers' float32 forward of the same weights."""
    cfg = e2e.config(head_dim=HD64)
    for knob in (
        "rpa_v3_hd64.num_kv_pages_per_block",
        "rpa_v3_hd64.num_queries_per_block",
        "rpa_v3_hd64.vmem_limit_bytes",
    ):
        assert cfg.layer(knob) == "overrides", knob
    assert cfg.value("rpa_v3.d_block_sizes") is None  # the first entry's v3 blocks: not applied
    r = e2e.results["hd64"]
    assert r["hd64_runs"] > 0 and not r["calls"]
    assert r["block_size"] == cfg.value("page_size") == 16
    want_shape = list(plan(cfg).kv_cache_shape("tpu_inference", NUM_BLOCKS))
    assert want_shape[-1] == 128 and r["kv_cache_shapes"] == [want_shape] * LAYERS
    calls = r["hd64_calls"]
    assert len({c["q_tokens"] for c in calls}) >= 2  # several token buckets were compiled
    for call in calls:
        one = cfg.for_call(call["q_tokens"], q_heads=call["q_heads"], kv_heads=call["kv_heads"])
        want = one.kernel_kwargs("rpa_v3_hd64")
        assert {k: call["kwargs"][k] for k in want} == want, call
        assert want["num_queries_per_block"] == min(16, call["q_tokens"])
        assert (call["q_heads"], call["kv_heads"], call["head_dim"]) == (Q_HEADS, KV_HEADS, HD64)
        assert call["kwargs"]["sm_scale"] == HD64**-0.5
    bad, near_ties = e2e.disagreements("hd64")
    assert not bad, bad
    assert near_ties <= len(PROMPTS) * MAX_TOKENS // 10, near_ties
