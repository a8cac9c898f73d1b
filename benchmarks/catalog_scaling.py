"""How catalog loading and lookups scale with the number of generation files.

Generates 10, 100, 1,000 and 5,000 valid generation files (tiny: 10 and 50) in a temporary
folder, each derived from ``hardware/v6e.toml`` with its own id, name, alias, device kind,
GKE label, accelerator-type prefix and PCI (device, subsystem) pair, then times
``tpu_registry.catalog.load_catalog([folder])`` with ``catalog.clear_cache()`` before each run.
The built-in folder is always loaded too, so "per file" divides by all files loaded; the
built-in folder alone is timed in the same rounds for reference.

Then times lookups by identifier (``catalog.lookup(kind, value)`` and ``catalog.find(text)``)
at every size: they should not grow with the catalog.

Files are validated once (the warm-up load) and then read from their snapshots in a private
``TPU_REGISTRY_CACHE_DIR``, as every process after the first reads them.

Targets (issue 14): per-file load cost at the largest size / at 10 files <= 1.2, and <= 0.1 ms
per generated file from snapshots.
"""

from __future__ import annotations

import gc
import re
import sys
import tempfile
import time
from pathlib import Path

from run_all import md_table, per_call, script_main, sound, stats, target, tiny

TARGET_RATIO = 1.2
TARGET_PER_FILE_MS = 0.1

SUBSTITUTIONS = {
    # pattern on one line of v6e.toml -> replacement, given n
    r'^id = "v6e"$': lambda n: f'id = "bench-{n:05d}"',
    r"^name = .*$": lambda n: f'name = "Benchmark TPU {n}"',
    r"^aliases = \[.*\]$": lambda n: f'aliases = ["bench alias {n}"]',
    r"^device_kinds = \[.*\]$": lambda n: f'device_kinds = ["Bench TPU {n}"]',
    r"^gke_accelerators = \[.*\]$": lambda n: f'gke_accelerators = ["tpu-bench{n}-slice"]',
    r"^accelerator_types = \[.*\]$": lambda n: (
        f'accelerator_types = [{{ prefix = "bench{n}", suffix_counts = "chips" }}]'
    ),
    # 65,536 device ids are not enough for distinct files at scale:
    # distinct (device, subsystem) pairs.
    r"^pci = \[.*\]$": lambda n: (
        f"pci = [{{ vendor = 0x1ae0, device = 0x{0xB000 + (n >> 8):04x}, "
        f"subsystem_device = 0x{n & 0xFF:04x} }}]"
    ),
}


def template() -> str:
    from tpu_registry.catalog import builtin_hardware_dir

    return (builtin_hardware_dir() / "v6e.toml").read_text()


def render(text: str, n: int) -> str:
    for pattern, repl in SUBSTITUTIONS.items():
        text, count = re.subn(pattern, repl(n), text, count=1, flags=re.M)
        if count != 1:
            raise RuntimeError(
                f"v6e.toml no longer has a line matching {pattern!r}; "
                "update benchmarks/catalog_scaling.py"
            )
    return text


def generate(folder: Path, count: int, text: str) -> Path:
    folder.mkdir(parents=True)
    for n in range(count):
        (folder / f"bench-{n:05d}.toml").write_text(render(text, n))
    return folder


def run(small: bool) -> dict:
    import os

    from tpu_registry import catalog

    snaps = tempfile.mkdtemp(prefix="tpu-registry-bench-snapshots-")
    os.environ["TPU_REGISTRY_CACHE_DIR"] = snaps
    sizes = [10, 50] if small else [10, 100, 1000, 5000]
    rounds = 2 if small else 5
    calls, batches = (2000, 3) if small else (10000, 15)
    builtin = len(catalog.load_catalog())
    text = template()
    with tempfile.TemporaryDirectory(prefix="tpu-registry-bench-catalog-") as tmp:
        t0 = time.perf_counter()
        folders = {n: generate(Path(tmp) / f"n{n}", n, text) for n in sizes}
        print(
            f"catalog_scaling: generated {sum(sizes):,} files in {time.perf_counter() - t0:.1f} s; "
            f"built-in folder has {builtin} files; {rounds} rounds"
        )

        def load(folder: Path | None, collect: bool = True):
            catalog.clear_cache()
            if not collect:
                gc.disable()
            try:
                t = time.perf_counter()
                cat = catalog.load_catalog([folder] if folder else [])
                return time.perf_counter() - t, cat
            finally:
                gc.enable()

        # Warm-up (page cache, lazily imported code), with the result checked.
        for n in sizes:
            _, cat = load(folders[n])
            assert len(cat) == n + builtin, (n, len(cat))
            assert cat.lookup("device_kind", f"Bench TPU {n - 1}") == {f"bench-{n - 1:05d}"}
        del cat
        all_sizes = [0, *sizes]
        times: dict[tuple[int, bool], list[float]] = {
            (n, c): [] for n in all_sizes for c in (True, False)
        }
        for r in range(rounds):
            for n in all_sizes if r % 2 == 0 else all_sizes[::-1]:
                # Small sizes are repeated within a round so each gets a comparable share of time.
                for i in range(max(1, min(20, 500 // max(n, 1)))):
                    for collect in (True, False) if (r + i) % 2 == 0 else (False, True):
                        times[(n, collect)].append(load(folders.get(n), collect)[0])
            print(f"  round {r + 1}/{rounds} done", flush=True)

        load_rows = []
        per_file: dict[tuple[int, bool], float] = {}
        base = stats(times[(0, True)])
        for n in all_sizes:
            s, s_off = stats(times[(n, True)]), stats(times[(n, False)])
            files = n + builtin
            per_file[(n, True)], per_file[(n, False)] = s.median / files, s_off.median / files
            extra = "-" if n == 0 else f"{(s.median - base.median) / n * 1000:.3f}"
            vs10 = "-" if n == 0 else f"{per_file[(n, True)] / per_file[(sizes[0], True)]:.2f}"
            vs10_off = (
                "-" if n == 0 else f"{per_file[(n, False)] / per_file[(sizes[0], False)]:.2f}"
            )
            load_rows.append(
                [
                    f"{n:,}" if n else "0 (built-in only)",
                    f"{files:,}",
                    s.fmt(1000, 1),
                    f"{per_file[(n, True)] * 1000:.3f}",
                    extra,
                    vs10,
                    f"{per_file[(n, False)] * 1000:.3f}",
                    vs10_off,
                    s.n,
                ]
            )
        load_table = md_table(
            [
                "generated files",
                "files loaded",
                "load_catalog() ms",
                "ms per file loaded",
                "ms per generated file (minus built-in only)",
                "per file vs 10",
                "ms per file, GC off",
                "per file vs 10, GC off",
                "runs",
            ],
            load_rows,
        )

        # Lookups: every size's catalog alive at once, measured in alternating rounds.
        cats = {}
        for n in sizes:
            catalog.clear_cache()
            cats[n] = catalog.load_catalog([folders[n]])
        catalog.clear_cache()

        def probes(n: int) -> dict:
            cat, mid = cats[n], n // 2
            pci = f"1ae0:{0xB000 + (mid >> 8):04x}/{mid & 0xFF:04x}"
            return {
                "lookup('device_kind', ...)": lambda: cat.lookup("device_kind", f"Bench TPU {mid}"),
                "lookup('pci', ...)": lambda: cat.lookup("pci", pci),
                "lookup('gke_accelerator', ...)": lambda: cat.lookup(
                    "gke_accelerator", f"tpu-bench{mid}-slice"
                ),
                "find(alias)": lambda: cat.find(f"Bench Alias {mid}"),
                "find('<prefix>-8') (accelerator type)": lambda: cat.find(f"bench{mid}-8"),
                "find(unknown text)": lambda: cat.find("no such tpu"),
            }

        samples: dict[tuple[int, str], list[float]] = {}
        for n in sizes:
            for label, fn in probes(n).items():
                got = fn()
                assert got == (set() if "unknown" in label else {f"bench-{n // 2:05d}"}), (
                    label,
                    got,
                )
        for b in range(batches):
            for n in sizes if b % 2 == 0 else sizes[::-1]:
                for label, fn in probes(n).items():
                    samples.setdefault((n, label), []).extend(per_call(fn, calls, 1))
        labels = list(probes(sizes[0]))
        lookup_us = {
            label: [stats(samples[(n, label)]).median * 1e6 for n in sizes] for label in labels
        }
        lookup_rows = [
            [f"{n:,}", *[f"{lookup_us[label][i]:.2f}" for label in labels]]
            for i, n in enumerate(sizes)
        ]
        lookup_rows.append(
            ["largest / smallest", *[f"{v[-1] / v[0]:.2f}x" for v in lookup_us.values()]]
        )
        lookup_table = md_table(["generated files", *[f"{k} µs" for k in labels]], lookup_rows)
        cats.clear()

    print(load_table)
    print()
    print(lookup_table)
    ratio = per_file[(sizes[-1], True)] / per_file[(sizes[0], True)]
    base_ms = stats(times[(0, True)]).median
    per_generated = (stats(times[(sizes[-1], True)]).median - base_ms) / sizes[-1] * 1000
    import shutil

    shutil.rmtree(snaps, True)
    ratio_off = per_file[(sizes[-1], False)] / per_file[(sizes[0], False)]
    worst_lookup = max(v[-1] / v[0] for v in lookup_us.values())
    md = "\n".join(
        [
            f"Generated files are copies of `hardware/v6e.toml` with unique identifiers. Each "
            f"`load_catalog()` starts from `catalog.clear_cache()` and also loads the {builtin} "
            f"built-in files; rounds alternate the order of sizes, small sizes are repeated within "
            f"a round, and every load is timed twice, with Python's cyclic garbage collector on "
            f"(as users run it) and off (`gc.disable()`, to show what the collector costs as the "
            f"heap grows). {rounds} rounds after one warm-up load per size. Lookups: all sizes' "
            f"catalogs alive at once, {batches} alternating batches of {calls:,} calls each, "
            f"median per call, for an identifier in the middle of the generated files.",
            "",
            load_table,
            "",
            lookup_table,
        ]
    )
    targets = [
        target(
            f"load cost per file at {sizes[-1]:,} / at {sizes[0]} generated files",
            f"<= {TARGET_RATIO}",
            f"{ratio:.2f}",
            ratio,
            "<=",
            TARGET_RATIO,
            f"with the garbage collector off: {ratio_off:.2f}"
            + (
                ""
                if ratio <= TARGET_RATIO
                else (
                    f"; per file loaded {per_file[(sizes[0], True)] * 1000:.3f} ms at "
                    f"{sizes[0]} generated files, {per_file[(sizes[-1], True)] * 1000:.3f} ms at "
                    f"{sizes[-1]:,} (files are indexed from the snapshot and a generation's data "
                    "is parsed on first use; this benchmark does not break the growth down)"
                )
            ),
        ),
        target(
            f"load cost per generated file at {sizes[-1]:,} files, from snapshots",
            f"<= {TARGET_PER_FILE_MS} ms",
            f"{per_generated:.3f} ms",
            per_generated,
            "<=",
            TARGET_PER_FILE_MS,
        ),
        target(
            f"lookup time at {sizes[-1]:,} / at {sizes[0]} generated files (worst probe)",
            "constant (< 1.5)",
            f"{worst_lookup:.2f}",
            worst_lookup,
            "<",
            1.5,
        ),
    ]
    return {
        "name": "catalog_scaling",
        "short": "catalog",
        "title": "Catalog scaling: load and lookup against catalog size",
        "command": "python benchmarks/catalog_scaling.py",
        "markdown": md,
        "targets": targets,
        "ok": sound(targets),
    }


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, argv, lambda args: run(tiny(args)))


if __name__ == "__main__":
    sys.exit(main())
