"""KV-cache memory per token under our baseline, upstream's layouts and the seed's policy.

For real attention shapes on every catalog generation that has a paged-attention kernel:

(a) ours: ``tpu_registry.resolve(workload, simulate=gen)`` then
    ``tpu_registry.attention.plan(cfg).kv_bytes_per_token(layout, num_layers)``, with layout
    ``vllm_pallas`` on generations whose only kernel is RPA v2, else ``tpu_inference``;
(b) upstream, computed here from the published layouts, independently of the package:
    vLLM 0.13 Pallas ``(pages, page, 2 * kv_heads, ceil(head_dim / 128) * 128)`` and
    tpu-inference
    ``(pages, page, align(2 * kv_heads, packing) // packing, packing, align(head_dim, 128))``,
    and for head dim 64 its hd64 kernel's
    ``(pages, page, align(kv_heads, packing) // packing, packing, 128)``
    (K and V share the 128 lanes, no padding);
(c) the seed: head dim padded to the MXU width where the seed did so (its
    ``head_size_multiple``: 256 for TPU v6, 128 for v4 and v5) in the vLLM Pallas layout.

Bytes are per device, all layers, KV heads split by tensor parallelism (replicated below one
per device, as vLLM does). Tokens that fit use half the per-device HBM as the KV budget,
counted in whole pages of the page size the baseline picks. The chart goes to
``benchmarks/kv_savings.png`` (or ``--output``).

Check: ours / upstream must be exactly 1.0 everywhere (the script exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from run_all import BENCH_DIR, md_table, script_main, sound, target, tiny


@dataclass(frozen=True)
class Model:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    layers: int
    tp: int = 1
    sliding_window: int | None = None


MODELS = (
    Model("Llama-3.1-8B", 32, 8, 128, 32),
    Model("Llama-3.1-70B (TP 8)", 64, 8, 128, 80, tp=8),
    Model("Llama-3.2-1B", 32, 8, 64, 16),
    Model("Qwen2.5-7B", 28, 4, 128, 28),
    Model("Gemma-2-9B", 16, 8, 256, 42),
    Model("Mistral-7B (SW 4096)", 32, 8, 128, 32, sliding_window=4096),
)

# The seed's head_size_multiple, keyed by TPU version number (torch_xla's tpu.version()).
SEED_HEAD_MULTIPLE = {4: 128, 5: 128, 6: 256}
BITS = {
    "bfloat16": 16,
    "float16": 16,
    "float32": 32,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "int8": 8,
}


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def upstream_bytes_per_token(
    layout: str, kv_heads: int, head_dim: int, dtype: str, layers: int
) -> int:
    """Published upstream layouts, written out independently of tpu_registry.attention."""
    itemsize = BITS[dtype] // 8
    if layout == "vllm_pallas":  # vLLM 0.13 PallasAttentionBackend.get_kv_cache_shape
        per_token = 2 * kv_heads * math.ceil(head_dim / 128) * 128
    elif (
        layout == "tpu_inference" and head_dim == 64
    ):  # tpu-inference v3/kernel_hd64.get_kv_cache_shape
        packing = 32 // BITS[dtype]
        per_token = (_align(kv_heads, packing) // packing) * packing * 128
    elif layout == "tpu_inference":  # tpu-inference v3/kernel.get_kv_cache_shape
        packing = 32 // BITS[dtype]
        per_token = (_align(2 * kv_heads, packing) // packing) * packing * _align(head_dim, 128)
    else:
        raise ValueError(layout)
    return per_token * itemsize * layers


def seed_bytes_per_token(
    generation: int, kv_heads: int, head_dim: int, dtype: str, layers: int
) -> int | None:
    mult = SEED_HEAD_MULTIPLE.get(generation)
    if mult is None:
        return None  # a generation the seed did not know
    return 2 * kv_heads * _align(head_dim, mult) * (BITS[dtype] // 8) * layers


def tokens(budget: int, page: int, per_token: int) -> int:
    return (budget // (page * per_token)) * page


def compute() -> tuple[list[dict], list[str]]:
    import tpu_registry
    from tpu_registry import Workload
    from tpu_registry.attention import plan

    cat = tpu_registry.load_catalog()
    gens = [s for s in cat if s.kernels.families]
    rows = []
    for m in MODELS:
        w = Workload(
            m.q_heads, m.kv_heads, m.head_dim, tensor_parallel=m.tp, sliding_window=m.sliding_window
        )
        for spec in gens:
            cfg = tpu_registry.resolve(w, simulate=spec.id)
            p = plan(cfg)
            layout = "vllm_pallas" if list(spec.kernels.families) == ["rpa_v2"] else "tpu_inference"
            kvh = max(1, m.kv_heads // m.tp)
            ours = p.kv_bytes_per_token(layout, m.layers)
            up = upstream_bytes_per_token(layout, kvh, m.head_dim, w.kv_dtype, m.layers)
            seed = seed_bytes_per_token(spec.generation, kvh, m.head_dim, w.kv_dtype, m.layers)
            budget = spec.chip.hbm_bytes_per_jax_device // 2
            page = p.page_size
            rows.append(
                {
                    "model": m.name,
                    "gen": spec.id,
                    "provisional": spec.provisional,
                    "layout": layout,
                    "page": page,
                    "kv_heads_per_device": kvh,
                    "head_dim": m.head_dim,
                    "ours": ours,
                    "upstream": up,
                    "seed": seed,
                    "budget": budget,
                    "tok_ours": p.tokens_in_budget(layout, budget, m.layers),
                    "tok_up": tokens(budget, page, up),
                    "tok_seed": tokens(budget, page, seed) if seed else None,
                }
            )
    return rows, [s.id for s in gens]


def fmt_bytes(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n >= 10 * 1024 else f"{n:,} B"


def short_label(name: str) -> str:
    """``Llama-3.1-70B (TP 8)`` -> ``Llama-3.1\n70B (TP 8)``: two lines under a bar."""
    head, _, rest = name.partition(" ")
    family, _, size = head.rpartition("-")
    return f"{family}\n{size}" + (f"\n{rest}" if rest else "")


def chart(rows: list[dict], gens: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m.name for m in MODELS]
    v6e = {r["model"]: r for r in rows if r["gen"] == "v6e"}
    fig = plt.figure(figsize=(15, 10.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.05])
    ax1, ax2, ax3 = (
        fig.add_subplot(grid[0, 0]),
        fig.add_subplot(grid[0, 1]),
        fig.add_subplot(grid[1, :]),
    )
    x = range(len(models))
    width = 0.38
    colours = {"ours": "#1f77b4", "seed": "#d62728"}
    if v6e:
        ours_kib = [v6e[m]["ours"] / 1024 for m in models]
        seed_kib = [v6e[m]["seed"] / 1024 for m in models]
        b1 = ax1.bar(
            [i - width / 2 for i in x],
            ours_kib,
            width,
            label="tpu-registry = upstream layout",
            color=colours["ours"],
        )
        ax1.bar(
            [i + width / 2 for i in x],
            seed_kib,
            width,
            label="seed (head dim padded to 256)",
            color=colours["seed"],
        )
        for i, m in enumerate(models):
            ax1.annotate(
                f"{v6e[m]['seed'] / v6e[m]['ours']:.1f}x",
                (i + width / 2, seed_kib[i]),
                ha="center",
                va="bottom",
                fontsize=10,
                fontweight="bold",
            )
        ax1.bar_label(b1, fmt="%.0f", fontsize=8, padding=2)
        ax1.set_title("TPU v6e: KV cache per token, per device, all layers (bf16)")
        ax1.set_ylabel("KiB per token")
        ax1.set_xticks(list(x), [short_label(m) for m in models], fontsize=9)
        ax1.legend(loc="upper left", fontsize=9)
        ax1.set_ylim(0, max(seed_kib) * 1.18)

        ours_tok = [v6e[m]["tok_ours"] / 1000 for m in models]
        seed_tok = [v6e[m]["tok_seed"] / 1000 for m in models]
        b2 = ax2.bar(
            [i - width / 2 for i in x],
            ours_tok,
            width,
            label="tpu-registry = upstream layout",
            color=colours["ours"],
        )
        b3 = ax2.bar(
            [i + width / 2 for i in x], seed_tok, width, label="seed", color=colours["seed"]
        )
        ax2.bar_label(b2, fmt="%.0fk", fontsize=8, padding=2)
        ax2.bar_label(b3, fmt="%.0fk", fontsize=8, padding=2)
        budget_gib = next(iter(v6e.values()))["budget"] / 2**30
        ax2.set_title(f"TPU v6e: tokens that fit in half the HBM ({budget_gib:.0f} GiB per device)")
        ax2.set_ylabel("thousands of tokens")
        ax2.set_xticks(list(x), [short_label(m) for m in models], fontsize=9)
        ax2.legend(loc="upper right", fontsize=9)
        ax2.set_ylim(0, max(ours_tok) * 1.15)

    # Heatmap: tokens that fit (ours) per model and generation, with seed/ours where it applies.
    grid_vals = [
        [
            next(r for r in rows if r["model"] == m and r["gen"] == g)["tok_ours"] / 1000
            for g in gens
        ]
        for m in models
    ]
    im = ax3.imshow(grid_vals, cmap="Blues", aspect="auto", norm=matplotlib.colors.LogNorm())
    top = max(max(r) for r in grid_vals)
    for i, m in enumerate(models):
        for j, g in enumerate(gens):
            r = next(r for r in rows if r["model"] == m and r["gen"] == g)
            label = f"{r['tok_ours'] / 1000:,.0f}k"
            if r["seed"]:
                ratio = r["seed"] / r["ours"]
                label += f"\nseed: {ratio:.1f}x the bytes" if ratio != 1 else "\nseed: same"
            ax3.text(
                j,
                i,
                label,
                ha="center",
                va="center",
                fontsize=8.5,
                color="white" if grid_vals[i][j] > top**0.75 else "black",
            )
    ax3.set_xticks(
        range(len(gens)),
        [
            f"{g}\n({next(r['layout'] for r in rows if r['gen'] == g)})"
            + ("\nprovisional" if next(r["provisional"] for r in rows if r["gen"] == g) else "")
            for g in gens
        ],
        fontsize=9,
    )
    ax3.set_yticks(range(len(models)), models, fontsize=9)
    ax3.set_title(
        "Tokens of KV cache that fit in half the per-device HBM, tpu-registry baseline "
        "(= upstream); seed's KV bytes relative to ours where the seed knew the generation"
    )
    fig.colorbar(im, ax=ax3, label="thousands of tokens (log scale)", shrink=0.9)
    fig.suptitle(
        "KV cache: tpu-registry's layout choice vs the seed's MXU-width head padding", fontsize=14
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(small: bool, png: Path | None) -> dict:
    rows, gens = compute()
    mismatches = [r for r in rows if r["ours"] != r["upstream"] or r["tok_ours"] != r["tok_up"]]
    table_rows = []
    for r in rows:
        table_rows.append(
            [
                r["model"],
                r["gen"] + (" (prov.)" if r["provisional"] else ""),
                r["layout"],
                r["kv_heads_per_device"],
                r["page"],
                fmt_bytes(r["ours"]),
                fmt_bytes(r["upstream"]),
                fmt_bytes(r["seed"]) if r["seed"] else "-",
                f"{r['ours'] / r['upstream']:.3f}",
                f"{r['seed'] / r['ours']:.2f}x" if r["seed"] else "-",
                f"{r['tok_ours']:,}",
                f"{r['tok_seed']:,}" if r["tok_seed"] is not None else "-",
                f"{r['tok_ours'] - r['tok_seed']:,}" if r["tok_seed"] is not None else "-",
            ]
        )
    headers = [
        "model",
        "gen",
        "our layout",
        "KV heads/dev",
        "page",
        "ours B/token",
        "upstream B/token",
        "seed B/token",
        "ours / upstream",
        "seed / ours",
        "tokens (ours)",
        "tokens (seed)",
        "tokens the seed loses",
    ]
    table = md_table(
        headers,
        table_rows,
        right=[False, False, False, True, True, True, True, True, True, True, True, True, True],
    )
    v6e = [r for r in rows if r["gen"] == "v6e"]
    summary_rows = [
        [
            r["model"],
            r["head_dim"],
            f"{r['seed'] / r['ours']:.2f}x",
            f"{r['tok_ours']:,}",
            f"{r['tok_seed']:,}",
            f"{(r['tok_ours'] - r['tok_seed']) / r['tok_ours']:.0%}",
        ]
        for r in v6e
    ]
    summary = md_table(
        [
            "model (TPU v6e)",
            "head dim",
            "seed / ours bytes",
            "tokens (ours)",
            "tokens (seed)",
            "share of tokens the seed loses",
        ],
        summary_rows,
    )
    print(summary)
    print()
    print(table)
    wrote = None
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        chart(rows, gens, png)
        wrote = png
        print(f"\nwrote {png}")
    seed_only = sorted({r["gen"] for r in rows if r["seed"] is None})
    md_parts = [
        f"Generations with a paged-attention kernel: {', '.join(gens)}. bf16 KV cache; budget = "
        "half of `spec.chip.hbm_bytes_per_jax_device` (weights and activations are ignored: the "
        "figure compares layouts, not deployments); tokens are whole pages of the page size the "
        "baseline picks for `max_model_len` 2048. The sliding window does not change the per-token "
        "size in either layout (every layer keeps a full cache). The seed knew TPU v4, v5 and v6 "
        f"only; {', '.join(seed_only) or 'none'} show `-`.",
        "",
        "Where the seed loses memory (TPU v6e, where it padded head dims to the 256-wide MXU):",
        "",
        summary,
        "",
        "All shapes and generations:",
        "",
        table,
    ]
    if mismatches:
        md_parts += [
            "",
            f"**MISMATCH between ours and upstream in {len(mismatches)} row(s):** "
            + "; ".join(f"{r['model']} on {r['gen']}" for r in mismatches),
        ]
    worst = max((r for r in rows if r["seed"]), key=lambda r: r["seed"] / r["ours"])
    least = min(r["seed"] / r["ours"] for r in rows if r["seed"])
    targets = [
        target(
            "ours / upstream KV bytes per token (every shape and generation)",
            "exactly 1.0 (0 rows differ)",
            f"{len(mismatches)} of {len(rows)} rows differ",
            len(mismatches),
            "==",
            0,
        ),
        target(
            "seed / ours KV bytes per token (ours never uses more)",
            ">= 1.0 everywhere",
            f"{least:.1f}x to {worst['seed'] / worst['ours']:.1f}x "
            f"(most: {worst['model']} on {worst['gen']})",
            least,
            ">=",
            1.0,
            "where the seed knew the generation; "
            "the seed's MXU-width padding of the head dim is the difference",
        ),
    ]
    return {
        "name": "kv_savings",
        "short": "kv",
        "title": "KV cache memory: ours vs upstream vs the seed",
        "command": "python benchmarks/kv_savings.py",
        "markdown": "\n".join(md_parts),
        "targets": targets,
        "ok": not mismatches and sound(targets),
        "png": str(wrote) if wrote else None,
    }


def main(argv: list[str] | None = None) -> int:
    def go(args: argparse.Namespace) -> dict:
        png = (
            None
            if args.no_write
            else (Path(args.output) if args.output else BENCH_DIR) / "kv_savings.png"
        )
        return run(tiny(args), png)

    return script_main(__doc__, argv, go)


if __name__ == "__main__":
    sys.exit(main())
