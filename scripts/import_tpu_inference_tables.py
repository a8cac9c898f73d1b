#!/usr/bin/env python3
r"""Convert tpu-inference's measured tables into tpu-registry tuning tables.

Reads the tables from an installed tpu-inference (or a folder holding its source) *without
importing it*: each module is parsed and its literals evaluated with ``ast.literal_eval``, so
neither JAX nor a TPU is needed.

- ``kernels/ragged_paged_attention/v3/tuned_block_sizes_hd64.py`` (``TUNED_BLOCK_SIZES``, keyed
  by device name, page size, dtypes, simplified head counts, max_model_len and sliding window)
  becomes ``rpa_v3_hd64_<device>.toml``, one file per device name.
- ``kernels/mla/v2/tuned_params.py`` (``tuned_params_mapping``: ``TuningKey`` ->
  ``TunableParams``, not keyed by device) becomes ``mla_v2_batched_decode.toml`` and
  ``mla_v2_mixed.toml``, applied to every generation with the MLA kernel, as upstream applies
  it. Only the fields ``attention_interface.mla_attention`` fills are key columns: rows that
  set any other field to a value other than its default can never be looked up from there
  and are left out (the importer says how many).
- ``kernels/ragged_paged_attention/v3/tuned_block_sizes.py`` is not imported: tpu-inference's
  RPA v3 ``kernel.py`` no longer consults it (it computes ``get_default_block_sizes``), so the
  registry's baseline already is what upstream runs.

    <env>/bin/python scripts/import_tpu_inference_tables.py --out hardware/tuning
    python scripts/import_tpu_inference_tables.py --dir path/to/tpu_inference --version 0.32.0
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

HD64 = "kernels/ragged_paged_attention/v3/tuned_block_sizes_hd64.py"
MLA = "kernels/mla/v2/tuned_params.py"
# tpu-inference's get_device_name() -> registry generations.
HD64_DEVICES = {"TPU v7": ["tpu7x"], "TPU v6e": ["v6e"], "TPU v5e": ["v5e"]}
MLA_GENERATIONS = ["v5e", "v5p", "v6e", "tpu7x", "tpu8t", "tpu8i"]
HD64_KEY = [
    "page_size",
    "q_dtype",
    "kv_dtype",
    "num_q_heads_pow2",
    "num_kv_heads_pow2",
    "max_model_len_paged_pow2",
    "sliding_window",
]
HD64_VALUE = ["num_kv_pages_per_block", "num_queries_per_block"]
# TuningKey field -> key column, for the fields mla_attention fills.
MLA_KEY = {
    "max_num_tokens": "num_tokens",
    "actual_num_q_heads": "num_q_heads",
    "actual_lkv_dim": "kv_lora_rank",
    "actual_r_dim": "qk_rope_head_dim",
    "kv_dtype": "kv_dtype",
    "q_dtype": "q_dtype",
    "page_size_per_kv_packing": "page_size_per_kv_packing",
    "kv_packing": "kv_packing",
    "max_num_seqs": "max_num_seqs",
    "pages_per_seq": "pages_per_seq",
}
# Per case: TunableParams field -> registry knob (prefill takes the mixed case's, as
# mla_attention does: "Temporally prefill use same params as mixed").
MLA_VALUE = {
    "batched_decode": [
        ("num_kv_pages_per_block", "decode_kv_pages_per_block"),
        ("num_queries_per_block", "decode_queries_per_block"),
        ("decode_batch_size", "decode_batch_size"),
    ],
    "mixed": [
        ("num_kv_pages_per_block", "mixed_kv_pages_per_block"),
        ("num_queries_per_block", "mixed_queries_per_block"),
        ("q_split", "mixed_q_split"),
        ("num_kv_pages_per_block", "prefill_kv_pages_per_block"),
        ("num_queries_per_block", "prefill_queries_per_block"),
    ],
}
HEADER = "# Imported by scripts/import_tpu_inference_tables.py from {source}. Do not edit by hand."


def locate() -> tuple[Path, str]:
    spec = importlib.util.find_spec("tpu_inference")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            f"error: tpu_inference is not installed in this Python ({sys.executable}); use --dir"
        )
    return Path(next(iter(spec.submodule_search_locations))), metadata.version("tpu-inference")


def module(path: Path) -> ast.Module:
    if not path.is_file():
        sys.exit(f"error: {path} not found")
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def assigned(tree: ast.Module, name: str) -> ast.expr:
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else ([node.target] if isinstance(node, ast.AnnAssign) else [])
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value
    sys.exit(f"error: no {name} assignment found")


def defaults(tree: ast.Module, cls: str) -> dict:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {
                s.target.id: ast.literal_eval(s.value)
                for s in node.body
                if isinstance(s, ast.AnnAssign) and s.value is not None
            }
    sys.exit(f"error: no class {cls} found")


def q(x) -> str:
    return f'"{x}"' if isinstance(x, str) else str(x)


def render(kernel: str, gens: list[str], source: str, note: str, key, value, rows) -> str:
    out = [
        HEADER.format(source=source),
        "schema_version = 1",
        f'kernel = "{kernel}"',
        f"generations = [{', '.join(q(g) for g in gens)}]",
        f"source = {q(source)}",
        f"note = {q(note)}",
        f"key = [{', '.join(q(k) for k in key)}]",
        f"value = [{', '.join(q(v) for v in value)}]",
        "rows = [",
        *(f"  [{', '.join(q(c) for c in (*k, *v))}]," for k, v in sorted(rows.items())),
        "]",
    ]
    return "\n".join(out) + "\n"


HEADS = re.compile(r"^q_head-(\d+)_kv_head-(\d+)_head-(\d+)$")
LENS = re.compile(r"^max_model_len-(\d+)-sw-(None|\d+)$")
DTYPES = re.compile(r"^q_(\w+?)_kv_(\w+)$")


def hd64_tables(root: Path, version: str) -> dict[str, str]:
    table = ast.literal_eval(assigned(module(root / HD64), "TUNED_BLOCK_SIZES"))
    source = f"tpu-inference {version} tpu_inference/{HD64}"
    out = {}
    for device, pages in table.items():
        if device not in HD64_DEVICES:
            print(f"skipping unknown upstream device {device!r}", file=sys.stderr)
            continue
        rows = {}
        for page, by_dtype in pages.items():
            for dtypes, by_heads in by_dtype.items():
                qd, kvd = DTYPES.match(dtypes).groups()
                for heads, by_len in by_heads.items():
                    qh, kvh, hd = map(int, HEADS.match(heads).groups())
                    if hd != 64:
                        sys.exit(f"error: {device} {heads}: the hd64 table holds head dim {hd}")
                    for lens, (bkv_p, bq) in by_len.items():
                        length, sw = LENS.match(lens).groups()
                        key = (page, qd, kvd, qh, kvh, int(length), 0 if sw == "None" else int(sw))
                        rows[key] = (bkv_p, bq)
        name = "rpa_v3_hd64_" + device.lower().replace(" ", "_") + ".toml"
        note = (
            f"TUNED_BLOCK_SIZES['{device}']; the kernel clamps a hit per call to "
            "min(pages_per_seq, bkv_p), min(max_num_tokens, bq), as the tables policy does"
        )
        out[name] = render(
            "rpa_v3_hd64",
            HD64_DEVICES[device],
            source + f" TUNED_BLOCK_SIZES['{device}']",
            note,
            HD64_KEY,
            HD64_VALUE,
            rows,
        )
        print(f"{name}: {len(rows)} rows for {', '.join(HD64_DEVICES[device])}")
    return out


def mla_tables(root: Path, version: str) -> dict[str, str]:
    tree = module(root / MLA)
    key_defaults = defaults(tree, "TuningKey")
    param_defaults = defaults(tree, "TunableParams")
    mapping = assigned(tree, "tuned_params_mapping")
    source = f"tpu-inference {version} tpu_inference/{MLA} tuned_params_mapping"
    by_case: dict[str, dict] = {case: {} for case in MLA_VALUE}
    skipped: dict[str, int] = {}
    for k_node, v_node in zip(mapping.keys, mapping.values, strict=True):
        key = {**key_defaults, **{kw.arg: ast.literal_eval(kw.value) for kw in k_node.keywords}}
        params = {
            **param_defaults,
            **{kw.arg: ast.literal_eval(kw.value) for kw in v_node.keywords},
        }
        case = key.pop("case")
        extra = {f for f in key if f not in MLA_KEY and key[f] != key_defaults[f]}
        if case not in MLA_VALUE or extra:
            why = f"case {case}" if case not in MLA_VALUE else "sets " + ", ".join(sorted(extra))
            skipped[why] = skipped.get(why, 0) + 1
            continue
        cells = tuple(key[f] for f in MLA_KEY)
        by_case[case][cells] = tuple(params[f] for f, _ in MLA_VALUE[case])  # later rows win
    for why, n in sorted(skipped.items()):
        print(
            f"mla_v2: left out {n} row(s) that mla_attention cannot look up ({why})",
            file=sys.stderr,
        )
    out = {}
    for case, rows in by_case.items():
        name = f"mla_v2_{case}.toml"
        note = (
            f"TuningKey case '{case}'; not keyed by device upstream, so applied to every "
            "generation with the MLA kernel. mla_attention does not pass the rows' "
            "vmem_limit_bytes to the kernel, so it is not imported."
        )
        if case == "mixed":
            note += " Prefill takes the mixed case's blocks, as mla_attention does."
        out[name] = render(
            "mla_v2",
            MLA_GENERATIONS,
            source,
            note,
            list(MLA_KEY.values()),
            [knob for _, knob in MLA_VALUE[case]],
            rows,
        )
        print(f"{name}: {len(rows)} rows")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", type=Path, help="a tpu_inference package folder to read instead")
    p.add_argument("--version", help="upstream version to record (with --dir)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "hardware" / "tuning"
    )
    args = p.parse_args(argv)
    root, version = (args.dir, args.version or "unknown version") if args.dir else locate()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in {**hd64_tables(root, version), **mla_tables(root, version)}.items():
        (args.out / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
