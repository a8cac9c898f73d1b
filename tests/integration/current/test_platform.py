"""Issue 5, test 3: the platform plugin's page size and block-size exports, and the CLI's
``--format vllm`` view of the same settings.

vLLM resolves the platform itself here: with the distribution installed and libtpu importable
(vLLM's TPU test), ``current_platform`` is ``TpuRegistryPlatform``, and ``EngineArgs`` runs its
``check_and_update_config`` as it would on a TPU host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tpu_inference.layers.common.attention_interface import rpa_block_size_kwargs
from tpu_registry_vllm import tpu_inference_backend as backend
from tpu_registry_vllm.vllm_config import workload_from_vllm
from vllm.engine.arg_utils import EngineArgs

from tpu_registry import resolve

VARS = (*backend.BLOCK_SIZE_ENV, backend.ENV_EXPORTED)


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, fmt, *args) -> None:
        self.lines.append(fmt % args)

    warning = info


@pytest.fixture
def clean(monkeypatch):
    for name in VARS + ("TPU_REGISTRY_OVERRIDES",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backend, "_logged", set())
    lines = Lines()
    monkeypatch.setattr(backend, "log", lines)
    yield lines
    for name in VARS:  # the plugin wrote them into os.environ directly
        os.environ.pop(name, None)


def engine(model, **kw):
    return EngineArgs(
        model=str(model),
        skip_tokenizer_init=True,
        load_format="dummy",
        max_model_len=2048,
        max_num_seqs=16,
        **kw,
    ).create_engine_config()


def test_platform_is_ours():
    from tpu_inference.platforms.tpu_platform import TpuPlatform
    from vllm.platforms import current_platform

    assert type(current_platform).__name__ == "TpuRegistryPlatform"
    assert isinstance(current_platform, TpuPlatform)


def test_page_size_from_registry(tiny_model, clean, tmp_path, monkeypatch):
    vc = engine(tiny_model)
    cfg = resolve(workload_from_vllm(vc))
    assert vc.cache_config.block_size == cfg.value("page_size") == 128
    assert vc.cache_config.user_specified_block_size is False
    assert cfg.layer("page_size") == "baseline"
    # An override shows the page size really comes from the registry (upstream would say 128).
    f = tmp_path / "overrides.toml"
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v6e"\n[override.knobs]\npage_size = 64\n'
    )
    monkeypatch.setenv("TPU_REGISTRY_OVERRIDES", str(f))
    vc = engine(tiny_model)
    assert vc.cache_config.block_size == 64
    cfg = resolve(workload_from_vllm(vc))
    assert cfg.layer("page_size") == "overrides"
    assert "page_size=64 [overrides]" in clean.lines[-1]
    # Block sizes were recomputed for that page size and exported.
    assert os.environ["RPA_V3_DECODE_BLOCK_SIZES"] == ",".join(
        map(str, cfg.value("rpa_v3.d_block_sizes"))
    )


def test_user_block_size_is_kept(tiny_model, clean):
    vc = engine(tiny_model, block_size=32)
    assert vc.cache_config.block_size == 32 and vc.cache_config.user_specified_block_size is True
    cfg = resolve(workload_from_vllm(vc))
    assert cfg.value("page_size") == 32 and cfg.layer("page_size") == "workload"
    assert "page_size=32 [workload]" in clean.lines[-1]
    # Kernel blocks for the page size actually used: multiples of 32.
    assert all(
        b % 32 == 0
        for name in ("d", "p", "m")
        for b in cfg.value(f"rpa_v3.{name}_block_sizes")[1::2]
    )


def test_exports_equal_registry_and_reach_tpu_inference(tiny_model, clean):
    vc = engine(tiny_model, attention_backend="TPU_REGISTRY")
    cfg = resolve(workload_from_vllm(vc))
    want = {
        "d_block_sizes": cfg.value("rpa_v3.d_block_sizes"),
        "p_block_sizes": cfg.value("rpa_v3.p_block_sizes"),
        "m_block_sizes": cfg.value("rpa_v3.m_block_sizes"),
    }
    for var, knob in backend.BLOCK_SIZE_ENV.items():
        assert os.environ[var] == ",".join(map(str, cfg.value(knob)))
    assert rpa_block_size_kwargs() == want  # what tpu-inference's own call sites forward
    assert (
        "RPA_V3_{DECODE,PREFILL,MIXED}_BLOCK_SIZES exported (tpu-inference's own attention reads "
        "them: JAX-native models and its default backend; TPU_REGISTRY_VLLM_EXPORT=off keeps "
        "its defaults)" in clean.lines[-1]
    )
    assert len(clean.lines) == 1


def test_export_can_be_turned_off(tiny_model, clean, monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_VLLM_EXPORT", "off")
    engine(tiny_model, attention_backend="TPU_REGISTRY")
    for var in backend.BLOCK_SIZE_ENV:
        assert var not in os.environ
    assert rpa_block_size_kwargs() == {}  # tpu-inference keeps its own defaults
    assert "RPA_V3_*_BLOCK_SIZES not exported (TPU_REGISTRY_VLLM_EXPORT=off)" in clean.lines[-1]


def test_user_value_is_kept(tiny_model, clean, monkeypatch):
    monkeypatch.setenv("RPA_V3_MIXED_BLOCK_SIZES", "64,256,32,128")
    vc = engine(tiny_model)
    cfg = resolve(workload_from_vllm(vc))
    assert os.environ["RPA_V3_MIXED_BLOCK_SIZES"] == "64,256,32,128"
    assert rpa_block_size_kwargs()["m_block_sizes"] == (64, 256, 32, 128)
    assert rpa_block_size_kwargs()["d_block_sizes"] == cfg.value("rpa_v3.d_block_sizes")
    line = clean.lines[-1]
    assert "RPA_V3_MIXED_BLOCK_SIZES=64,256,32,128 kept (set by the user)" in line
    assert "RPA_V3_{DECODE,PREFILL}_BLOCK_SIZES exported" in line


def test_forked_child_may_update_its_parents_export():
    """A value this plugin exported (inherited by a forked process) is not mistaken for the
    user's; a value the user set is never overwritten."""
    cfg = resolve({"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 128, "max_model_len": 2048})
    env: dict[str, str] = {}
    backend.export_block_sizes(cfg, env)
    first = dict(env)
    cfg2 = resolve({"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 128, "max_model_len": 512})
    env["RPA_V3_MIXED_BLOCK_SIZES"] = "64,256,32,128"  # the user changed this one
    notes = backend.export_block_sizes(cfg2, env)
    assert (
        env["RPA_V3_DECODE_BLOCK_SIZES"]
        == ",".join(map(str, cfg2.value("rpa_v3.d_block_sizes")))
        != first["RPA_V3_DECODE_BLOCK_SIZES"]
    )
    assert env["RPA_V3_MIXED_BLOCK_SIZES"] == "64,256,32,128"
    assert [n for n in notes if "kept" in n] == [
        "RPA_V3_MIXED_BLOCK_SIZES=64,256,32,128 kept (set by the user)"
    ]


def test_cli_format_vllm_matches_what_the_platform_applies(tiny_model, clean):
    vc = engine(tiny_model)
    applied = [f"--block-size {vc.cache_config.block_size}"] + [
        f"export {var}={os.environ[var]}" for var in backend.BLOCK_SIZE_ENV
    ]
    cli = Path(sys.executable).parent / "tpu-registry"
    sc = vc.scheduler_config
    p = subprocess.run(
        [
            str(cli),
            "resolve",
            "--hf-config",
            str(tiny_model / "config.json"),
            "--max-model-len",
            str(vc.model_config.max_model_len),
            "--max-num-seqs",
            str(sc.max_num_seqs),
            "--max-num-batched-tokens",
            str(sc.max_num_batched_tokens),
            "--format",
            "vllm",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = [line for line in p.stdout.splitlines() if not line.startswith("#")]
    assert printed == applied, p.stdout
    vmem = resolve(workload_from_vllm(vc)).value("rpa_v3.vmem_limit_bytes")
    assert f"RPA v3 VMEM limit: {vmem} bytes" in p.stdout


# A tiny DeepSeek-V2-shaped model: vLLM runs it as MLA (kv_lora_rank 64 + rope 32 per token).
TINY_MLA = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 64,
    "q_lora_rank": None,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 4096,
    "vocab_size": 1024,
    "torch_dtype": "bfloat16",
}
DP_ATTENTION = {"sharding": {"sharding_strategy": {"enable_dp_attention": True}}}


def test_mla_models_get_the_registry_page(clean, tmp_path, monkeypatch):
    """MLA layers always run tpu-inference's FLASH_ATTN_MLA; what the registry reaches is the
    page size (PallasMLAttentionBackend.get_page_size upstream), shown by an override."""
    import json

    model = tmp_path / "tiny-mla"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_MLA))
    monkeypatch.setenv("NEW_MODEL_DESIGN", "1")  # tpu-inference requires it for MLA
    vc = engine(model, additional_config=DP_ATTENTION)
    w = workload_from_vllm(vc)
    assert vc.model_config.use_mla and w.is_mla
    assert (w.num_kv_heads, w.head_dim, w.kv_lora_rank, w.qk_rope_head_dim) == (1, 96, 64, 32)
    cfg = resolve(w)
    assert vc.cache_config.block_size == cfg.value("page_size") == 1024  # upstream's page
    assert any("decode_batch_size=4 [baseline]" in line for line in clean.lines)  # its knobs
    f = tmp_path / "overrides.toml"
    f.write_text(
        'schema_version = 1\n[[override]]\ngeneration = "v6e"\n[override.knobs]\npage_size = 256\n'
    )
    monkeypatch.setenv("TPU_REGISTRY_OVERRIDES", str(f))
    vc = engine(model, additional_config=DP_ATTENTION)
    assert vc.cache_config.block_size == 256
    assert vc.cache_config.user_specified_block_size is False
