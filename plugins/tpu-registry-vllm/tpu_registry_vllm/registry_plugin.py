"""The vLLM plugin's side of the tpu-registry plugin contract: the variables it reads.

Registered in the ``tpu_registry`` entry-point group, so ``tpu-registry plugins`` lists it and
the settings registry documents its variables. It imports no vLLM code.
"""

from __future__ import annotations

import tpu_registry
from tpu_registry import Setting

from . import ENV_MODE

# What the plugin exported, so a forked child (which inherits the variables) can tell its
# parent's export from a value the user set.
ENV_EXPORTED = "TPU_REGISTRY_VLLM_EXPORTED"
ENV_EXPORT = "TPU_REGISTRY_VLLM_EXPORT"


@tpu_registry.hookimpl
def tpu_registry_settings() -> list[Setting]:
    return [
        Setting(
            ENV_MODE,
            "`auto` (only on TPU), `force` or `off`: whether the vLLM plugin registers its "
            "backend and platform.",
            default="auto",
        ),
        Setting(
            ENV_EXPORT,
            "`on` (default) or `off`: whether the platform plugin exports RPA_V3_*_BLOCK_SIZES, "
            "which tpu-inference's own attention reads (JAX-native models, its default backend).",
            default="on",
        ),
        Setting(
            ENV_EXPORTED,
            "Internal: the RPA_V3_*_BLOCK_SIZES values the vLLM plugin exported, so a child "
            "process can tell them from the user's.",
        ),
    ]


# The stacks the adapters are tested with (integration/requirements-*.txt), as version ranges:
# (distribution, lowest, first version past the range).
TESTED = {
    "current": (("vllm-tpu", "0.32.0", "0.33"), ("tpu-inference", "0.32.0", "0.33")),
    "legacy": (("vllm", "0.11.2", "0.14"), ("torch-xla", "2.9.0", "2.10")),
}
CANNOT_REACH = {
    "current": [
        "models tpu-inference runs as JAX modules (Llama, Qwen2, Qwen3 by default): only the "
        "exported RPA_V3_*_BLOCK_SIZES reach them, not the VMEM limit; MODEL_IMPL_TYPE=vllm "
        "routes them through --attention-backend TPU_REGISTRY",
        "head dim 64 and attention sinks outside --attention-backend TPU_REGISTRY: tpu-inference "
        "passes its hd64 kernel no block sizes and reads no variable for them (page size only)",
        "MLA models (DeepSeek, Kimi): tpu-inference always runs FLASH_ATTN_MLA for them and "
        "builds the MLA kernel's arguments itself; only the page size reaches them",
        "logits_soft_cap on the vLLM-model path: tpu-inference drops it before attention",
    ],
    "legacy": [
        "the page size: vLLM 0.13 sets it itself and ignores --block-size",
        "the KV cache layout: vLLM 0.13's base class lays it out",
    ],
}


def _key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split(".")[:3])


def _in_range(version: str | None, low: str, past: str) -> bool:
    return version is not None and _key(low) <= _key(version) < _key(past)


@tpu_registry.hookimpl
def tpu_registry_doctor(context) -> dict:
    """The vLLM plugin's part of ``tpu-registry doctor``, from package metadata only."""
    import importlib.util

    packages = context.packages
    if packages.get("tpu-inference"):
        adapter = "current"
    elif packages.get("vllm") and packages.get("torch-xla"):
        adapter = "legacy"
    else:
        return {
            "adapter": "none: neither vllm-tpu + tpu-inference nor vllm + torch-xla is installed"
        }
    ranges = TESTED[adapter]
    tested = [
        f"{name} {packages.get(name) or 'missing'} (tested {low} to <{past})"
        for name, low, past in ranges
    ]
    in_range = all(_in_range(packages.get(name), low, past) for name, low, past in ranges)
    mode = context.env.get(ENV_MODE, "auto").strip().lower() or "auto"
    libtpu = importlib.util.find_spec("libtpu") is not None
    active = {"off": "no (TPU_REGISTRY_VLLM=off)", "force": "yes (TPU_REGISTRY_VLLM=force)"}.get(
        mode, f"on a TPU host only (libtpu {'importable' if libtpu else 'not importable here'})"
    )
    out = {
        "adapter": "tpu_inference_backend (--attention-backend TPU_REGISTRY) and the platform"
        if adapter == "current"
        else "torch_xla_pallas (PALLAS)",
        "versions": tested,
        "in_tested_range": in_range,
        "activates": active,
    }
    cfg = context.config
    if cfg is None:
        out["would_apply"] = f"nothing known: {context.error or 'no configuration'}"
    elif adapter == "current":
        page = cfg.value("page_size")
        apply = [f"--block-size {page} (unless you give --block-size)"]
        for case in ("d", "p", "m"):
            t = cfg.value(f"rpa_v3.{case}_block_sizes")
            if t is None:
                continue
            why = tpu_registry.rpa_v3_rejection(t, page)
            shown = ",".join(map(str, t))
            apply.append(
                f"rpa_v3.{case}_block_sizes {shown}"
                + (f" left to the kernel ({why})" if why else "")
            )
        apply.append(f"rpa_v3.vmem_limit_bytes {cfg.value('rpa_v3.vmem_limit_bytes')}")
        apply.append("block sizes resolved per token bucket and shard at trace time")
        out["would_apply"] = apply
    else:
        kw = cfg.kernel_kwargs("rpa_v2")
        out["would_apply"] = [f"rpa_v2.{k} {v}" for k, v in kw.items()] or [
            "nothing: no rpa_v2 knobs"
        ]
    out["cannot_reach"] = CANNOT_REACH[adapter]
    return out
