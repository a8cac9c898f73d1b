"""Issue 11, items 1 and 3: what the registry hands out passes tpu-inference 0.32's own checks.

1. Against upstream's own validators (``test_configs_pass_upstream_validators``). For each
   generation tpu-inference's RPA v3 code handles, random workloads (GQA/MQA heads, head dims
   64 to 256, bf16/f32 queries, bf16/fp8 KV, sliding windows, 128 to 1M tokens, tensor
   parallel 1-8) are resolved alone (the baseline) and crossed with a random overrides file
   and a random third-party policy layer. Every config ``resolve`` returns is fed, shaped as
   the adapter passes it (one shard's heads, the adapter's KV cache shape, i32 tables of
   ``max_num_seqs``) with exactly ``tpu_inference_backend.kernel_kwargs(cfg)``, to the v3
   kernel's ``static_validate_inputs``; ``get_vmem_estimate_bytes`` of each tuple passed (or
   of ``get_default_block_sizes`` where one is omitted) is compared with the VMEM limit used,
   and ``get_smem_estimate_bytes`` with the core's SMEM. Upstream must reject none.

   Each refusal (a ``TuningError``, or the policy layer dropped with a fault) is replayed
   against the same checks with the refused knobs over upstream's own choices (tpu-inference's
   page size, the kernel's default tuples and VMEM). Refusals upstream would accept must be
   none for the baseline, and otherwise only rules whose ``RULES`` text starts with
   ``registry:``, read from the ``[rule NAME]`` of the message (a refusal naming no rule is
   no documented rule). Every 16th crossed config is also checked call by call, with the
   kwargs the adapter computes while tracing (``call_kwargs``).

2. Per-bucket agreement (``test_per_bucket_block_sizes``): for every token bucket the runner
   compiles (tpu-inference's ``build_token_paddings``) and one TP shard's heads,
   ``cfg.for_call`` gives upstream's ``get_default_block_sizes`` for that call, except the
   tuples upstream's ``get_vmem_estimate_bytes`` puts above the limit, which the registry
   shrinks: exactly those differ, and the shrunk tuples fit and pass the validator.

Head dim 64 runs tpu-inference's hd64 kernel: such configs are resolved and counted here but
not fed to the v3 kernel's checks; ``test_kernel_families_agreement.py`` feeds them to the hd64
kernel's own ``static_validate_inputs``.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as v3
from tpu_inference.layers.vllm.backends.flash_attn import PallasAttentionBackend
from tpu_inference.runner.utils import build_token_paddings
from tpu_registry_vllm import tpu_inference_backend

import tpu_registry
from tpu_registry import Layer, TuningError, Workload, load_catalog, resolve
from tpu_registry.kernels import RULES
from tpu_registry.plugins import get_plugin_manager, get_plugins

CONFIGS = 2000  # crossed configs resolve() returns, per generation (each workload also alone)
BUCKET_WORKLOADS = 300  # workloads per generation for the per-bucket agreement
CALL_SAMPLE = 16  # every 16th crossed config is also checked call by call, as traced
# Generation -> the number tpu-inference's get_tpu_version() returns for it.
GENERATIONS = {"v5e": 5, "v5p": 5, "v6e": 6, "tpu7x": 7, "tpu8i": 8, "tpu8t": 8}
OTHER_GENERATIONS = ("v4", "v5e", "v6e", "tpu7x", "tpu8i")  # overrides entries for another chip
JNP = {
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}
MIB = 1 << 20
PAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 24, 48, 96)
VMEM_MIB = (0, 1, 4, 8, 16, 24, 32, 48, 64, 96, 100, 120, 128, 160, 192, 256)
CASES = (v3.RpaCase.DECODE, v3.RpaCase.PREFILL, v3.RpaCase.MIXED)
KNOB = {case: f"rpa_v3.{case.symbol}_block_sizes" for case in CASES}
POLICY = "soundness_random_policy"
TOTAL_PAGES = 64  # any number: no check reads it
RULE = re.compile(r"\[rule (\w+)\]")


class RandomPolicy:
    """A third-party tuning policy whose layer the test chooses before each resolve."""

    def __init__(self) -> None:
        self.knobs: dict | None = None

    @tpu_registry.hookimpl
    def tpu_registry_tune(self, spec, workload):
        return None if self.knobs is None else Layer(POLICY, dict(self.knobs))


@pytest.fixture
def no_detectors(monkeypatch):
    """Generations are simulated: the detectors are disabled, which halves a resolve's time."""
    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", "env,sysfs,jax,torch_xla")
    tpu_registry.clear_cache()
    yield
    tpu_registry.clear_cache()


@pytest.fixture
def policy(no_detectors):
    """``RandomPolicy`` registered on the process's plugins, unregistered afterwards."""
    tpu_registry.clear_cache()  # clear_cache() also forgets the plugins: register after it
    p = RandomPolicy()
    get_plugins().register(p, POLICY)
    yield p
    get_plugin_manager().unregister(name=POLICY)
    tpu_registry.clear_cache()


@pytest.fixture(scope="module")
def summary():
    """Counts of every test, printed as one table at the end (``-s`` shows it)."""
    data: dict = {"validators": {}, "rules": defaultdict(Counter), "buckets": {}}
    yield data
    print_summary(data)


class Upstream:
    """One generation as tpu-inference sees it: its kernel's default VMEM limit
    (``pltpu.get_tpu_info()`` under a mesh of that device kind) and the core's SMEM."""

    def __init__(self, gen: str, monkeypatch) -> None:
        self.gen = gen
        self.spec = load_catalog()[gen]
        assert self.spec.generation == GENERATIONS[gen]
        assert "rpa_v3" in self.spec.kernels.families
        monkeypatch.setattr(v3, "get_tpu_version", lambda: GENERATIONS[gen])
        chip = self.spec.chip
        device = jax.sharding.AbstractDevice(
            device_kind=self.spec.identify.device_kinds[0],
            num_cores=chip.tensorcores_per_chip // chip.jax_devices_per_chip,
            platform="tpu",
        )
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            self.vmem = pltpu.get_tpu_info().vmem_capacity_bytes
        self.smem = chip.smem_bytes_per_core

    def page_size(self, w: Workload) -> int:
        """tpu-inference's page size: ``get_page_size`` raised to ``get_min_page_size``."""
        vc = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=w.max_model_len),
            scheduler_config=SimpleNamespace(max_num_seqs=w.max_num_seqs),
        )
        P = PallasAttentionBackend
        return max(P.get_page_size(vc), P.get_min_page_size(vc))

    def defaults(self, w: Workload, page: int, tokens: int, case) -> tuple[int, int, int, int]:
        """``get_default_block_sizes`` as the kernel calls it for one shard and call."""
        q_heads, kv_heads = shard_heads(w)
        d = v3.get_default_block_sizes(
            JNP[w.q_dtype],
            JNP[w.kv_dtype],
            q_heads,
            kv_heads,
            w.head_dim,
            page,
            tokens,
            w.max_num_seqs,
            -(-w.max_model_len // page),
            case=case,
        )
        return d["bq_sz"], d["bkv_sz"], d["bq_csz"], d["bkv_csz"]

    def vmem_need(self, w: Workload, t) -> int:
        q_heads, kv_heads = shard_heads(w)
        return v3.get_vmem_estimate_bytes(
            kv_heads, q_heads // kv_heads, w.head_dim, t[0], t[1], JNP[w.q_dtype], JNP[w.kv_dtype]
        )

    def rejects(self, w: Workload, page: int, kwargs: dict, tokens: int, cache_shape) -> list:
        """Why tpu-inference would refuse this call (empty: it runs it): its validator, then
        the VMEM estimate of each case against the limit used, then the SMEM estimate."""
        q_heads, kv_heads = shard_heads(w)
        seqs, pages_per_seq = w.max_num_seqs, -(-w.max_model_len // page)
        sds, i32, kv = jax.ShapeDtypeStruct, jnp.int32, JNP[w.kv_dtype]
        q = sds((tokens, q_heads, w.head_dim), JNP[w.q_dtype])
        k = sds((tokens, kv_heads, w.head_dim), kv)
        cache = sds(cache_shape(TOTAL_PAGES, page, kv_heads, w.head_dim, kv), kv)
        tables = (sds((seqs,), i32), sds((seqs * pages_per_seq,), i32), sds((seqs + 1,), i32))
        out = []
        try:
            v3.static_validate_inputs(
                q, k, k, cache, *tables, sds((3,), i32), sliding_window=w.sliding_window, **kwargs
            )
        except (ValueError, ZeroDivisionError, AssertionError) as e:
            out.append(f"static_validate_inputs: {e}")
        limit = kwargs.get("vmem_limit_bytes", self.vmem)
        for case in CASES:
            t = kwargs.get(f"{case.symbol}_block_sizes") or self.defaults(w, page, tokens, case)
            need = self.vmem_need(w, t)
            if need > limit:
                out.append(f"get_vmem_estimate_bytes {case.name} {t}: {need} > {limit}")
        smem = v3.get_smem_estimate_bytes(seqs, pages_per_seq)
        if smem > self.smem:
            out.append(f"get_smem_estimate_bytes: {smem} > {self.smem}")
        return out

    def rejects_intent(self, w: Workload, layers: list[dict]) -> list:
        """``rejects`` for knobs the registry refused: the layers' knobs (most trusted first)
        over what upstream chooses itself; a common VMEM ceiling caps the kernel's limit
        unless a more trusted layer set the kernel's own."""
        knobs: dict = {}
        rank: dict = {}
        for i, layer in enumerate(layers):
            for name, value in layer.items():
                if name not in knobs:
                    knobs[name], rank[name] = value, i
        page = knobs.get("page_size") or self.page_size(w)
        kwargs = {
            f"{case.symbol}_block_sizes": tuple(knobs[KNOB[case]])
            for case in CASES
            if KNOB[case] in knobs
        }
        limit, ceiling = knobs.get("rpa_v3.vmem_limit_bytes"), knobs.get("vmem_limit_bytes")
        if ceiling is not None:
            if limit is None:
                limit = min(self.vmem, ceiling)
            elif rank["rpa_v3.vmem_limit_bytes"] > rank["vmem_limit_bytes"]:
                limit = min(limit, ceiling)
        if limit is not None:
            kwargs["vmem_limit_bytes"] = limit
        return self.rejects(w, page, kwargs, w.max_num_batched_tokens, v3.get_kv_cache_shape)


def shard_heads(w: Workload) -> tuple[int, int]:
    """One shard's heads as the adapter's ``shard_map`` gives them: KV heads repeated up to
    the tensor-parallel degree when there are fewer."""
    tp = w.tensor_parallel
    return w.num_q_heads // tp, max(w.num_kv_heads, tp) // tp


def adapter_cache_shape(pages, page, kv_heads, head_dim, kv_dtype):
    return tpu_inference_backend.RegistryAttentionBackend().get_kv_cache_shape(
        pages, page, kv_heads, head_dim, kv_dtype
    )


def random_workload(rng: random.Random) -> Workload:
    while True:
        kv = rng.choice([1, 1, 2, 4, 8, 16, 32])
        q = kv * rng.choice([1, 2, 3, 4, 5, 8, 16])
        tp = rng.choice([1, 1, 2, 4, 8])
        if q % tp:
            continue
        return Workload(
            num_q_heads=q,
            num_kv_heads=kv,
            head_dim=rng.choice([64, 128, 128, 256, 256, 96, 192]),
            q_dtype=rng.choice(["bfloat16", "float32"]),
            kv_dtype=rng.choice(["bfloat16", "float8_e4m3fn", "float8_e5m2"]),
            max_model_len=rng.choice([2 ** rng.randint(7, 20), int(2 ** rng.uniform(7, 20))]),
            max_num_seqs=rng.choice([1, 8, 16, 64, 128, 256, 512, 1024, rng.randint(1, 2048)]),
            max_num_batched_tokens=rng.choice(
                [16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, rng.randint(16, 32768)]
            ),
            sliding_window=rng.choice([None, None, None, 128, 1024, rng.randint(1, 8192)]),
            tensor_parallel=tp,
        )


def random_vmem(rng: random.Random, core: int) -> int:
    """Mostly a share of the core's VMEM; sometimes any size, zero or above the core."""
    if rng.random() < 0.8:
        return core * rng.choice([1, 2, 3, 4]) // 4
    return rng.randint(1, 300 * MIB) if rng.random() < 0.5 else rng.choice(VMEM_MIB) * MIB


def random_blocks(rng: random.Random, w: Workload, page: int) -> list[int]:
    """Mostly powers of two within the batch and the sequence over ``page``; sometimes over
    another unit, sometimes anything."""
    if rng.random() < 0.2:
        if rng.random() < 0.3:
            return [rng.randint(1, 4096) for _ in range(4)]
        page = rng.choice([16, 64, 256])
    bq = 2 ** rng.randint(0, (w.max_num_batched_tokens - 1).bit_length())
    pages = 2 ** rng.randint(0, min(6, (-(-w.max_model_len // page) - 1).bit_length()))
    bq_c, pages_c = max(1, bq >> rng.randint(0, 3)), max(1, pages >> rng.randint(0, 2))
    return [bq, page * pages, bq_c, page * pages_c]


def random_knobs(rng: random.Random, w: Workload, page: int, core: int) -> dict:
    """Random knobs: a page near ``page`` (the baseline's) or any, VMEM limits, tuples."""
    knobs: dict = {}
    while not knobs:
        if rng.random() < 0.3:
            near = max(1, (page << 2) >> rng.randint(0, 4))  # page / 4 to page * 4
            knobs["page_size"] = near if rng.random() < 0.7 else rng.choice(PAGES)
        if rng.random() < 0.15:
            knobs["vmem_limit_bytes"] = random_vmem(rng, core)
        if rng.random() < 0.25:
            knobs["rpa_v3.vmem_limit_bytes"] = random_vmem(rng, core)
        for case in CASES:
            if rng.random() < 0.2:
                knobs[KNOB[case]] = random_blocks(rng, w, knobs.get("page_size", page))
    return knobs


def write_overrides(rng: random.Random, gen: str, w: Workload, page: int, core: int, path):
    """A random overrides file (0-3 entries, for this generation, "*" or another one, some
    matching the workload). Returns the knobs that apply here (the first entry wins) and the
    knobs of each entry."""
    lines = ["schema_version = 1", ""]
    applied: dict = {}
    entries = []
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        target = rng.choice([gen, gen, gen, "*", rng.choice(OTHER_GENERATIONS)])
        match = rng.choice(
            [{}, {}, {"max_model_len": w.max_model_len}, {"max_num_seqs": w.max_num_seqs + 1}]
        )
        knobs = random_knobs(rng, w, page, core)
        entries.append(knobs)
        lines += ["[[override]]", f'generation = "{target}"']
        if match:
            lines.append("match = { " + ", ".join(f"{k} = {v}" for k, v in match.items()) + " }")
        lines.append("[override.knobs]")
        lines += [f'"{k}" = {v}' for k, v in knobs.items()]  # a list prints as a TOML array
        lines.append("")
        if target in (gen, "*") and all(getattr(w, k) == v for k, v in match.items()):
            for k, v in knobs.items():
                applied.setdefault(k, v)
    path.write_text("\n".join(lines))
    return applied, entries


def rules_of(messages: list[tuple[str, str]], explicit: set[str]) -> set[str]:
    """The ``[rule NAME]`` of each (field, message) about a knob a refused layer set (or of
    all, if none is: the workload's own), ``untagged: field`` for a message naming no rule.
    Rules broken only by knobs computed for a page the layer replaced are left out."""
    mine = [(f, t) for f, t in messages if f in explicit or f.startswith("override[")]
    out = set()
    for field, text in mine or messages:
        m = RULE.search(text)
        out.add(m.group(1) if m else "untagged: " + re.sub(r"\[\d+\]", "[]", field))
    return out


def problems(e: TuningError) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in e.problems]


def documented_registry_rule(rule: str) -> bool:
    return RULES.get(rule, "").startswith("registry:")


@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_configs_pass_upstream_validators(gen, policy, tmp_path, monkeypatch, summary):
    """Every config resolve() hands out passes tpu-inference's ``static_validate_inputs``,
    ``get_vmem_estimate_bytes`` and ``get_smem_estimate_bytes``; every refusal upstream would
    accept is a documented registry rule, and the baseline refuses nothing upstream accepts."""
    up = Upstream(gen, monkeypatch)
    rng = random.Random(f"soundness-{gen}")
    counts = Counter()
    rules = summary["rules"]
    bad_accepts: list[str] = []
    bad_refusals: dict[str, list[str]] = defaultdict(list)  # rule -> examples

    def accepted(cfg, what: str) -> None:
        counts[f"{what} accepted"] += 1
        w = cfg.workload
        if w.head_dim == 64:
            counts["head dim 64 (hd64 kernel, not checked)"] += 1
            return
        kwargs = tpu_inference_backend.kernel_kwargs(cfg)
        why = up.rejects(w, cfg.value("page_size"), kwargs, w.tokens, adapter_cache_shape)
        counts["checked against upstream"] += 1
        counts["tuples left to the kernel"] += 3 - sum(k.endswith("_sizes") for k in kwargs)
        if why:
            bad_accepts.append(f"{w}\n  knobs {cfg.tuning.values()}\n  kwargs {kwargs}\n  {why}")

    def calls(cfg) -> None:
        """The kwargs the adapter passes at trace time for each bucket the runner compiles
        (``call_kwargs``, resolved per call), through the same checks."""
        w, page = cfg.workload, cfg.value("page_size")
        q_heads, kv_heads = shard_heads(w)
        for bucket in build_token_paddings(16, w.max_num_batched_tokens, 0):
            counts["crossed configs' calls checked"] += 1
            try:
                kwargs = tpu_inference_backend.call_kwargs(cfg, bucket, q_heads, kv_heads)
            except TuningError as e:  # the adapter would fail while tracing
                bad_accepts.append(f"{w}\n  bucket {bucket}: {e}")
                continue
            why = up.rejects(w, page, kwargs, bucket, adapter_cache_shape)
            if why:
                bad_accepts.append(f"{w}\n  bucket {bucket}: kwargs {kwargs}\n  {why}")

    def refused(w: Workload, what: str, messages: list[tuple], layers: list[dict]) -> None:
        if w.head_dim == 64:
            counts[f"{what} refused, head dim 64 (not checked)"] += 1
            return
        # An entry the file was refused for counts as applied, whatever generation it names.
        named = {int(i) for f, _ in messages for i in re.findall(r"^override\[(\d+)\]", f)}
        layers = [entries[i] for i in sorted(named)] + layers
        why = up.rejects_intent(w, layers)
        counts[f"{what} refused" + ("" if why else ", upstream accepts")] += 1
        for rule in rules_of(messages, {k for layer in layers for k in layer}):
            rules[(gen, rule)]["upstream rejects" if why else "upstream accepts"] += 1
            if not why and (what == "baseline" or not documented_registry_rule(rule)):
                bad_refusals[rule].append(f"{what}: {w}\n    knobs {layers}\n    {messages}")

    for i in range(3 * CONFIGS):
        if counts["crossed accepted"] >= CONFIGS:
            break
        w = random_workload(rng)
        policy.knobs, entries, page = None, [], 16
        try:
            base = resolve(w, simulate=gen)
            accepted(base, "baseline")
            page = base.value("page_size")
        except TuningError as e:
            refused(w, "baseline", problems(e), [])
        path = tmp_path / f"overrides-{i}.toml"
        ov, entries = write_overrides(rng, gen, w, page, up.vmem, path)
        policy.knobs = random_knobs(rng, w, page, up.vmem) if rng.random() < 0.7 else None
        try:
            cfg = resolve(w, simulate=gen, overrides=path)
        except TuningError as e:
            refused(w, "overrides", problems(e), [ov])
            continue
        accepted(cfg, "crossed")
        if i % CALL_SAMPLE == 0 and w.head_dim != 64:
            calls(cfg)
        for fault in cfg.tuning.faults:
            assert fault.plugin == POLICY, fault
            if "layer dropped" in fault.message:  # the rules it broke, named under strict
                with pytest.raises(TuningError) as strict:
                    resolve(w, simulate=gen, overrides=path, strict=True)
                messages = problems(strict.value)
                layers = [ov, policy.knobs]
            else:  # refused by the knob registry on its own, before it is merged
                messages = [(fault.message.split()[0], fault.message)]
                layers = [policy.knobs, ov]
            refused(w, "policy layer", messages, layers)

    summary["validators"][gen] = counts
    print(f"\n{gen}: {dict(counts)}")
    assert not bad_accepts, f"{len(bad_accepts)} accepted configs upstream rejects:\n" + (
        "\n".join(bad_accepts[:5])
    )
    assert not counts["baseline refused, upstream accepts"]
    assert not bad_refusals, (
        "refusals upstream accepts that are the baseline's or no documented registry rule:\n"
        + "\n".join(f"[{r}] {len(x)}x, e.g. {x[0]}" for r, x in sorted(bad_refusals.items()))
    )
    assert counts["crossed accepted"] >= CONFIGS and counts["checked against upstream"]


@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_per_bucket_block_sizes(gen, no_detectors, monkeypatch, summary):
    """For every bucket and one shard's heads, ``cfg.for_call`` gives upstream's
    ``get_default_block_sizes``, except exactly the tuples upstream's
    ``get_vmem_estimate_bytes`` puts above the limit, which are shrunk to fit; each call's
    kwargs pass ``static_validate_inputs`` and the estimates."""
    up = Upstream(gen, monkeypatch)
    rng = random.Random(f"buckets-{gen}")
    counts = Counter()
    diffs = []
    for _ in range(BUCKET_WORKLOADS):
        w = random_workload(rng)
        try:
            cfg = resolve(w, simulate=gen)
        except TuningError:
            counts["workloads refused"] += 1
            continue
        if w.head_dim == 64:  # the hd64 kernel: test_kernel_families_agreement.py
            assert cfg.value("rpa_v3.d_block_sizes") is None
            counts["head dim 64 (hd64 kernel, checked elsewhere)"] += 1
            continue
        counts["workloads"] += 1
        page = cfg.value("page_size")
        q_heads, kv_heads = shard_heads(w)
        for bucket in build_token_paddings(16, w.max_num_batched_tokens, 0):
            call = cfg.for_call(bucket, q_heads=q_heads, kv_heads=kv_heads)
            kwargs = tpu_inference_backend.kernel_kwargs(call)
            limit = kwargs["vmem_limit_bytes"]
            counts["calls"] += 1
            for case in CASES:
                want, got = up.defaults(w, page, bucket, case), call.value(KNOB[case])
                over = up.vmem_need(w, want) > limit
                counts["tuples"] += 1
                counts["shrunk (upstream's estimate above the limit)"] += over
                if over == (got == want) or (over and up.vmem_need(w, got) > limit):
                    diffs.append(f"{case.name}, bucket {bucket}: {got} vs upstream {want}, {w}")
            why = up.rejects(w, page, kwargs, bucket, adapter_cache_shape)
            if why:
                diffs.append(f"bucket {bucket}: kwargs {kwargs} rejected: {why}, {w}")
    summary["buckets"][gen] = counts
    print(f"\n{gen}: {dict(counts)}")
    assert counts["workloads"] >= BUCKET_WORKLOADS // 3
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs[:5])


def print_summary(data: dict) -> None:
    if data["validators"]:
        print("\n\nregistry configs vs tpu-inference 0.32's own checks, per generation:")
        keys = sorted({k for c in data["validators"].values() for k in c})
        for key in keys:
            row = "".join(f"{data['validators'][g].get(key, 0):>8}" for g in data["validators"])
            print(f"  {key:52}{row}")
        print(f"  {'':52}" + "".join(f"{g:>8}" for g in data["validators"]))
        print("\nrefusals per rule (upstream rejects too / upstream accepts), per generation:")
        gens = list(data["validators"])
        for rule in sorted({r for _, r in data["rules"]}):
            cells = []
            for g in gens:
                c = data["rules"].get((g, rule), Counter())
                cells.append(f"{c['upstream rejects']:>5}/{c['upstream accepts']:<5}")
            kind = "registry" if documented_registry_rule(rule) else "upstream"
            kind = kind if rule in RULES else "no rule"
            print(f"  {rule[:52]:52} {kind:9}" + " ".join(cells))
        print(f"  {'':62}" + " ".join(f"{g:^11}" for g in gens))
    if data["buckets"]:
        print("\nper-bucket block sizes vs get_default_block_sizes:")
        for g, c in data["buckets"].items():
            print(f"  {g:6} {dict(c)}")
