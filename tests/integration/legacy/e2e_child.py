"""One vLLM 0.13 engine run of the legacy end-to-end test, in its own interpreter.

Usage: python e2e_child.py SPEC.json   (see test_e2e_generation.py)

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the test), so the kernel
stand-ins installed here are the ones the compiled model calls.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_cpu_shims  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.monotonic()
    e2e_cpu_shims.install()
    kernels = e2e_cpu_shims.RecordingKernels(sm_scale_factor=spec.get("sm_scale_factor", 1.0))
    kernels.install()

    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    t_ready = time.monotonic()
    # Greedy, a fixed length (ignore_eos), token ids only: most ids of the random model's
    # vocabulary are not in the tiny tokenizer.
    params = SamplingParams(
        temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False
    )
    outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    t_done = time.monotonic()

    from tpu_registry_vllm import kernel_binding

    vc = llm.llm_engine.vllm_config
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    impls = {}
    for name, layer in vc.compilation_config.static_forward_context.items():
        impl = getattr(layer, "impl", None)
        if impl is not None:
            cfg = getattr(impl, "registry_config", None)
            impls[name] = {
                "class": f"{type(impl).__module__}.{type(impl).__qualname__}",
                "kernel_kwargs": getattr(impl, "kernel_kwargs", None),
                "workload": None if cfg is None else dataclasses.asdict(cfg.workload),
                "layers": None if cfg is None else {n: k.layer for n, k in cfg.knobs.items()},
            }
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": [list(o.prompt_token_ids) for o in outputs],
        "calls": kernels.calls,
        "kv_updates": kernels.kv_updates,
        "impls": impls,
        "seams": {
            family: getattr(fn, "__module__", "")
            + "."
            + getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
            for family, fn in kernel_binding._bound.items()
        },
        "block_size": vc.cache_config.block_size,
        "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
        "kv_cache_shapes": [list(c.shape) for c in runner.kv_caches],
        "kv_cache_dtypes": [str(c.dtype).removeprefix("torch.") for c in runner.kv_caches],
        "platform": type(
            __import__("vllm.platforms", fromlist=["current_platform"]).current_platform
        ).__name__,
        "seconds": {"engine_start": round(t_ready - t0, 1), "generate": round(t_done - t_ready, 1)},
    }
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
