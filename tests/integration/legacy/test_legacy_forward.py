"""The legacy impl's forward on CPU against an independent NumPy reference.

What runs: vLLM 0.13's real ``PallasAttentionBackendImpl.__init__`` (through our subclass),
our ``forward``, with the two kernel seams bound to CPU code:

- ``rpa_v2``: torch_xla 2.9's Python ``torch_xla.experimental.custom_kernel.ragged_paged_attention``
  with ``use_kernel=False`` (its pure-torch path; the Pallas kernel cannot run on CPU, and the
  dispatcher op ``torch.ops.xla.ragged_paged_attention`` returns wrong values for multi-page
  first sequences on XLA:CPU and garbage on CPU tensors). The wrapper records the keyword
  arguments and pads the output to ``q.shape[0]`` rows, the kernel's output contract (the
  non-kernel path returns only ``cu_q_lens[num_seqs]`` rows).
- ``kv_cache_update``: a torch scatter that follows vLLM's slice format (``slot_mapping`` is
  ``[3, n]`` rows of kv_cache_start, new_kv_start, length; K/V interleaved by
  ``cat([k, v], -1).reshape(-1, 2 * kv_heads, D)`` as ``write_to_kv_cache`` does), replacing
  the Pallas ``kv_cache_update`` kernel, which cannot run on CPU.

The reference (``ref_attention``) shares no code with either: it builds its own cache
contents in NumPy and gathers pages from the combined K/V layout itself.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import types

import numpy as np
import pytest
import torch

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 96  # GQA 4:1; 96 pads to 128 (and must not go to 256)
PAGE, MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 16, 256, 8, 64
NUM_PAGES = 64


# ----------------------------------------------------------------------------- reference
def ref_attention(
    q,
    cache,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_seqs,
    *,
    scale,
    sliding_window=None,
    soft_cap=None,
):
    """Ragged paged attention in NumPy (float64).
    cache: [pages, page, 2*kv_heads, D], K even, V odd."""
    q = np.asarray(q, np.float64)
    cache = np.asarray(cache, np.float64)
    _, page, combined, dim = cache.shape
    kv_heads = combined // 2
    group = q.shape[1] // kv_heads
    out = np.zeros((int(cu_q_lens[num_seqs]), q.shape[1], dim))
    for s in range(num_seqs):
        q0, q1, kv_len = int(cu_q_lens[s]), int(cu_q_lens[s + 1]), int(kv_lens[s])
        q_len = q1 - q0
        pages = block_tables[s, : -(-kv_len // page)]
        kv = cache[pages].reshape(-1, combined, dim)[:kv_len]
        keys, values = kv[:, 0::2], kv[:, 1::2]
        q_pos = np.arange(kv_len - q_len, kv_len)[
            :, None
        ]  # causal: queries are the last q_len tokens
        k_pos = np.arange(kv_len)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= q_pos - k_pos < sliding_window
        for h in range(q.shape[1]):
            logits = q[q0:q1, h] @ keys[:, h // group].T * scale
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            logits = np.where(allowed, logits, -np.inf)
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            out[q0:q1, h] = (p / p.sum(axis=-1, keepdims=True)) @ values[:, h // group]
    return out


# ----------------------------------------------------------------------------- CPU seams
def torch_kv_cache_update(
    key,
    value,
    kv_cache,
    slot_mapping,
    num_slices_per_block,
    num_kv_update_slices,
    quantized_dtype=None,
    k_scale=1.0,
    v_scale=1.0,
):
    assert quantized_dtype is None
    _, _, combined, dim = kv_cache.shape
    kv = torch.cat([key, value], dim=-1).reshape(-1, combined, dim)
    flat = kv_cache.view(-1, combined, dim)  # shares storage: the update is in place, as upstream's
    for i in range(int(num_kv_update_slices[0])):
        dst, src, n = (int(x) for x in slot_mapping[:, i])
        flat[dst : dst + n] = kv[src : src + n]


class RecordingReference:
    def __init__(self):
        from torch_xla.experimental.custom_kernel import ragged_paged_attention

        self.fn = ragged_paged_attention
        self.calls: list[dict] = []

    def __call__(self, q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kw):
        self.calls.append(dict(kw))
        out = self.fn(
            q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **{**kw, "use_kernel": False}
        )
        pad = q.shape[0] - out.shape[0]
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad)) if pad else out


# ----------------------------------------------------------------------------- batches
def slices_for(batch, block_tables, page):
    """vLLM 0.13's KV-update slices: one per page touched by each sequence's new tokens."""
    out, src = [], 0
    for s, (q_len, kv_len) in enumerate(batch):
        pos = kv_len - q_len
        while pos < kv_len:
            n = min(page - pos % page, kv_len - pos)
            out.append((int(block_tables[s, pos // page]) * page + pos % page, src, n))
            src, pos = src + n, pos + n
    return np.array(out, dtype=np.int32).T


def make_batch(batch, *, seed, pad_tokens=0, dtype=torch.float32):
    """History already in the cache, new tokens' q/k/v, vLLM-shaped metadata, and the
    reference's own copy of the cache after the write."""
    from vllm.v1.attention.backends.pallas import PallasMetadata

    rng = np.random.default_rng(seed)
    padded = -(-HEAD_DIM // 128) * 128
    cache = np.zeros((NUM_PAGES, PAGE, 2 * KV_HEADS, padded), np.float32)
    cache[..., :HEAD_DIM] = rng.normal(
        size=(NUM_PAGES, PAGE, 2 * KV_HEADS, HEAD_DIM)
    )  # history (and junk)
    pages_per_seq = MAX_MODEL_LEN // PAGE
    # Each sequence's pages are distinct and scattered over the cache; table entries past a
    # sequence's length point at random pages, which nothing may read.
    block_tables = rng.integers(0, NUM_PAGES, size=(MAX_SEQS, pages_per_seq), dtype=np.int32)
    free = iter(rng.permutation(NUM_PAGES))
    for s, (_, kv_len) in enumerate(batch):
        for i in range(-(-kv_len // PAGE)):
            block_tables[s, i] = next(free)
    total = sum(q for q, _ in batch)
    q = rng.normal(size=(total + pad_tokens, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.normal(size=(total + pad_tokens, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.normal(size=(total + pad_tokens, KV_HEADS, HEAD_DIM)).astype(np.float32)
    expected = cache.copy()
    src = 0
    for s, (q_len, kv_len) in enumerate(batch):
        for t in range(q_len):
            pos = kv_len - q_len + t
            page, off = block_tables[s, pos // PAGE], pos % PAGE
            expected[page, off, 0::2, :HEAD_DIM] = k[src]
            expected[page, off, 1::2, :HEAD_DIM] = v[src]
            expected[page, off, :, HEAD_DIM:] = 0.0  # the zero padding written with the token
            src += 1
    slots = slices_for(batch, block_tables, PAGE)
    kv_lens = np.zeros(MAX_SEQS, np.int32)
    kv_lens[: len(batch)] = [kv for _, kv in batch]
    cu = np.zeros(MAX_SEQS + 1, np.int32)
    cu[1 : len(batch) + 1] = np.cumsum([ql for ql, _ in batch])
    cu[len(batch) + 1 :] = cu[len(batch)]
    md = PallasMetadata(
        slot_mapping=torch.from_numpy(slots),
        block_tables=torch.from_numpy(block_tables),
        context_lens=torch.from_numpy(kv_lens),
        query_start_loc=torch.from_numpy(cu),
        num_seqs=torch.tensor([len(batch)], dtype=torch.int32),
        num_kv_update_slices=torch.tensor([slots.shape[1]], dtype=torch.int32),
        num_slices_per_kv_cache_update_block=8,
    )
    t = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
    return types.SimpleNamespace(
        query=t(q).reshape(len(q), HEADS * HEAD_DIM),
        key=t(k).reshape(len(k), KV_HEADS * HEAD_DIM),
        value=t(v).reshape(len(v), KV_HEADS * HEAD_DIM),
        kv_cache=t(cache),
        md=md,
        q_np=q,
        expected_cache=expected,
        block_tables=block_tables,
        kv_lens=kv_lens,
        cu=cu,
        num_seqs=len(batch),
        total=total,
    )


MIXED = [
    (1, 37),
    (1, 130),
    (20, 20),
    (12, 75),
    (1, 16),
    (9, 200),
]  # decodes, a fresh prefill, chunked prefills


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HEADS * HEAD_DIM,
                "intermediate_size": 512,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS,
                "head_dim": HEAD_DIM,
                "num_hidden_layers": 2,
                "vocab_size": 256,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "float32",
            }
        )
    )
    mc = ModelConfig(
        model=str(d), skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN, dtype="float32"
    )
    return VllmConfig(
        model_config=mc,
        cache_config=CacheConfig(block_size=PAGE),
        scheduler_config=SchedulerConfig(
            max_num_seqs=MAX_SEQS,
            max_num_batched_tokens=MAX_TOKENS,
            max_model_len=MAX_MODEL_LEN,
            is_encoder_decoder=False,
        ),
        device_config=DeviceConfig(device="cpu"),
    )


@pytest.fixture
def seams():
    from tpu_registry_vllm import kernel_binding

    ref = RecordingReference()
    with (
        kernel_binding.bind("rpa_v2", ref),
        kernel_binding.bind("kv_cache_update", torch_kv_cache_update),
    ):
        yield ref


LAYER = types.SimpleNamespace(
    _k_scale_float=1.0, _v_scale_float=1.0
)  # what forward reads of the layer


def make_impl(vllm_config, *, sliding_window=None, soft_cap=None, scale=None):
    from tpu_registry_vllm.torch_xla_pallas import RegistryPallasBackendImpl
    from vllm.config import set_current_vllm_config

    scale = 1.0 / math.sqrt(HEAD_DIM) if scale is None else scale
    args = (
        HEADS,
        HEAD_DIM,
        scale,
        KV_HEADS,
        None,
        sliding_window,
        "auto",
        soft_cap,
        "decoder",
        None,
    )
    if vllm_config is None:
        return RegistryPallasBackendImpl(*args)
    with set_current_vllm_config(vllm_config):  # as vLLM does while it builds the model
        return RegistryPallasBackendImpl(*args)


def expected_kwargs(sliding_window=None, max_tokens=MAX_TOKENS, max_seqs=MAX_SEQS):
    from tpu_registry import Workload, resolve

    w = Workload(
        num_q_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        q_dtype="float32",
        kv_dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max_tokens,
        page_size=PAGE,
        sliding_window=sliding_window,
    )
    cfg = resolve(w)
    assert cfg.generation == "v6e"
    return cfg, cfg.kernel_kwargs("rpa_v2")


# ----------------------------------------------------------------------------- tests
def test_nonkernel_path_ignores_tuning_kwargs(offline_env):
    from torch_xla.experimental.custom_kernel import ragged_paged_attention

    sig = inspect.signature(ragged_paged_attention)
    assert {
        "num_kv_pages_per_block",
        "num_queries_per_block",
        "vmem_limit_bytes",
        "use_kernel",
    } <= set(sig.parameters)
    b = make_batch(MIXED, seed=1)
    q = b.query.view(-1, HEADS, HEAD_DIM)
    q = torch.nn.functional.pad(q, (0, 128 - HEAD_DIM))
    args = (
        q,
        b.kv_cache,
        b.md.context_lens,
        b.md.block_tables,
        b.md.query_start_loc,
        b.md.num_seqs,
    )
    plain = ragged_paged_attention(*args, use_kernel=False, sm_scale=0.1)
    tuned = ragged_paged_attention(
        *args,
        use_kernel=False,
        sm_scale=0.1,
        num_kv_pages_per_block=3,
        num_queries_per_block=7,
        vmem_limit_bytes=1,
    )
    assert torch.equal(plain, tuned)


@pytest.mark.parametrize(
    ("sliding_window", "soft_cap", "scale"),
    [(None, None, None), (48, None, None), (None, 3.0, 0.5), (40, 2.5, 0.4)],
)
def test_forward_matches_reference(
    offline_env, vllm_config, seams, sliding_window, soft_cap, scale
):
    impl = make_impl(vllm_config, sliding_window=sliding_window, soft_cap=soft_cap, scale=scale)
    cfg, want = expected_kwargs(sliding_window)
    assert impl.kernel_kwargs == want  # resolved at construction, for this layer's shape
    assert set(want) == {"num_kv_pages_per_block", "num_queries_per_block", "vmem_limit_bytes"}
    assert (
        want["vmem_limit_bytes"] == 120 * 1024 * 1024
        and want["num_kv_pages_per_block"] <= MAX_MODEL_LEN // PAGE
    )
    assert impl.registry_config is not None and impl.registry_config.workload.page_size == PAGE

    b = make_batch(MIXED, seed=7)
    out = impl.forward(LAYER, b.query, b.key, b.value, b.kv_cache, b.md)

    assert out.shape == (b.total, HEADS * HEAD_DIM)
    assert b.kv_cache.shape[-1] == 128  # padded to the lane width, not beyond
    np.testing.assert_array_equal(
        b.kv_cache.numpy(), b.expected_cache
    )  # the KV write, slot by slot
    ref = ref_attention(
        b.q_np,
        b.expected_cache[..., :HEAD_DIM],
        b.kv_lens,
        b.block_tables,
        b.cu,
        b.num_seqs,
        scale=impl.scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    np.testing.assert_allclose(
        out.view(-1, HEADS, HEAD_DIM).double().numpy(), ref, rtol=2e-5, atol=2e-5
    )
    if sliding_window is not None or soft_cap is not None:  # the batch exercises them
        plain = ref_attention(
            b.q_np,
            b.expected_cache[..., :HEAD_DIM],
            b.kv_lens,
            b.block_tables,
            b.cu,
            b.num_seqs,
            scale=impl.scale,
        )
        assert np.abs(plain - ref).max() > 1e-2

    assert len(seams.calls) == 1
    kw = seams.calls[0]
    assert {k: kw[k] for k in want} == want  # exactly the registry's knobs reach the kernel
    assert (
        kw["use_kernel"] is True
        and kw["sliding_window"] == sliding_window
        and kw["soft_cap"] == soft_cap
    )
    assert kw["sm_scale"] == impl.scale and kw["k_scale"] == 1.0 and kw["v_scale"] == 1.0
    assert set(kw) == set(want) | {
        "use_kernel",
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "k_scale",
        "v_scale",
    }


def test_one_startup_line(offline_env, vllm_config):
    import logging

    from tpu_registry_vllm import torch_xla_pallas as legacy

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Collect()
    legacy.log.addHandler(handler)  # vLLM's "vllm" logger does not propagate: listen on ours
    legacy._logged.clear()
    try:
        for _ in range(3):  # one impl per layer; one line per process
            make_impl(vllm_config, sliding_window=48)
    finally:
        legacy.log.removeHandler(handler)
    lines = handler.lines
    assert legacy.log.name.startswith("vllm.")  # printed by vLLM's own handler
    assert len(lines) == 1, lines
    _, want = expected_kwargs(48)
    line = lines[0]
    assert line.startswith("tpu-registry: v6e (")
    assert "page_size=16 [workload]" in line  # vLLM's page size, pinned
    for name, value in want.items():
        assert f"{name}={value} [" in line
    assert "head_dim 96->128" in line


def test_forward_with_padded_tokens(offline_env, vllm_config, seams):
    impl = make_impl(vllm_config, sliding_window=48, soft_cap=4.0)
    b = make_batch(MIXED, seed=11, pad_tokens=5)  # vLLM pads the token count to a bucket
    out = impl.forward(LAYER, b.query, b.key, b.value, b.kv_cache, b.md)
    assert out.shape == (b.total + 5, HEADS * HEAD_DIM)
    ref = ref_attention(
        b.q_np,
        b.expected_cache[..., :HEAD_DIM],
        b.kv_lens,
        b.block_tables,
        b.cu,
        b.num_seqs,
        scale=impl.scale,
        sliding_window=48,
        soft_cap=4.0,
    )
    np.testing.assert_allclose(
        out[: b.total].view(-1, HEADS, HEAD_DIM).double().numpy(), ref, rtol=2e-5, atol=2e-5
    )
    np.testing.assert_array_equal(b.kv_cache.numpy(), b.expected_cache)


def test_decode_only_and_bf16(offline_env, vllm_config, seams):
    impl = make_impl(vllm_config, sliding_window=32)
    b = make_batch([(1, 5), (1, 64), (1, 65), (1, 250)], seed=3, dtype=torch.bfloat16)
    out = impl.forward(LAYER, b.query, b.key, b.value, b.kv_cache, b.md)
    cache = b.kv_cache.float().numpy()
    q = b.query.float().view(-1, HEADS, HEAD_DIM).numpy()
    ref = ref_attention(
        q,
        cache[..., :HEAD_DIM],
        b.kv_lens,
        b.block_tables,
        b.cu,
        b.num_seqs,
        scale=impl.scale,
        sliding_window=32,
    )
    np.testing.assert_allclose(
        out.float().view(-1, HEADS, HEAD_DIM).numpy(), ref, rtol=0.05, atol=0.05
    )


def test_without_a_vllm_config_resolves_from_the_first_call(offline_env, seams):
    impl = make_impl(None)
    assert impl.kernel_kwargs is None
    b = make_batch(MIXED, seed=5)
    impl.forward(LAYER, b.query, b.key, b.value, b.kv_cache, b.md)
    # limits read from the tensors: page 16, block table 8 x 16 pages, 69 tokens in this call
    _, want = expected_kwargs(max_tokens=b.total, max_seqs=MAX_SEQS)
    assert impl.kernel_kwargs == want
    assert {k: seams.calls[0][k] for k in want} == want


def test_profiling_call_and_kv_sharing(offline_env, vllm_config, seams):
    impl = make_impl(vllm_config)
    q = torch.randn(4, HEADS * HEAD_DIM)
    out = impl.forward(
        LAYER, q, q[:, : KV_HEADS * HEAD_DIM], q[:, : KV_HEADS * HEAD_DIM], torch.empty(0), None
    )
    assert torch.equal(out, torch.ones_like(q)) and not seams.calls
    impl.kv_sharing_target_layer_name = "model.layers.0.self_attn.attn"
    b = make_batch(MIXED, seed=9)
    before = b.kv_cache.clone()
    impl.forward(LAYER, b.query, b.key, b.value, b.kv_cache, b.md)
    assert torch.equal(before, b.kv_cache)  # a layer sharing another's cache does not write


def test_impl_signature_matches_upstream():
    from tpu_registry_vllm.torch_xla_pallas import RegistryPallasBackend, RegistryPallasBackendImpl
    from vllm.v1.attention.backends.pallas import PallasAttentionBackend, PallasAttentionBackendImpl

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(RegistryPallasBackendImpl.__init__) == params(
        PallasAttentionBackendImpl.__init__
    )  # exactly the ten
    assert len(params(RegistryPallasBackendImpl.__init__)) == 11
    assert params(RegistryPallasBackendImpl.forward) == params(PallasAttentionBackendImpl.forward)
    assert RegistryPallasBackend.get_name() == "PALLAS"
    assert (
        RegistryPallasBackend.get_kv_cache_shape(8, 16, 2, 96)
        == PallasAttentionBackend.get_kv_cache_shape(8, 16, 2, 96)
        == (8, 16, 4, 128)
    )


def test_defaults_of_the_seams():
    """On a TPU the seams hold what upstream's forward calls."""
    from tpu_registry_vllm import kernel_binding
    from vllm.v1.attention.backends.pallas import write_to_kv_cache

    assert kernel_binding._default("kv_cache_update") is write_to_kv_cache
    assert kernel_binding._default("rpa_v2") is torch.ops.xla.ragged_paged_attention
    assert os.environ.get("TPU_REGISTRY_VLLM") in (None, "", "force", "auto", "off")
