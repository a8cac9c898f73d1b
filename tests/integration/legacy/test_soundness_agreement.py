"""Issue 11, item 1 on the legacy stack: every RPA v2 config the registry hands out passes
torch_xla 2.9's own checks.

For each generation torch_xla's v2 kernel supports (v4, v5e, v5p, v6e), random workloads
(GQA/MQA heads, head dims 64 to 256, bf16/f32 queries, bf16/f32/fp8/int8 KV, sliding windows,
128 to 1M tokens, tensor parallel 1-8, mostly with vLLM 0.13's page size fixed as the adapter
passes it) are resolved alone and crossed with a random overrides file and a random third-party
policy layer. The ``rpa_v2`` knobs of every config ``resolve`` returns, as the adapter passes
them (all three, or none: then torch_xla chooses), go with one device's shapes (queries padded
to 128 lanes, vLLM 0.13's ``get_kv_cache_shape``, i32 tables of ``max_num_seqs``) to
``ragged_paged_attention_v2.static_validate_inputs`` and ``get_min_heads_per_blk``: upstream
must reject none, and the registry must give v2 knobs exactly when ``get_min_heads_per_blk``
can tile the heads. Every 8th crossed config is also checked for each token bucket vLLM 0.13
compiles (``_get_token_paddings``): the adapter passes the same knobs to every call (vLLM 0.13
compiles with a symbolic token count), so they must be valid for every bucket.

Refusals are counted per ``[rule NAME]`` and printed, not asserted: torch_xla's v2 checks have
no SMEM or VMEM estimate, so their accepting a refused config would not show the refusal
unneeded.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict

import pytest

CONFIGS = 1000  # crossed configs resolve() returns, per generation (each workload also alone)
CALL_SAMPLE = 8
GENERATIONS = {"v4": 4, "v5e": 5, "v5p": 5, "v6e": 6}  # -> the catalog's generation number
MIB = 1 << 20
PAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 24, 48)
POLICY = "soundness_random_policy"
TOTAL_PAGES = 64  # any number: no check reads it
RULE = re.compile(r"\[rule (\w+)\]")
V2 = ("rpa_v2.num_kv_pages_per_block", "rpa_v2.num_queries_per_block")


@pytest.fixture
def upstream(offline_env, monkeypatch):
    """torch_xla's v2 module, vLLM 0.13's Pallas statics and bucket list; their per-call logs
    silenced; the registry's detectors disabled (generations are simulated)."""
    import torch_xla.experimental.pallas_kernels.ragged_paged_attention_v2 as rpa
    from vllm.v1.attention.backends.pallas import PallasAttentionBackend
    from vllm.v1.worker.tpu_model_runner import _get_token_paddings

    import tpu_registry

    monkeypatch.setenv("TPU_REGISTRY_DISABLE_PLUGINS", "env,sysfs,jax,torch_xla")
    tpu_registry.clear_cache()
    logging.disable(logging.WARNING)
    try:
        yield rpa, PallasAttentionBackend, _get_token_paddings
    finally:
        logging.disable(logging.NOTSET)
        tpu_registry.clear_cache()


@pytest.fixture
def policy(upstream):
    """A third-party tuning policy whose layer the test chooses before each resolve,
    registered on the process's plugins and unregistered afterwards."""
    import tpu_registry
    from tpu_registry.plugins import get_plugin_manager, get_plugins

    class RandomPolicy:
        knobs: dict | None = None

        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload):
            return None if self.knobs is None else tpu_registry.Layer(POLICY, dict(self.knobs))

    p = RandomPolicy()
    get_plugins().register(p, POLICY)
    yield p
    get_plugin_manager().unregister(name=POLICY)
    tpu_registry.clear_cache()


@pytest.fixture(scope="module")
def summary():
    """Counts of every generation, printed as one table at the end (``-s`` shows it)."""
    data: dict = {"configs": {}, "rules": defaultdict(Counter)}
    yield data
    if not data["configs"]:
        return
    gens = list(data["configs"])
    print("\n\nregistry RPA v2 configs vs torch_xla 2.9's own checks, per generation:")
    for key in sorted({k for c in data["configs"].values() for k in c}):
        print(f"  {key:56}" + "".join(f"{data['configs'][g].get(key, 0):>7}" for g in gens))
    print(f"  {'':56}" + "".join(f"{g:>7}" for g in gens))
    print("\nrefusals per rule, per generation:")
    for rule in sorted({r for _, r in data["rules"]}):
        row = "".join(f"{data['rules'].get((g, rule), Counter())['n']:>7}" for g in gens)
        print(f"  {rule[:56]:56}{row}")


def random_workload(rng: random.Random, P):
    from types import SimpleNamespace

    from tpu_registry import Workload

    while True:
        kv = rng.choice([1, 1, 2, 4, 8, 16, 32])
        q = kv * rng.choice([1, 2, 3, 4, 6, 8])
        tp = rng.choice([1, 1, 2, 4, 8])
        if q % tp:
            continue
        max_model_len = rng.choice([2 ** rng.randint(7, 20), int(2 ** rng.uniform(7, 20))])
        vc = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
        return Workload(
            num_q_heads=q,
            num_kv_heads=kv,
            head_dim=rng.choice([64, 80, 128, 128, 192, 256]),
            q_dtype=rng.choice(["bfloat16", "float32"]),
            kv_dtype=rng.choice(["bfloat16", "bfloat16", "float32", "float8_e4m3fn", "int8"]),
            max_model_len=max_model_len,
            max_num_seqs=rng.choice([1, 8, 16, 64, 128, 256, 512, 1024, rng.randint(1, 2048)]),
            max_num_batched_tokens=rng.choice(
                [16, 64, 100, 512, 1024, 2048, 4096, 8192, rng.randint(16, 16384)]
            ),
            # vLLM 0.13 fixes the page itself (get_page_size) and the adapter passes it on.
            page_size=rng.choice([P.get_page_size(vc)] * 3 + [None]),
            sliding_window=rng.choice([None, None, None, 128, 1024, rng.randint(1, 8192)]),
            tensor_parallel=tp,
        )


def random_knobs(rng: random.Random, page: int, core: int) -> dict:
    """Random page sizes, VMEM limits and v2 blocks: mostly plausible, some not."""

    def vmem() -> int:
        if rng.random() < 0.8:
            return core * rng.choice([1, 2, 3, 4]) // 4
        return rng.choice([0, 1, 8, 16, 32, 64, 120, 128, 256]) * MIB

    knobs: dict = {}
    while not knobs:
        if rng.random() < 0.3:
            near = max(1, (page << 2) >> rng.randint(0, 4))
            knobs["page_size"] = near if rng.random() < 0.7 else rng.choice(PAGES)
        if rng.random() < 0.15:
            knobs["vmem_limit_bytes"] = vmem()
        if rng.random() < 0.3:
            knobs["rpa_v2.vmem_limit_bytes"] = vmem()
        if rng.random() < 0.4:
            knobs[V2[0]] = rng.choice([2 ** rng.randint(0, 8), rng.randint(0, 1024)])
        if rng.random() < 0.4:
            knobs[V2[1]] = rng.choice([2 ** rng.randint(0, 10), rng.randint(0, 4096)])
    return knobs


def write_overrides(rng: random.Random, gen: str, w, page: int, core: int, path) -> None:
    lines = ["schema_version = 1", ""]
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        target = rng.choice([gen, gen, gen, "*", rng.choice(list(GENERATIONS))])
        match = rng.choice([{}, {}, {"max_model_len": w.max_model_len}, {"max_num_seqs": 3}])
        lines += ["[[override]]", f'generation = "{target}"']
        if match:
            lines.append("match = { " + ", ".join(f"{k} = {v}" for k, v in match.items()) + " }")
        lines.append("[override.knobs]")
        lines += [f'"{k}" = {v}' for k, v in random_knobs(rng, page, core).items()]
        lines.append("")
    path.write_text("\n".join(lines))


def rules_of(e) -> set[str]:
    return {
        m.group(1)
        if (m := RULE.search(p.message))
        else "untagged: " + re.sub(r"\[\d+\]", "[]", p.field)
        for p in e.problems
    }


@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_rpa_v2_configs_pass_torch_xla_validators(gen, upstream, policy, tmp_path, summary):
    """Every config resolve() hands out passes torch_xla's ``static_validate_inputs`` and
    ``get_min_heads_per_blk`` with the knobs the adapter passes, engine-wide and per call."""
    import jax
    import jax.numpy as jnp
    from tpu_registry_vllm import torch_xla_pallas as adapter

    from tpu_registry import TuningError, load_catalog, resolve

    rpa, P, paddings = upstream
    spec = load_catalog()[gen]
    assert spec.generation == GENERATIONS[gen] and "rpa_v2" in spec.kernels.families
    core = spec.chip.vmem_bytes_per_core
    rng = random.Random(f"legacy-soundness-{gen}")
    counts, rules, bad = Counter(), summary["rules"], []
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32

    def rejects(w, page: int, kwargs: dict, tokens: int) -> list[str]:
        """Why torch_xla would refuse this call (empty: it runs it)."""
        # Heads per device as vLLM shards them (KV replicated when fewer than devices).
        q_heads = w.num_q_heads // w.tensor_parallel
        kv_heads = max(1, w.num_kv_heads // w.tensor_parallel)
        q_dt, kv_dt = jnp.dtype(w.q_dtype), jnp.dtype(w.kv_dtype)
        head = -(-w.head_dim // 128) * 128  # the adapter pads to 128 lanes, never further
        seqs, pages_per_seq = w.max_num_seqs, -(-w.max_model_len // page)
        out = []
        try:
            rpa.get_min_heads_per_blk(q_heads, 2 * kv_heads, q_dt, kv_dt)
            tileable = True
        except ValueError as e:
            tileable = False
            if kwargs:
                out.append(f"get_min_heads_per_blk: {e}")
        if tileable != bool(kwargs):
            out.append(f"v2 knobs given: {bool(kwargs)}, heads tileable upstream: {tileable}")
        try:
            rpa.static_validate_inputs(
                sds((tokens, q_heads, head), q_dt),
                sds(P.get_kv_cache_shape(TOTAL_PAGES, page, kv_heads, w.head_dim), kv_dt),
                sds((seqs,), i32),
                sds((seqs, pages_per_seq), i32),
                sds((seqs + 1,), i32),
                sds((1,), i32),
                sliding_window=w.sliding_window,
                **kwargs,
            )
        except (ValueError, AssertionError) as e:
            out.append(f"static_validate_inputs: {e}")
        return out

    def adapter_kwargs(cfg) -> dict:
        """All three v2 knobs, or none (torch_xla chooses), as the adapter passes them."""
        kwargs = cfg.kernel_kwargs(adapter.FAMILY)
        return kwargs if set(kwargs) == set(adapter.KNOBS) else {}

    def accepted(cfg, what: str, calls: bool = False) -> None:
        w, page = cfg.workload, cfg.value("page_size")
        counts[f"{what} accepted"] += 1
        kwargs = adapter_kwargs(cfg)
        counts["no rpa_v2 knobs (heads not tileable)"] += not kwargs
        why = rejects(w, page, kwargs, w.tokens)
        if why:
            bad.append(f"{w}\n  knobs {cfg.tuning.values()}\n  {why}")
        for bucket in paddings(16, w.max_num_batched_tokens, 0) if calls and kwargs else ():
            counts["crossed configs' calls checked"] += 1
            why = rejects(w, page, kwargs, bucket)
            if why:
                bad.append(f"{w}\n  bucket {bucket}: {kwargs}\n  {why}")

    def refused(what: str, e) -> None:
        counts[f"{what} refused"] += 1
        for rule in rules_of(e):
            rules[(gen, rule)]["n"] += 1

    for i in range(3 * CONFIGS):
        if counts["crossed accepted"] >= CONFIGS:
            break
        w = random_workload(rng, P)
        policy.knobs, page = None, w.page_size or 16
        try:
            base = resolve(w, simulate=gen)
            accepted(base, "baseline")
            page = base.value("page_size")
        except TuningError as e:
            refused("baseline", e)
        path = tmp_path / f"overrides-{i}.toml"
        write_overrides(rng, gen, w, page, core, path)
        policy.knobs = random_knobs(rng, page, core) if rng.random() < 0.7 else None
        try:
            cfg = resolve(w, simulate=gen, overrides=path)
        except TuningError as e:
            refused("overrides", e)
            continue
        accepted(cfg, "crossed", calls=i % CALL_SAMPLE == 0)
        for fault in cfg.tuning.faults:
            assert fault.plugin == POLICY, fault
            counts["policy layer refused"] += 1
            if "layer dropped" in fault.message:  # the rules it broke, named under strict
                with pytest.raises(TuningError) as strict:
                    resolve(w, simulate=gen, overrides=path, strict=True)
                for rule in rules_of(strict.value):
                    rules[(gen, rule)]["n"] += 1
            else:
                rules[(gen, "untagged: " + fault.message.split()[0])]["n"] += 1

    summary["configs"][gen] = counts
    print(f"\n{gen}: {dict(counts)}")
    assert not bad, f"{len(bad)} accepted configs torch_xla rejects:\n" + "\n".join(bad[:5])
    assert counts["crossed accepted"] >= CONFIGS
