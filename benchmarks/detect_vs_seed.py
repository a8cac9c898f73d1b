"""What detection costs: the seed's approach against ``tpu_registry.detection.detect()``.

Fresh processes, alternating order, each timed inside (import, call) and as a whole (wall
time and peak RSS from ``os.wait4``):

(a) the seed: ``import torch_xla`` + ``torch_xla._internal.tpu.version()``, in the legacy
    integration environment (torch 2.9.0 + torch-xla 2.9.0 + vllm 0.13, Python 3.11) with
    ``TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v6e-8 PJRT_DEVICE=CPU``: no network, no TPU;
(b) ``import jax`` + ``jax.devices()`` with ``JAX_PLATFORMS=cpu``, in the current integration
    environment (vLLM + tpu-inference + JAX, Python 3.12; the .venv's jax without it);
(c) ours: ``import tpu_registry.detection`` + ``detect()`` with its default, non-invasive
    settings, from this checkout (``PYTHONPATH``), in the same interpreter as (a) and again in
    the same interpreter as (b), with a private snapshot folder filled by the warm-up.

All processes get the same environment variables, so (c) sees the same
``TPU_ACCELERATOR_TYPE`` that torch_xla reads and must answer v6e.

Targets (issue 14), whole process (wall time, fresh processes): ours is >= 100x cheaper than
(a) and >= 12x cheaper than (b). The legacy environment is built with
``integration/build_env.sh legacy``; without it (a) is skipped and said so.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from run_all import (
    ROOT,
    child_env,
    last_json_line,
    md_table,
    run_process,
    script_main,
    sound,
    stats,
    target,
    tiny,
)

TARGET_RATIO = {"(a) torch_xla": 100.0, "(b) jax": 12.0}
VENV_PY = ROOT / ".venv" / "bin" / "python"
OFFLINE = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v6e-8",
    "PJRT_DEVICE": "CPU",
    "JAX_PLATFORMS": "cpu",
}

SEED_CODE = r"""
import json, time
t0 = time.perf_counter()
import torch_xla
import torch_xla._internal.tpu as tpu
t1 = time.perf_counter()
v = tpu.version()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "call_s": t2 - t1, "answer": f"TPU version {v}"}))
"""

JAX_CODE = r"""
import json, time
t0 = time.perf_counter()
import jax
t1 = time.perf_counter()
devices = jax.devices()
t2 = time.perf_counter()
answer = f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind})"
print(json.dumps({"import_s": t1 - t0, "call_s": t2 - t1, "answer": answer}))
"""

OURS_CODE = r"""
import json, time
t0 = time.perf_counter()
# the package attribute tpu_registry.detect is the function
from tpu_registry.detection import detect
t1 = time.perf_counter()
d = detect()
t2 = time.perf_counter()
answer = f"{d.generation} ({d.status}: {d.reason})"
import sys
print(json.dumps({"import_s": t1 - t0, "call_s": t2 - t1, "answer": answer,
                  "manager": "pluggy" in sys.modules}))
"""


def cache_root() -> Path:
    return Path(os.environ.get("TPU_REGISTRY_CACHE") or Path.home() / ".cache" / "tpu-registry")


def find_legacy(kind: str = "legacy") -> Path | None:
    """The newest healthy ``legacy-*`` (or ``current-*``) environment's python, or None."""
    found = []
    for py in glob.glob(str(cache_root() / "envs" / f"{kind}-*" / "bin" / "python")):
        marker = Path(py).parent.parent / ".healthy"
        if marker.is_file():
            found.append((marker.stat().st_mtime, Path(py)))
    return max(found)[1] if found else None


_snapshots: str | None = None


def ours_env(extra: dict | None = None) -> dict:
    """This checkout first on the path (read-only use of the integration interpreters), a
    private snapshot folder, the offline variables."""
    global _snapshots
    if _snapshots is None:
        import atexit
        import shutil
        import tempfile

        _snapshots = tempfile.mkdtemp(prefix="tpu-registry-bench-snapshots-")
        atexit.register(shutil.rmtree, _snapshots, True)
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "tpu-registry-vllm")])
    return child_env({**OFFLINE, "PYTHONPATH": path, "TPU_REGISTRY_CACHE_DIR": _snapshots})


def has_registry(python: Path) -> bool:
    env = ours_env()
    return (
        subprocess.run(
            [str(python), "-c", "import tpu_registry.detection"],
            env=env,
            capture_output=True,
            timeout=120,
        ).returncode
        == 0
    )


def run(small: bool, skip_legacy: bool) -> dict:
    rounds, warmup = (1, 0) if small else (10, 1)
    venv_py = VENV_PY if VENV_PY.is_file() else Path(sys.executable)
    legacy = None if skip_legacy else find_legacy()
    notes: list[str] = []
    if skip_legacy:
        notes.append("(a) skipped on request (--skip-legacy).")
    elif legacy is None:
        msg = (
            "LEGACY ENVIRONMENT MISSING: no <cache>/envs/legacy-*/bin/python (the cache is "
            "~/.cache/tpu-registry, or TPU_REGISTRY_CACHE) with a "
            ".healthy marker. Build it with `integration/build_env.sh legacy` (Python 3.11, torch "
            "2.9.0 + torch-xla 2.9.0 + vllm 0.13; ~11 GB) and run this benchmark again. Skipping "
            "(a); (b) and (c) still run."
        )
        print(msg)
        notes.append(msg)
    ours_legacy_py = None
    if legacy is not None:
        ours_legacy_py = legacy if has_registry(legacy) else venv_py
        if ours_legacy_py != legacy:
            notes.append(
                "tpu_registry's dependencies are missing in the legacy environment; "
                "(c) paired with (a) runs with the .venv's interpreter instead."
            )
    current = find_legacy("current")
    jax_py = current if current is not None and has_registry(current) else venv_py
    if jax_py == venv_py:
        notes.append("current integration environment missing: (b) uses the .venv's jax.")

    # name -> (python, code, bytecode cache?). Ours runs from a private bytecode cache (as an
    # installed package would); torch_xla and jax run from the bytecode their install wrote.
    kinds: dict[str, tuple[Path, str, bool]] = {}
    if legacy is not None:
        kinds["(a) import torch_xla + tpu.version()"] = (legacy, SEED_CODE, False)
        kinds[
            "(c) import tpu_registry + detect(), legacy env"
            if ours_legacy_py == legacy
            else "(c) import tpu_registry + detect(), .venv (paired with a)"
        ] = (ours_legacy_py, OURS_CODE, True)
    kinds["(b) import jax + jax.devices()"] = (jax_py, JAX_CODE, False)
    kinds[
        "(c) import tpu_registry + detect(), current env"
        if jax_py == current
        else "(c) import tpu_registry + detect(), .venv"
    ] = (jax_py, OURS_CODE, True)
    names = list(kinds)
    print(
        f"detect_vs_seed: {rounds} round(s) of {len(names)} processes "
        f"after {warmup} warm-up round(s)"
    )

    def one(name: str) -> dict:
        python, code, ours = kinds[name]
        env = ours_env() if ours else child_env(OFFLINE, bytecode_cache=False)
        proc = run_process([str(python), "-c", code], env, timeout=1800).check(name)
        out = last_json_line(proc.stdout)
        out["wall_s"], out["rss_mb"] = proc.wall_s, proc.maxrss_kib * 1024 / 1e6
        return out

    for _ in range(warmup):
        for name in names:
            print(f"  warm-up {name}: {one(name)['answer']}", flush=True)
    res: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    answers: dict[str, str] = {}
    managers: dict[str, list[bool]] = defaultdict(list)  # ours: detect() built pluggy's manager?
    # The bare interpreter of each environment ours runs in, once per round: what of "whole
    # process" is interpreter start, and so what is left for exit.
    bare: dict[Path, list[float]] = {kinds[n][0]: [] for n in names if kinds[n][2]}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out = one(name)
            answers[name] = out["answer"]
            if "manager" in out:
                managers[name].append(out["manager"])
            for k in ("import_s", "call_s", "wall_s", "rss_mb"):
                res[name][k].append(out[k])
            res[name]["total_s"].append(out["import_s"] + out["call_s"])
        for python, walls in bare.items():
            walls.append(run_process([str(python), "-c", "pass"], ours_env()).check("bare").wall_s)
        print(f"  round {r + 1}/{rounds} done", flush=True)

    ok = True
    for name, answer in answers.items():
        want = (
            "TPU version 6"
            if name.startswith("(a)")
            else "cpu"
            if name.startswith("(b)")
            else "v6e (detected"
        )
        if want not in answer:
            ok = False
            notes.append(f"unexpected answer from {name}: {answer}")

    def med(name: str, k: str) -> float:
        return stats(res[name][k]).median

    def manager_text(name: str) -> str:
        built = sum(managers[name])
        if not built:
            return "the built-in detectors, called without the plugin manager"
        return (
            f"it built the plugin manager in {built} of {len(managers[name])} runs: a plugin "
            "implements tpu_registry_detect, or the cached list did not know the plugins yet"
        )

    rows = []
    for name in names:
        s = {k: stats(v) for k, v in res[name].items()}
        rows.append(
            [
                name,
                s["import_s"].fmt(1000, 1),
                s["call_s"].fmt(1000, 2),
                s["total_s"].fmt(1000, 1),
                s["wall_s"].fmt(1000, 0),
                s["rss_mb"].fmt(1, 0),
                answers[name],
            ]
        )
    table = md_table(
        [
            "process",
            "import ms",
            "call ms",
            "import + call ms",
            "whole process ms",
            "peak RSS MB",
            "answer",
        ],
        rows,
        right=[False, True, True, True, True, True, False],
    )
    print(table)

    pairs = []
    if legacy is not None:
        pairs.append(("(a) torch_xla", names[0], names[1]))
    pairs.append(("(b) jax", "(b) import jax + jax.devices()", names[-1]))
    ratio_rows = []
    targets = []
    for label, theirs, ours in pairs:
        r_total = med(theirs, "total_s") / med(ours, "total_s")
        r_wall = med(theirs, "wall_s") / med(ours, "wall_s")
        r_call = med(theirs, "total_s") / med(ours, "call_s")
        r_rss = med(theirs, "rss_mb") / med(ours, "rss_mb")
        per_round = stats(
            t / o for t, o in zip(res[theirs]["total_s"], res[ours]["total_s"], strict=True)
        )
        ratio_rows.append(
            [
                f"{label} / (c) ours",
                f"{r_total:,.1f}x",
                f"{per_round.min:,.1f}–{per_round.max:,.1f}x",
                f"{r_wall:,.1f}x",
                f"{r_call:,.0f}x",
                f"{r_rss:,.1f}x",
            ]
        )
        goal = TARGET_RATIO[label]
        why = f"ours: {manager_text(ours)}"  # pluggy or not: what a detect() process costs
        if r_wall < goal:
            rest = med(ours, "wall_s") - med(ours, "import_s") - med(ours, "call_s")
            start = stats(bare[kinds[ours][0]]).median
            why = (
                f"ours: {med(ours, 'wall_s') * 1000:.0f} ms whole process: importing "
                f"tpu_registry.detection {med(ours, 'import_s') * 1000:.0f} ms, detect() "
                f"{med(ours, 'call_s') * 1000:.0f} ms ({manager_text(ours)}; catalog from "
                "snapshots), interpreter start "
                f"{start * 1000:.0f} ms (`python -c pass` in the same environment), exit and "
                f"the rest {(rest - start) * 1000:.0f} ms; import + call only: {r_total:,.1f}x"
            )
        targets.append(
            target(
                f"{label}: whole process, theirs vs ours (import + detect())",
                f">= {goal:.0f}x cheaper",
                f"{r_wall:,.1f}x",
                r_wall,
                ">=",
                goal,
                why,
            )
        )
    if legacy is None:
        targets.insert(
            0,
            target(
                "(a) torch_xla: whole process, theirs vs ours",
                f">= {TARGET_RATIO['(a) torch_xla']:.0f}x cheaper",
                "not measured",
                None,
                ">=",
                TARGET_RATIO["(a) torch_xla"],
                "legacy environment missing: build it with `integration/build_env.sh legacy`"
                if not skip_legacy
                else "skipped (--skip-legacy)",
            ),
        )
    ratio_table = md_table(
        [
            "ratio (medians)",
            "import + call",
            "per-round range",
            "whole process",
            "theirs (import + call) / our detect() call alone",
            "peak RSS",
        ],
        ratio_rows,
        right=[False, True, True, True, True, True],
    )
    print()
    print(ratio_table)
    for n in notes:
        print("note:", n)
    md = "\n".join(
        [
            f"{rounds} round(s) of fresh processes after {warmup} warm-up round(s), alternating "
            f"order; every process gets `{' '.join(f'{k}={v}' for k, v in OFFLINE.items())}`. "
            "*import* and *call* are timed inside the process; *whole process* and *peak RSS* come "
            "from `os.wait4`. Our processes read bytecode from a private cache; torch_xla's and "
            "jax's read the bytecode their installation wrote."
            + (" (a) ran in the legacy integration environment." if legacy else ""),
            "",
            table,
            "",
            ratio_table,
            *(["", *[f"- {n}" for n in notes]] if notes else []),
        ]
    )
    return {
        "name": "detect_vs_seed",
        "short": "detect vs seed",
        "title": "Detection cost: torch_xla and JAX against detect()",
        "command": "python benchmarks/detect_vs_seed.py",
        "markdown": md,
        "targets": targets,
        "ok": ok and sound(targets),
    }


def main(argv: list[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--skip-legacy",
            action="store_true",
            help="skip (a) even when the legacy environment exists",
        )

    def go(args: argparse.Namespace) -> dict:
        skip = args.skip_legacy or os.environ.get(
            "TPU_REGISTRY_BENCH_SKIP_LEGACY", ""
        ).strip() not in ("", "0")
        return run(tiny(args), skip)

    return script_main(__doc__, argv, go, add_args)


if __name__ == "__main__":
    sys.exit(main())
