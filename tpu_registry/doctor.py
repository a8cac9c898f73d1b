"""``tpu-registry doctor``: what is installed, what the registry would choose here, and what
each plugin (the vLLM one above all) would apply and cannot reach.

It imports no framework: versions come from package metadata, and plugins contribute their
part through the ``tpu_registry_doctor`` hook. It is what a user pastes into a bug report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from .errors import RegistryError
from .types import DoctorContext, format_value
from .workload import Workload

# Distributions a TPU serving stack is made of, by their PyPI names.
PACKAGES = (
    "tpu-registry",
    "tpu-registry-vllm",
    "tpu-registry-gce",
    "vllm",
    "vllm-tpu",
    "tpu-inference",
    "jax",
    "jaxlib",
    "libtpu",
    "torch",
    "torch-xla",
)
# When no workload is given: Llama-3.1-8B's attention (examples/llama-3.1-8b.json).
EXAMPLE = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "max_model_len": 8192}
KNOBS = ("page_size", "vmem_limit_bytes", "rpa_v3.d_block_sizes", "rpa_v3.p_block_sizes",
         "rpa_v3.m_block_sizes", "rpa_v3.vmem_limit_bytes", "rpa_v2.num_kv_pages_per_block",
         "rpa_v2.num_queries_per_block", "rpa_v2.vmem_limit_bytes")  # fmt: skip


def installed() -> dict[str, str | None]:
    """Versions from package metadata (None: not installed). Nothing is imported."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def report(workload: Workload | None, **resolve_args: Any) -> dict[str, Any]:
    """The doctor report as plain data; never raises for a problem it can describe."""
    from .plugins import get_plugins
    from .resolution import resolve

    packages = installed()
    example = workload is None
    w = Workload(**EXAMPLE) if workload is None else workload
    config, error = None, ""
    try:
        config = resolve(w, **resolve_args)
    except RegistryError as e:
        error = str(e)
    plugins = get_plugins()
    plugins.load_all()  # every plugin's load faults are reported, not only its hooks' callers
    context = DoctorContext(packages, config=config, error=error, env=dict(os.environ))
    sections, faults = plugins.doctor(context)
    out: dict[str, Any] = {
        "packages": packages,
        "workload": {**w.to_dict(), "example": example},
        "generation": config.generation if config else None,
        "detection": config.detection.to_dict() if config else None,
        "knobs": {k: _knob(config.knobs[k]) for k in KNOBS if config and k in config.knobs},
        "error": error,
        "plugins": sections,
        "faults": [f.to_dict() for f in [*plugins.load_faults, *faults]],
    }
    return out


def _knob(k) -> dict[str, Any]:
    return {
        "value": list(k.value) if isinstance(k.value, tuple) else k.value,
        "provenance": k.provenance(),
    }


def text(r: Mapping[str, Any]) -> str:
    lines = ["packages:"]
    lines += [f"  {name:18} {ver or '-'}" for name, ver in r["packages"].items()]
    w = r["workload"]
    what = (
        " (example: Llama-3.1-8B; pass --hf-config or --heads/--kv-heads/--head-dim)"
        if w["example"]
        else ""
    )
    shape = f"{w['num_q_heads']} q / {w['num_kv_heads']} kv heads, head dim {w['head_dim']}"
    lines.append(f"workload: {shape}, max_model_len {w['max_model_len']}{what}")
    if r["error"]:
        lines.append("registry: not resolved: " + r["error"].replace("\n", "; "))
    else:
        d = r["detection"]
        lines.append(f"registry: {r['generation']} ({d['status']}: {d['reason']})")
        for name, k in r["knobs"].items():
            value = tuple(k["value"]) if isinstance(k["value"], list) else k["value"]
            lines.append(f"  {name} = {format_value(value)}  [{k['provenance']}]")
    for plugin, section in r["plugins"].items():
        lines.append(f"plugin {plugin}:")
        for key, value in section.items():
            if isinstance(value, list):
                lines.append(f"  {key}:")
                lines += [f"    - {v}" for v in value]
            else:
                lines.append(f"  {key}: {value}")
    lines += [f"plugin fault: {f['plugin']}: {f['message']}" for f in r["faults"]]
    return "\n".join(lines)
