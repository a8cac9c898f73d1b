"""One vLLM engine run of the end-to-end tests, in its own interpreter.

Usage: python e2e_child.py SPEC.json   (SPEC names the model, the backend, the kernel stand-in,
the prompts and where to write the result; see test_e2e_generation.py)

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the test), so the kernel
stand-ins bound here are the ones the model calls, and the runner is reachable for its KV
cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_cpu_shims  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.monotonic()
    e2e_cpu_shims.install()

    from tpu_inference.layers.common import attention_interface
    from tpu_registry_vllm import kernel_binding
    from vllm import LLM, SamplingParams

    stand_in = dict(
        sm_scale_factor=spec.get("sm_scale_factor", 1.0),
        check_reference=spec.get("check_reference", False),
    )
    ref = e2e_cpu_shims.RecordingReference("registry", **stand_in)
    # The registry's backend calls its kernel through the seam; tpu-inference's own RPA path
    # (the default backend, and JAX-native models) calls the module global
    # attention_interface.ragged_paged_attention (sharded_ragged_paged_attention,
    # `func = ... ragged_paged_attention`), looked up at trace time.
    attention_interface.ragged_paged_attention = e2e_cpu_shims.RecordingReference(
        "upstream", **stand_in
    )
    upstream = attention_interface.ragged_paged_attention

    ref_hd64 = e2e_cpu_shims.RecordingReferenceHd64("registry")
    with kernel_binding.bind("rpa_v3", ref), kernel_binding.bind("rpa_v3_hd64", ref_hd64):
        llm = LLM(model=spec["model"], **spec["engine"])
        t_ready = time.monotonic()
        # Greedy, a fixed length (ignore_eos), token ids only: most ids of the random model's
        # vocabulary are not in the tiny tokenizer.
        params = SamplingParams(
            temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False
        )
        outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    t_done = time.monotonic()

    vc = llm.llm_engine.vllm_config
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    from tpu_inference.models.common.model_loader import resolve_model_impl_type
    from tpu_registry_vllm import tpu_inference_backend as backend

    cfg = backend._active
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": [list(o.prompt_token_ids) for o in outputs],
        "calls": ref.calls + upstream.calls,
        "hd64_calls": ref_hd64.calls,
        "hd64_runs": ref_hd64.runs,
        "runs": {"registry": ref.runs, "upstream": upstream.runs},
        "checks": ref.checks + upstream.checks,
        "block_size": vc.cache_config.block_size,
        "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
        "attention_backend": str(getattr(vc.attention_config, "backend", None)),
        "model_impl": resolve_model_impl_type(
            vc
        ),  # flax_nnx: tpu-inference's JAX model; vllm: vLLM's
        "kv_cache_shapes": [list(c.shape) for c in runner.kv_caches],
        "kv_cache_dtypes": [str(c.dtype) for c in runner.kv_caches],
        "env": {
            k: os.environ.get(k)
            for k in (
                "RPA_V3_DECODE_BLOCK_SIZES",
                "RPA_V3_PREFILL_BLOCK_SIZES",
                "RPA_V3_MIXED_BLOCK_SIZES",
                "MODEL_IMPL_TYPE",
            )
        },
        "registry": None
        if cfg is None
        else {
            "generation": cfg.generation,
            "workload": dataclasses.asdict(cfg.workload),
            "layers": {n: k.layer for n, k in cfg.knobs.items()},
        },
        "seconds": {"engine_start": round(t_ready - t0, 1), "generate": round(t_done - t_ready, 1)},
    }
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
