"""Issue 12: a real model generates tokens through the registry's ``PALLAS`` backend on CPU.

vLLM 0.13's engine with torch_xla 2.9, in process, on XLA:CPU (``PJRT_DEVICE=CPU``). The same
tiny random Llama as the current stack's test (``../e2e_model.py``) greedily continues the
same four prompts; one of them is longer than ``max_num_batched_tokens`` (chunked prefill) and
spans many pages. The CPU stand-ins are in ``e2e_cpu_shims.py``, each naming the upstream
line it replaces; the registry's adapter runs unchanged. An overrides file sets the three
RPA v2 knobs and a page size (which vLLM 0.13 ignores; the adapter says so).

Three engine runs, in parallel subprocesses (``e2e_child.py``), the same model, prompts and
overrides in all of them:

- ``registry``: the plugin active (vLLM sees a TPU host), so ``PALLAS`` resolves to the
  registry's ``RegistryPallasBackend``;
- ``upstream``: ``TPU_REGISTRY_VLLM=off``: vLLM's own ``PallasAttentionBackend``;
- ``wrong_scale``: as ``registry`` with an attention stand-in whose softmax scale is doubled
  (the negative control: the comparison below must fail on it).

The kernel stand-ins are the same in every run: they replace the Pallas kernels under
torch_xla's and vLLM's custom ops, which both backends call.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
from tpu_registry_vllm.torch_xla_pallas import KNOBS

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

NUM_BLOCKS = 64  # num_gpu_blocks_override: a fixed KV cache (XLA:CPU reports no memory)
# enforce_eager: compile the token buckets this run uses, not all of them (time); vLLM 0.13
# still traces the model once with dynamo.
ENGINE = dict(
    max_model_len=MAX_MODEL_LEN,
    max_num_seqs=MAX_NUM_SEQS,
    max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    num_gpu_blocks_override=NUM_BLOCKS,
    dtype="bfloat16",
    seed=0,
    enforce_eager=True,
)
VLLM_PAGE_SIZE = 32  # PallasAttentionBackend.get_page_size: next_power_of_2(512) // 16
OVERRIDE_PAGE_SIZE = 64

OVERRIDES = f"""\
schema_version = 1

[[override]]
generation = "v6e"
note = "end-to-end test: every RPA v2 knob differs from the baseline"
[override.knobs]
page_size = {OVERRIDE_PAGE_SIZE}
"rpa_v2.num_kv_pages_per_block" = 4
"rpa_v2.num_queries_per_block" = 16
"rpa_v2.vmem_limit_bytes" = 67108864
"""

RUNS = {
    "registry": dict(env={"TPU_REGISTRY_VLLM": None}),
    "upstream": dict(env={"TPU_REGISTRY_VLLM": "off"}),
    "wrong_scale": dict(env={"TPU_REGISTRY_VLLM": None}, sm_scale_factor=2.0),
}
CHILD_ENV = {
    # the engine core in this process: the installed stand-ins are the ones called
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_PLUGINS": None,
    "VLLM_TPU_MOST_MODEL_LEN": None,
}
TIMEOUT = 400
UPSTREAM_KWARGS = dict.fromkeys(KNOBS)  # vLLM's own PALLAS leaves all three to torch_xla


def expected_kernel_kwargs(cfg, call: dict) -> dict:
    """The registry's answer for one kernel call: the RPA v2 tuning keywords the kernel must get.

    The legacy impl passes ``cfg.kernel_kwargs("rpa_v2")`` to every call (capped for
    VLLM_TPU_MOST_MODEL_LEN, unset here): vLLM 0.13 compiles with a symbolic token count, so
    the adapter cannot choose per bucket; ``call`` holds the call's shapes for the record.
    """
    return dict(cfg.kernel_kwargs("rpa_v2"))


def tuning_of(call: dict) -> dict:
    return {k: call["kwargs"].get(k) for k in KNOBS}


@dataclasses.dataclass
class E2E:
    model: Path
    overrides: Path
    work: Path
    results: dict[str, dict]
    seconds: float
    oracle: Oracle

    def config(self, page_size: int | None = VLLM_PAGE_SIZE):
        """The registry's answer for one layer's workload, resolved here, not by the adapter
        (which pins the page size to vLLM's)."""
        w = Workload(
            num_q_heads=Q_HEADS,
            num_kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            q_dtype="bfloat16",
            kv_dtype="bfloat16",
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            page_size=page_size,
        )
        # The file the plugin reads from TPU_REGISTRY_OVERRIDES, passed explicitly: the result
        # remembers it, so the per-call configurations (for_call) apply it too.
        return resolve(w, overrides=self.overrides)

    def disagreements(self, name: str) -> tuple[list[tuple], int]:
        r = self.results[name]
        return self.oracle.disagreements(r["prompt_tokens"], r["tokens"])

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text()


def _spec(run: dict, model: Path) -> dict:
    return {
        "model": str(model),
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
        "engine": ENGINE,
        "sm_scale_factor": run.get("sm_scale_factor", 1.0),
    }


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> E2E:
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("e2e")
    model = build(work / "tiny-llama")
    overrides = work / "overrides.toml"
    overrides.write_text(OVERRIDES)
    child = HERE / "e2e_child.py"
    procs = {
        name: start_engine(
            name, _spec(run, model), child, {**CHILD_ENV, **run["env"]}, overrides, work
        )
        for name, run in RUNS.items()
    }
    results = collect(procs, work, t0, TIMEOUT)
    return E2E(model, overrides, work, results, time.monotonic() - t0, Oracle(model))


# ---------------------------------------------------------------------------- tests


def test_runs_cover_decode_and_chunked_prefill(e2e):
    r = e2e.results["registry"]
    assert [len(t) for t in r["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
    long_prompt = len(r["prompt_tokens"][LONG])
    assert long_prompt > 2 * MAX_NUM_BATCHED_TOKENS  # at least three chunks
    assert long_prompt > 10 * r["block_size"]
    for name, res in e2e.results.items():
        assert res["platform"] == "TpuPlatform", name
        assert res["prompt_tokens"] == r["prompt_tokens"], name
        assert len({c["q_tokens"] for c in res["calls"]}) >= 2, (
            name
        )  # several token buckets compiled
        assert res["kv_updates"], name


def test_tokens_match_float32_transformers(e2e):
    bad, near_ties = e2e.disagreements("registry")
    assert not bad, (
        f"tokens that lose more than {MARGIN} logits to transformers' float32 argmax: {bad}"
    )
    assert near_ties <= len(PROMPTS) * MAX_TOKENS // 10, near_ties


def test_tokens_equal_upstream_backend(e2e):
    """The same engine with vLLM's own PALLAS backend and the same kernel stand-ins."""
    reg, up = e2e.results["registry"], e2e.results["upstream"]
    assert {i["class"] for i in reg["impls"].values()} == {
        "tpu_registry_vllm.torch_xla_pallas.RegistryPallasBackendImpl"
    }
    assert {i["class"] for i in up["impls"].values()} == {
        "vllm.v1.attention.backends.pallas.PallasAttentionBackendImpl"
    }
    assert reg["tokens"] == up["tokens"]


def test_negative_control_wrong_softmax_scale_fails(e2e):
    """An attention stand-in with the softmax scale doubled, through the same backend: the
    comparison with transformers must fail, on many tokens and by far more than the margin."""
    bad, _ = e2e.disagreements("wrong_scale")
    assert len(bad) >= len(PROMPTS) * MAX_TOKENS // 4, bad
    assert max(loss for *_, loss in bad) > 10 * MARGIN
    assert e2e.results["wrong_scale"]["tokens"] != e2e.results["registry"]["tokens"]
    assert {c["kwargs"]["sm_scale"] for c in e2e.results["wrong_scale"]["calls"]} == {
        HEAD_DIM**-0.5
    }  # the backend passed the right scale


def test_registry_answer_reaches_vllm_and_every_kernel_call(e2e):
    cfg = e2e.config()
    for knob in KNOBS:
        assert cfg.layer(f"rpa_v2.{knob}") == "overrides", knob
    r = e2e.results["registry"]

    # vLLM 0.13 fixes the page size itself; the adapter tunes for it and says what the
    # registry would have chosen.
    assert (
        r["block_size"] == VLLM_PAGE_SIZE == cfg.value("page_size")
        and cfg.layer("page_size") == "workload"
    )
    assert e2e.config(page_size=None).value("page_size") == OVERRIDE_PAGE_SIZE
    assert (
        f"vLLM fixes the page size at {VLLM_PAGE_SIZE}; the registry would choose "
        f"{OVERRIDE_PAGE_SIZE}" in e2e.log("registry")
    )

    # Every layer's impl resolved this workload, and the KV cache is the plan's layout.
    assert len(r["impls"]) == LAYERS
    for impl in r["impls"].values():
        assert impl["workload"] == dataclasses.asdict(cfg.workload)
        assert impl["layers"] == {n: k.layer for n, k in cfg.knobs.items()}
    want_shape = list(plan(cfg).kv_cache_shape("vllm_pallas", NUM_BLOCKS))
    assert r["kv_cache_shapes"] == [want_shape] * LAYERS
    assert r["kv_cache_dtypes"] == ["bfloat16"] * LAYERS

    # The seams hold their TPU defaults (the stand-ins are under the ops they call).
    assert r["seams"]["kv_cache_update"] == "vllm.v1.attention.backends.pallas.write_to_kv_cache"
    assert r["seams"]["rpa_v2"].endswith(".ragged_paged_attention") and r["seams"][
        "rpa_v2"
    ].startswith("torch._ops.xla")

    # Every compiled kernel call: exactly the registry's knobs, and the layer's own settings.
    assert len(r["calls"]) >= LAYERS * 2
    for call in r["calls"]:
        want = expected_kernel_kwargs(cfg, call)
        assert set(want) == set(KNOBS) and None not in want.values()
        assert tuning_of(call) == want, call
        assert {k: v for k, v in call["kwargs"].items() if k not in KNOBS} == {
            "sm_scale": HEAD_DIM**-0.5,
            "sliding_window": None,
            "soft_cap": None,
            "mask_value": None,
            "k_scale": 1.0,
            "v_scale": 1.0,
            "use_kernel": True,
        }
        assert (call["q_heads"], call["kv_heads"], call["head_dim"]) == (
            Q_HEADS,
            KV_HEADS,
            HEAD_DIM,
        )
        assert call["kv_cache_shape"] == want_shape

    # vLLM's own PALLAS leaves every knob to torch_xla.
    for call in e2e.results["upstream"]["calls"]:
        assert tuning_of(call) == UPSTREAM_KWARGS, call


def test_stand_ins_match_torch_xla_reference():
    """The dense attention stand-in against torch_xla's own non-kernel ragged_paged_attention
    (on CPU tensors), and the dense KV-cache update against a slice-by-slice copy, on a batch
    with decodes, a fresh prefill, chunked prefills, padding tokens and padded slices."""
    import numpy as np
    import torch
    from torch_xla.experimental.custom_kernel import ragged_paged_attention

    sys.path.insert(0, str(HERE))
    from e2e_cpu_shims import dense_kv_cache_update, dense_ragged_paged_attention

    rng = np.random.default_rng(3)
    pages, page, hkv, hq, d, max_seqs, pps = 40, 16, 2, 4, 128, 6, 8
    batch = [(1, 37), (1, 100), (20, 20), (13, 90), (9, 60)]  # (q_len, kv_len)
    n_tok, pad = sum(q for q, _ in batch), 7
    cache = torch.from_numpy(rng.normal(size=(pages, page, 2 * hkv, d)).astype(np.float32))
    tables = torch.from_numpy(
        rng.permutation(pages * 2)[: max_seqs * pps].reshape(max_seqs, pps).astype(np.int32) % pages
    )
    for s, (_, kv_len) in enumerate(batch):  # distinct pages per sequence
        tables[s, : -(-kv_len // page)] = (
            torch.arange(s * pps, s * pps + -(-kv_len // page), dtype=torch.int32) % pages
        )
    kv_lens = torch.zeros(max_seqs, dtype=torch.int32)
    kv_lens[: len(batch)] = torch.tensor([kv for _, kv in batch])
    cu = torch.ones(max_seqs + 1, dtype=torch.int32)  # vLLM 0.13 pads query_start_loc with 1
    cu[0] = 0
    cu[1 : len(batch) + 1] = torch.cumsum(torch.tensor([q for q, _ in batch]), 0)
    num_seqs = torch.tensor([len(batch)], dtype=torch.int32)
    q = torch.from_numpy(rng.normal(size=(n_tok + pad, hq, d)).astype(np.float32))
    outs = []
    for window, cap in ((None, None), (24, 3.0)):
        kw = dict(sm_scale=0.1, sliding_window=window, soft_cap=cap)
        want = ragged_paged_attention(
            q, cache, kv_lens, tables, cu, num_seqs, use_kernel=False, **kw
        )
        got = dense_ragged_paged_attention(
            q,
            cache,
            kv_lens,
            tables,
            cu,
            num_seqs,
            num_kv_pages_per_block=4,
            num_queries_per_block=16,
            vmem_limit_bytes=1,
            **kw,
        )
        assert got.shape == q.shape and not got[n_tok:].any()
        torch.testing.assert_close(got[:n_tok], want[:n_tok], rtol=2e-5, atol=2e-5)
        outs.append(got[:n_tok])
    assert (outs[0] - outs[1]).abs().max() > 0.1  # the batch exercises the window and the cap
    wrong = dense_ragged_paged_attention(
        q, cache, kv_lens, tables, cu, num_seqs, sm_scale=0.1, sm_scale_factor=2.0
    )
    assert (wrong[:n_tok] - outs[0]).abs().max() > 0.1  # the negative control's stand-in is wrong

    # KV update: slices of at most one page each, padded with zero-length slices.
    kv = torch.from_numpy(rng.normal(size=(n_tok + pad, 2 * hkv, d)).astype(np.float32))
    slices, src = [], 0
    for s, (q_len, kv_len) in enumerate(batch):
        pos = kv_len - q_len
        while pos < kv_len:
            n = min(page - pos % page, kv_len - pos)
            slices.append((int(tables[s, pos // page]) * page + pos % page, src, n))
            src, pos = src + n, pos + n
    padded = len(slices) + 5
    slot_mapping = torch.zeros((3, padded), dtype=torch.int32)
    slot_mapping[:, : len(slices)] = torch.tensor(slices, dtype=torch.int32).T
    flat = cache.reshape(-1, 2 * hkv, d)
    want_cache = flat.clone()
    for start, s0, n in slices:
        want_cache[start : start + n] = kv[s0 : s0 + n]
    got_cache = dense_kv_cache_update(
        kv, slot_mapping, flat, torch.tensor([len(slices)], dtype=torch.int32), page, 8
    )
    assert torch.equal(got_cache, want_cache) and not torch.equal(got_cache, flat)
