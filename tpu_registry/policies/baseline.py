"""The baseline policy: what upstream computes today, derived from catalog facts.

Page size, minimum page size and sequences per SMEM as vLLM / tpu-inference compute them
(with SMEM read from the catalog instead of a 1 MiB constant); head dim padded to the lane
width; the defaults of each kernel that runs the workload (RPA v2 under torch_xla; RPA v3, its
head-dim-64 variant or MLA v2 under tpu-inference), from the numbers each generation file
carries. The formulas live in ``tpu_registry.kernels``.
"""

from __future__ import annotations

from tpu_registry.hookspecs import hookimpl
from tpu_registry.types import Layer

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from tpu_registry.records import Generation
    from tpu_registry.workload import Workload


def knobs_for(spec: Generation, w: Workload, page: int) -> tuple[dict, list[str]]:
    """Every baseline knob for a given page size, and notes on what could not be given."""
    from tpu_registry import kernels  # on first use: detection registers this plugin too

    chip = spec.chip
    knobs: dict = {
        "head_dim_padded": kernels.padded_head_dim(w.head_dim, chip.lanes),
        "page_size": page,
        "min_page_size": kernels.min_page_size(
            chip.smem_bytes_per_core, w.max_model_len, w.max_num_seqs, where=spec.id
        ),
        "max_num_seqs_smem": kernels.max_num_seqs_for(
            chip.smem_bytes_per_core, w.max_model_len, page
        ),
        "vmem_limit_bytes": chip.vmem_bytes_per_core,
    }
    notes = []
    families = kernels.families_for(spec, w)
    if "rpa_v2" in families:
        v2 = kernels.rpa_v2_defaults(
            spec.kernels.rpa_v2, chip.lanes, chip.vmem_bytes_per_core, w, page
        )
        if isinstance(v2, str):
            notes.append(v2)
        else:
            knobs.update(v2)
    if "rpa_v3" in families and w.kv_dtype == "int8":
        notes.append("rpa_v3: the kernel does not take an int8 KV cache")
    elif "rpa_v3" in families:
        v3, shrunk = kernels.rpa_v3_defaults(spec.kernels.rpa_v3, chip.vmem_bytes_per_core, w, page)
        knobs.update(v3)
        notes += shrunk
    if "rpa_v3_hd64" in families and w.kv_dtype == "int8":
        notes.append("rpa_v3_hd64: the kernel does not take an int8 KV cache")
    elif "rpa_v3_hd64" in families:
        hd64, why = kernels.rpa_v3_hd64_defaults(
            spec.kernels.rpa_v3_hd64, chip.vmem_bytes_per_core, w, page
        )
        knobs.update(hd64)
        notes += why
    if "mla_v2" in families and w.kv_dtype == "int8":
        notes.append("mla_v2: the kernel does not take an int8 KV cache")
    elif "mla_v2" in families:
        knobs.update(kernels.mla_v2_defaults(spec.kernels.mla_v2, chip.vmem_bytes_per_core))
    if not spec.kernels.families:
        notes.append(f"no paged-attention kernel supports {spec.id}; only common knobs are given")
    elif not families:
        notes.append(
            f"no paged-attention kernel of {spec.id} runs this attention shape; only common "
            "knobs are given"
        )
    return knobs, notes


@hookimpl(trylast=True)
def tpu_registry_tune(spec: Generation, workload: Workload) -> Layer:
    from tpu_registry import kernels

    page = kernels.page_size_of(spec, workload)
    knobs, notes = knobs_for(spec, workload, page)
    return Layer("baseline", knobs, note="; ".join(notes))
