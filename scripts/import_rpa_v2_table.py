#!/usr/bin/env python3
r"""Convert the published RPA v2 tuned block-size table into tpu-registry tuning tables.

Reads ``TUNED_BLOCK_SIZES`` from an installed torch_xla (or JAX) *without importing it*: the
module source is parsed and the dict literal evaluated with ``ast.literal_eval``, so no TPU
runtime, no JAX and no torch are needed. Writes one TOML file per upstream device name.

Upstream keys v5e and v5p together as "TPU v5" (its device name is the first two words of
the JAX device_kind, and "TPU v5 lite" and "TPU v5" both become "TPU v5"); the v5 table is
therefore written for both generations, and the file says so.

    python scripts/import_rpa_v2_table.py --from torch_xla --out hardware/tuning
    python scripts/import_rpa_v2_table.py --version 2.9.0 \
        --file path/to/ragged_paged_attention_v2.py
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

MODULES = {
    "torch_xla": ("torch_xla", "experimental/pallas_kernels/ragged_paged_attention_v2.py"),
    "jax": ("jax", "experimental/pallas/ops/tpu/ragged_paged_attention/tuned_block_sizes.py"),
}
DEVICES = {
    "TPU v6": (["v6e"], ""),
    "TPU v5": (
        ["v5e", "v5p"],
        "upstream keys v5e and v5p together as 'TPU v5' (device_kind 'TPU v5 lite' and 'TPU v5' "
        "both shorten to it); the same rows are applied to both",
    ),
}
KEY = [
    "q_dtype",
    "kv_dtype",
    "num_q_heads_per_block",
    "num_kv_heads_per_block",
    "head_dim",
    "page_size",
    "max_num_batched_tokens",
    "max_model_len_paged",
]
VALUE = ["num_kv_pages_per_block", "num_queries_per_block"]


def locate(package: str) -> tuple[Path, str]:
    top, rel = MODULES[package]
    spec = importlib.util.find_spec(top)  # a top-level find_spec does not import the package
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: {top} is not installed in this Python ({sys.executable}); use --file")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        sys.exit(f"error: {path} not found in the installed {top}")
    return path, metadata.version(top.replace("_", "-"))


def read_table(path: Path) -> dict:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "TUNED_BLOCK_SIZES" for t in targets):
            return ast.literal_eval(node.value)
    sys.exit(f"error: no TUNED_BLOCK_SIZES literal in {path}")


def render(device: str, rows: dict, source: str) -> tuple[str, str]:
    gens, note = DEVICES[device]
    name = "rpa_v2_" + device.lower().replace(" ", "_") + ".toml"
    out = [
        f"# Imported by scripts/import_rpa_v2_table.py from {source}. "
        "Do not edit by hand: re-run the importer.",
        "schema_version = 1",
        'kernel = "rpa_v2"',
        f"generations = [{', '.join(repr(g).replace(chr(39), chr(34)) for g in gens)}]",
        f"source = \"{source} TUNED_BLOCK_SIZES['{device}']\"",
        f'note = "{note}"',
        f"key = [{', '.join(f'{chr(34)}{k}{chr(34)}' for k in KEY)}]",
        f"value = [{', '.join(f'{chr(34)}{v}{chr(34)}' for v in VALUE)}]",
        "rows = [",
    ]
    for key, value in sorted(rows.items()):
        cells = [f'"{c}"' if isinstance(c, str) else str(c) for c in (*key, *value)]
        out.append(f"  [{', '.join(cells)}],")
    out.append("]")
    return name, "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--from", dest="package", choices=sorted(MODULES), default="torch_xla")
    p.add_argument(
        "--file", type=Path, help="read this module file instead of the installed package"
    )
    p.add_argument("--version", help="upstream version to record (with --file)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "hardware" / "tuning"
    )
    args = p.parse_args(argv)
    if args.file:
        path, version = args.file, args.version or "unknown version"
        rel = MODULES[args.package][1]
    else:
        path, version = locate(args.package)
        rel = MODULES[args.package][1]
    table = read_table(path)
    source = f"{args.package.replace('_', '-')} {version} {MODULES[args.package][0]}/{rel}"
    args.out.mkdir(parents=True, exist_ok=True)
    for device, rows in table.items():
        if device not in DEVICES:
            print(f"skipping unknown upstream device {device!r}", file=sys.stderr)
            continue
        name, text = render(device, rows, source)
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}: {len(rows)} rows for {', '.join(DEVICES[device][0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
