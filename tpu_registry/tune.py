"""The workload, the tuning hook's layers, and merging them with provenance.

A policy returns a ``Layer``: a name and a partial mapping of knobs. Knob names are flat and
namespaced by kernel family (``page_size``, ``rpa_v2.num_kv_pages_per_block``,
``rpa_v3.d_block_sizes``); a new kernel family is a new namespace, not a schema change.
Layers merge in hook call order (the first called wins); each final knob remembers its layer.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CatalogError, Problem, TuningError

if TYPE_CHECKING:
    from .detect import Detection
    from .spec import Generation

ENV_POLICIES = "TPU_REGISTRY_POLICIES"

# dtype name -> bits. Names as JAX/torch spell them, plus the short forms people type.
DTYPE_BITS = {
    "float32": 32,
    "bfloat16": 16,
    "float16": 16,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "int8": 8,
}
DTYPE_ALIASES = {
    "f32": "float32", "fp32": "float32", "float": "float32",
    "bf16": "bfloat16", "auto": "bfloat16",
    "fp16": "float16", "half": "float16",
    "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2",
    "i8": "int8",
}


def canonical_dtype(name: str) -> str:
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BITS:
        raise TuningError(f"unknown dtype {name!r} (use one of: {', '.join(sorted(DTYPE_BITS))}, or bf16, fp8, fp8_e5m2, int8)")
    return key


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(x: int, a: int) -> int:
    return cdiv(x, a) * a


@dataclass(frozen=True)
class Workload:
    """What a tuning decision needs to know about the model and the serving limits."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int | None = None  # fixed by the user (vLLM --block-size)
    sliding_window: int | None = None
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        problems = []

        def bad(name: str, msg: str, hint: str) -> None:
            problems.append(Problem("workload", None, name, msg, hint))

        for name in ("num_q_heads", "num_kv_heads", "head_dim", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, f"must be a positive whole number, got {v!r}", "check the model config")
        for name in ("page_size", "sliding_window"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                bad(name, f"must be a positive whole number or unset, got {v!r}", "leave it unset to let the registry choose")
        if not problems:
            if self.num_q_heads % self.num_kv_heads:
                bad("num_kv_heads", f"{self.num_kv_heads} KV heads do not divide {self.num_q_heads} query heads", "grouped-query attention needs q heads = k x kv heads")
            if self.num_q_heads % self.tensor_parallel:
                bad("tensor_parallel", f"{self.tensor_parallel}-way tensor parallelism does not divide {self.num_q_heads} query heads", "use a tensor-parallel degree that divides the heads")
            if self.page_size is not None and self.page_size & (self.page_size - 1):
                bad("page_size", f"must be a power of two, got {self.page_size}", "use 16, 32, 64, 128 or 256")
            if self.head_dim > 1024:
                bad("head_dim", f"{self.head_dim} is beyond any attention kernel's range", "check hidden_size / num_attention_heads")
        for name in ("q_dtype", "kv_dtype"):
            try:
                object.__setattr__(self, name, canonical_dtype(getattr(self, name)))
            except TuningError as e:
                bad(name, str(e.problems[0].message), "")
        if problems:
            raise TuningError(problems)

    # Per-device view under tensor parallelism. KV heads are replicated when there are
    # fewer of them than devices, as vLLM does.
    @property
    def q_heads_per_device(self) -> int:
        return self.num_q_heads // self.tensor_parallel

    @property
    def kv_heads_per_device(self) -> int:
        return max(1, self.num_kv_heads // self.tensor_parallel)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "workload") -> Workload:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TuningError([Problem(where, None, k, "unknown workload field", f"known: {', '.join(sorted(names))}") for k in unknown])
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise TuningError([Problem(where, None, "", str(e), "give num_q_heads, num_kv_heads and head_dim")]) from None

    @classmethod
    def from_hf_config(cls, path: os.PathLike | str, **limits: Any) -> Workload:
        """Attention shape from a Hugging Face ``config.json``; serving limits from ``limits``."""
        p = Path(path)
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise TuningError([Problem(str(p), None, "", f"cannot read: {e}", "pass the model's config.json")]) from None
        except json.JSONDecodeError as e:
            raise TuningError([Problem(str(p), e.lineno, "", f"not valid JSON: {e.msg}", "pass the model's config.json")]) from None
        if not isinstance(cfg, dict):
            raise TuningError([Problem(str(p), None, "", "is not a JSON object", "pass the model's config.json")])
        cfg = cfg.get("text_config", cfg) if "num_attention_heads" not in cfg else cfg
        heads = cfg.get("num_attention_heads")
        if not isinstance(heads, int):
            raise TuningError([Problem(str(p), None, "num_attention_heads", "missing or not a number", "is this a transformer config.json?")])
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim")
        if not head_dim:
            hidden = cfg.get("hidden_size")
            if not isinstance(hidden, int):
                raise TuningError([Problem(str(p), None, "head_dim", "neither head_dim nor hidden_size is given", "add head_dim")])
            head_dim = hidden // heads
        values: dict[str, Any] = {"num_q_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}
        window = cfg.get("sliding_window")
        if isinstance(window, int) and window > 0 and cfg.get("use_sliding_window", True) is not False:
            values["sliding_window"] = window
        if "max_model_len" not in limits and isinstance(cfg.get("max_position_embeddings"), int):
            values["max_model_len"] = min(cfg["max_position_embeddings"], 8192)
        values.update({k: v for k, v in limits.items() if v is not None})
        return cls.from_dict(values, where=str(p))


@dataclass(frozen=True)
class Layer:
    """A policy's answer: its name and the knobs it sets (a partial mapping)."""

    name: str
    knobs: Mapping[str, Any]
    note: str = ""


@dataclass(frozen=True)
class Knob:
    value: Any
    layer: str
    overrode: tuple[tuple[str, Any], ...] = ()  # (layer, value) of the layers it beat

    def to_dict(self) -> dict[str, Any]:
        return {"value": list(self.value) if isinstance(self.value, tuple) else self.value, "layer": self.layer, "overrode": [{"layer": n, "value": list(v) if isinstance(v, tuple) else v} for n, v in self.overrode]}


# Known knobs and their checks. Any other ``family.name`` passes through unchecked, so a
# plugin can introduce a kernel family; an unknown bare name is an error.
COMMON_KNOBS = ("head_dim_padded", "page_size", "min_page_size", "max_num_seqs_smem", "vmem_limit_bytes")
TUPLE_KNOBS = ("rpa_v3.d_block_sizes", "rpa_v3.p_block_sizes", "rpa_v3.m_block_sizes")
INT_KNOBS = COMMON_KNOBS + ("rpa_v2.num_kv_pages_per_block", "rpa_v2.num_queries_per_block", "rpa_v2.vmem_limit_bytes", "rpa_v3.vmem_limit_bytes")
KNOWN_KNOBS = INT_KNOBS + TUPLE_KNOBS


def coerce_knob(name: str, value: Any) -> Any:
    """Normalise one knob value; raise ValueError with a reason when it has the wrong shape."""
    if name in INT_KNOBS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return value
    if name in TUPLE_KNOBS:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",")]
        try:
            # Whole numbers only: 1.5 must be an error, not silently 1.
            items = tuple(v if isinstance(v, int) and not isinstance(v, bool) else int(str(v).strip()) for v in value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got {value!r}") from None
        if len(items) != 4:
            raise ValueError(f"{name} must be 4 whole numbers (bq_sz, bkv_sz, bq_csz, bkv_csz), got {len(items)}")
        return items
    if "." not in name:
        raise ValueError(f"unknown knob {name!r} (common knobs: {', '.join(COMMON_KNOBS)}; kernel knobs are 'family.name')")
    return value


def check_constraints(spec: Generation, workload: Workload, knobs: Mapping[str, Any]) -> list[str]:
    """Kernel constraints every final set of knobs must satisfy. Returns what is violated."""
    out = []
    vmem = spec.chip.vmem_bytes_per_core
    page = knobs.get("page_size")
    if page is not None and (page <= 0 or page & (page - 1)):
        out.append(f"page_size {page} is not a positive power of two")
    for name in ("vmem_limit_bytes", "rpa_v2.vmem_limit_bytes", "rpa_v3.vmem_limit_bytes"):
        v = knobs.get(name)
        if v is not None and not 0 < v <= vmem:
            out.append(f"{name} {v} is {'not positive' if v <= 0 else f'above the {spec.id} core VMEM of {vmem} bytes ({spec.chip.vmem_mib_per_core:g} MiB)'}")
    ceiling = knobs.get("vmem_limit_bytes")
    for name in ("rpa_v2.vmem_limit_bytes", "rpa_v3.vmem_limit_bytes"):
        v = knobs.get(name)
        if v is not None and ceiling is not None and ceiling < v <= vmem:
            out.append(f"{name} {v} is above vmem_limit_bytes {ceiling}")
    hd = knobs.get("head_dim_padded")
    if hd is not None and (hd < workload.head_dim or hd % spec.chip.lanes):
        out.append(f"head_dim_padded {hd} must be at least head_dim {workload.head_dim} and a multiple of {spec.chip.lanes} lanes")
    if page:
        pages_per_seq = cdiv(workload.max_model_len, page)
        bkv = knobs.get("rpa_v2.num_kv_pages_per_block")
        bq = knobs.get("rpa_v2.num_queries_per_block")
        if bkv is not None and not 0 < bkv <= pages_per_seq:
            out.append(f"rpa_v2.num_kv_pages_per_block {bkv} must be in 1..{pages_per_seq} (pages per sequence)")
        if bq is not None and not 0 < bq <= workload.max_num_batched_tokens:
            out.append(f"rpa_v2.num_queries_per_block {bq} must be in 1..{workload.max_num_batched_tokens} (max batched tokens)")
        max_kv = pages_per_seq * page
        for name in TUPLE_KNOBS:
            t = knobs.get(name)
            if t is None:
                continue
            bq_sz, bkv_sz, bq_csz, bkv_csz = t
            if min(t) <= 0:
                out.append(f"{name} {t} must be positive")
                continue
            if bkv_sz % page or bkv_csz % page:
                out.append(f"{name} {t}: KV block sizes must be multiples of page_size {page}")
            if bkv_sz > align(max_kv, page) or bkv_csz > bkv_sz:
                out.append(f"{name} {t}: KV blocks must satisfy bkv_csz <= bkv_sz <= {max_kv} (tokens per sequence)")
            if max(bq_sz, bq_csz) > next_pow2(workload.max_num_batched_tokens):
                out.append(f"{name} {t}: query blocks must be within {next_pow2(workload.max_num_batched_tokens)} batched tokens")
    return out


@dataclass(frozen=True)
class Tuning:
    knobs: Mapping[str, Knob]
    layers: tuple[str, ...]  # layer names, most to least trusted (as merged)
    faults: tuple[tuple[str, str], ...] = ()  # (policy, message)
    notes: tuple[str, ...] = ()

    def values(self) -> dict[str, Any]:
        return {k: v.value for k, v in self.knobs.items()}


def _active_policies(env: Mapping[str, str]) -> set[str] | None:
    raw = env.get(ENV_POLICIES, "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


RESERVED_LAYERS = ("workload", "baseline", "tables", "overrides")


def run_policies(spec: Generation, workload: Workload, detection: Detection, *, env: Mapping[str, str] | None = None) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Call every ``tpu_registry_tune`` implementation in hook order, guarding each one."""
    from .plugins import get_plugin_manager, short_name

    env = os.environ if env is None else env
    active = _active_policies(env)
    pm = get_plugin_manager()
    impls = list(reversed(pm.hook.tpu_registry_tune.get_hookimpls()))  # pluggy's call order
    layers: list[Layer] = []
    faults: list[tuple[str, str]] = []
    kwargs = {"spec": spec, "workload": workload, "detection": detection}
    for impl in impls:
        name = short_name(impl.plugin_name) if impl.plugin_name.startswith("tpu_registry.") else impl.plugin_name
        if active is not None and name not in active:
            continue
        try:
            out = impl.function(*[kwargs[a] for a in impl.argnames])
        except TuningError:
            raise  # a user's own file is wrong: that is an error, not a plugin fault
        except Exception as e:  # noqa: BLE001
            if isinstance(e, CatalogError) and impl.plugin_name.startswith("tpu_registry."):
                raise  # likewise a broken tuning table read by the built-in tables policy
            faults.append((name, f"raised {type(e).__name__}: {e}"))
            continue
        if out is None:
            continue
        if not isinstance(out, Layer):
            faults.append((name, f"returned {type(out).__name__}, not a Layer or None"))
            continue
        if not isinstance(out.knobs, Mapping):
            faults.append((name, f"returned a Layer whose knobs are a {type(out.knobs).__name__}, not a mapping of knob names to values"))
            continue
        if out.name in RESERVED_LAYERS and not impl.plugin_name.startswith("tpu_registry."):
            # Layers are told apart by name: a plugin posing as the user's overrides or the
            # baseline would be blamed on them (and dropping it would drop theirs).
            faults.append((name, f"named its layer {out.name!r}, which is reserved for a built-in layer; skipped"))
            continue
        try:
            layer = replace(out, knobs={k: coerce_knob(k, v) for k, v in out.knobs.items()})
        except ValueError as e:
            faults.append((name, str(e)))
            continue
        layers.append(layer)
    if active is not None:
        known = {short_name(i.plugin_name) if i.plugin_name.startswith("tpu_registry.") else i.plugin_name for i in impls}
        if missing := sorted(active - known):
            raise TuningError(f"{ENV_POLICIES} names unknown policies: {', '.join(missing)} (known: {', '.join(sorted(known))})")
    return layers, faults


def merge(layers: list[Layer]) -> dict[str, Knob]:
    """First layer wins; each knob records the layers it beat."""
    out: dict[str, Knob] = {}
    for layer in layers:
        for name, value in layer.knobs.items():
            if name in out:
                k = out[name]
                out[name] = replace(k, overrode=k.overrode + ((layer.name, value),))
            else:
                out[name] = Knob(value, layer.name)
    return out


def tune(spec: Generation, workload: Workload, detection: Detection, *, env: Mapping[str, str] | None = None, strict: bool = False) -> Tuning:
    """Run the policies and merge their layers, checking kernel constraints.

    A page size fixed by the workload wins over every layer. When the layers settle on a
    page size other than the one the policies assumed, they run once more with it pinned,
    so kernel block sizes are computed for the page size actually used.
    """
    layers, faults = run_policies(spec, workload, detection, env=env)
    if workload.page_size is not None:
        layers.insert(0, Layer("workload", {"page_size": workload.page_size}, "fixed by the user"))
    knobs = merge(layers)
    page = knobs.get("page_size")
    dropped: set[str] = set()
    bad_page = check_constraints(spec, workload, {"page_size": page.value}) if page is not None else []
    if bad_page and page.layer not in ("overrides", "workload", "baseline") and not strict:
        # Every block size computed for a broken page size would look broken too (and be
        # blamed on its layer): drop the plugin layer that chose it first.
        faults.append((page.layer, "knobs break kernel constraints, layer dropped: " + "; ".join(bad_page)))
        dropped.add(page.layer)
        layers = [layer for layer in layers if layer.name not in dropped]
        knobs = merge(layers)
        page = knobs.get("page_size")
        bad_page = check_constraints(spec, workload, {"page_size": page.value}) if page is not None else []
    # A broken page size is never pinned (the workload would reject it): the check below
    # reports it.
    if page is not None and page.layer not in ("workload", "baseline") and not bad_page:
        again, more = run_policies(spec, replace(workload, page_size=page.value), detection, env=env)
        first = knobs
        layers, faults = [layer for layer in again if layer.name not in dropped], faults + [f for f in more if f not in faults]
        knobs = merge(layers)
        for name in ("page_size", "min_page_size", "max_num_seqs_smem"):
            if name in first:
                knobs[name] = first[name]
    violations = check_constraints(spec, workload, {k: v.value for k, v in knobs.items()})
    while violations:
        # A plugin layer whose knobs break a kernel constraint is dropped and named; the
        # user's own overrides breaking one (or anything under strict) is an error. Plugin
        # layers go first: a constraint between two knobs (a VMEM limit above the ceiling a
        # plugin set) is blamed on the knob it is reported against, which may be innocent.
        culprit = {v: knobs[v.split(" ")[0]].layer if v.split(" ")[0] in knobs else "?" for v in violations}
        involved = {v: {culprit[v]} | {knobs[t].layer for t in re.findall(r"[\w.]+", v) if t in knobs} for v in violations}
        droppable = set().union(*involved.values()) - {"overrides", "workload", "baseline", "?"}
        if strict or not droppable:
            raise TuningError([Problem(f"layer {culprit[v]}", None, v.split(" ")[0], v, "lower the value or remove the override") for v in violations])
        for name in sorted(droppable):
            faults.append((name, "knobs break kernel constraints, layer dropped: " + "; ".join(v for v in violations if name in involved[v])))
        layers = [layer for layer in layers if layer.name not in droppable]
        knobs = merge(layers)
        violations = check_constraints(spec, workload, {k: v.value for k, v in knobs.items()})
    if strict and faults:
        raise TuningError([Problem(f"policy {name}", None, "", message, "fix or disable the plugin (TPU_REGISTRY_DISABLE_PLUGINS), or drop strict") for name, message in faults])
    return Tuning(knobs=dict(sorted(knobs.items())), layers=tuple(layer.name for layer in layers), faults=tuple(faults))


def vmem_bytes(mib: float) -> int:
    return int(math.floor(mib * 1024 * 1024))
