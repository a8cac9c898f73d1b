"""Run every benchmark in order and write BENCHMARKS.md (``make bench``).

Usage::

    # full run: BENCHMARKS.md + benchmarks/kv_savings.png
    .venv/bin/python benchmarks/run_all.py
    # smoke run, writes only under /tmp/b
    .venv/bin/python benchmarks/run_all.py --tiny --output /tmp/b
    # print only
    .venv/bin/python benchmarks/run_all.py --no-write

Each benchmark runs as its own process (``benchmarks/<name>.py --json FILE``) so that no
benchmark sees modules, caches or plugin managers another one left behind.

This module also holds the small harness the benchmark scripts share (statistics, tables,
measured child processes); they import it as ``run_all`` from their own folder.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SCRIPTS = ("startup", "resolve_latency", "detect_vs_seed", "catalog_scaling", "kv_savings")
ENV_TINY = "TPU_REGISTRY_BENCH_TINY"
ENV_PYCACHE = "TPU_REGISTRY_BENCH_PYCACHE"
PASS, MISSED, SKIPPED = "PASS", "MISSED", "SKIPPED"

# ---------------------------------------------------------------------------------------------
# Shared harness
# ---------------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"smallest sizes and repetitions (smoke test; also {ENV_TINY}=1)",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        help="write files (BENCHMARKS.md, PNG) here instead of the repository",
    )
    p.add_argument("--no-write", action="store_true", help="write no files; print only")
    p.add_argument(
        "--json", metavar="FILE", help="also write the result as JSON (used by run_all.py)"
    )


def script_main(doc: str, argv: list[str] | None, run, add_args=None) -> int:
    """The command line every benchmark script shares: common flags, optional extra flags,
    then ``run(args)`` and ``finish``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_args(p)
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    return finish(run(args), args)


def tiny(args: argparse.Namespace) -> bool:
    return bool(args.tiny) or os.environ.get(ENV_TINY, "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        """``median (min-max)`` after multiplying by ``scale``."""
        f = f"{{:.{digits}f}}"
        lo, hi = f.format(self.min * scale), f.format(self.max * scale)
        return f"{f.format(self.median * scale)}{unit} ({lo}–{hi})"


def stats(samples: Iterable[float]) -> Stat:
    xs = list(samples)
    if not xs:
        raise ValueError("no samples")
    return Stat(statistics.median(xs), min(xs), max(xs), len(xs))


def per_call(fn, calls: int, batches: int) -> list[float]:
    """Seconds per call, one figure per batch of ``calls`` calls."""
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls)
    return out


def md_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None
) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned unless ``right`` says otherwise)."""
    cells = [["-" if c is None else str(c) for c in r] for r in rows]
    if right is None:
        right = [bool(cells) and all(_numeric(r[i]) for r in cells) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    out.append(
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1))
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    for r in cells:
        out.append(
            "| "
            + " | ".join(
                c.rjust(w) if rt else c.ljust(w) for c, w, rt in zip(r, widths, right, strict=True)
            )
            + " |"
        )
    return "\n".join(out)


def _numeric(s: str) -> bool:
    head = s.split(" ")[0].replace(",", "").rstrip("x%")
    try:
        float(head)
        return True
    except ValueError:
        return s == "-"


# How a figure meets its limit; targets carry the figure, the comparison and the limit, so
# that PASS / MISSED is computed from the measurement, never written by hand.
COMPARE = {
    "<": lambda v, lim: v < lim,
    "<=": lambda v, lim: v <= lim,
    ">=": lambda v, lim: v >= lim,
    "==": lambda v, lim: v == lim,
}


def target(
    what: str,
    goal: str,
    measured: str,
    value: float | None,
    op: str = "<",
    limit: float = 0.0,
    note: str = "",
) -> dict[str, Any]:
    """One target line: met when ``value op limit`` holds; ``value`` None means it could not
    be measured (SKIPPED). ``measured`` prints ``value`` (its first number)."""
    if op not in COMPARE:
        raise ValueError(f"unknown comparison {op!r}")
    if value is None:
        status = SKIPPED
    else:
        status = PASS if COMPARE[op](value, limit) else MISSED
    return {
        "what": what,
        "target": goal,
        "measured": measured,
        "value": value,
        "op": op,
        "limit": limit,
        "status": status,
        "note": note,
    }


def sound(targets: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every measured figure is a real measurement (finite, not negative). A MISSED
    timing target is a finding to report, not a broken run; a NaN or negative figure is."""
    return all(
        t["value"] is None or (math.isfinite(t["value"]) and t["value"] >= 0) for t in targets
    )


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    return md_table(
        ["target", "goal", "measured", "result", "note"],
        [[t["what"], t["target"], t["measured"], t["status"], t["note"]] for t in targets],
        right=[False] * 5,
    )


_own_pycache: str | None = None


def pycache_dir() -> str:
    """A private bytecode cache (PYTHONPYCACHEPREFIX) for child processes that run our code.

    Installed packages run from bytecode; this checkout is editable and the machine may set
    PYTHONDONTWRITEBYTECODE=1, which would recompile tpu_registry in every process. A
    private prefix keeps the repository clean. run_all.py shares one across scripts.
    """
    global _own_pycache
    shared = os.environ.get(ENV_PYCACHE)
    if shared:
        return shared
    if _own_pycache is None:
        _own_pycache = tempfile.mkdtemp(prefix="tpu-registry-bench-pycache-")
        atexit.register(shutil.rmtree, _own_pycache, True)
    return _own_pycache


def child_env(
    extra: Mapping[str, str] | None = None, *, bytecode_cache: bool = True
) -> dict[str, str]:
    env = dict(os.environ)
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache_dir()
    env.update(extra or {})
    return env


@dataclass
class Proc:
    wall_s: float
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str) -> Proc:
        if self.returncode != 0:
            raise RuntimeError(f"{what} exited {self.returncode}: {self.stderr.strip()[-2000:]}")
        return self


def _gnu_time() -> str | None:
    """GNU time, if installed: it measures a child's own peak RSS (see ``run_process``)."""
    path = shutil.which("time") or "/usr/bin/time"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "GNU" in out.stdout + out.stderr else None


GNU_TIME = _gnu_time()


def run_process(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
    cwd: str | os.PathLike | None = None,
) -> Proc:
    """Run one process; return its wall time and its own peak RSS.

    Linux charges a child the peak RSS of the memory it was forked from (the old image's high
    water mark is kept at ``exec``), so ``os.wait4`` on a child of this (large) process can
    report no less than this process's own size. With GNU time installed, the command runs
    under it and the RSS is the one GNU time reads for its own, small, child (``%M``); its fork
    and exec add about a millisecond to every process alike. Without it, ``os.wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        rss_file = None
        if GNU_TIME:
            fd, rss_file = tempfile.mkstemp(prefix="tpu-registry-bench-rss-")
            os.close(fd)
            cmd = [GNU_TIME, "-f", "%M", "-o", rss_file, *cmd]
        t0 = time.perf_counter()
        p = subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
        )
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        maxrss = usage.ru_maxrss
        if rss_file is not None:
            try:
                lines = Path(rss_file).read_text().split()
                maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else maxrss
            finally:
                os.unlink(rss_file)
        out.seek(0)
        err.seek(0)
        return Proc(
            wall,
            maxrss,
            p.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output: {text[-500:]!r}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": (f"{platform.python_implementation()} {platform.python_version()}"),
        "platform": platform.platform(),
        "load": load,
    }


def finish(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Print a benchmark's targets and write its JSON result when asked."""
    print()
    print(f"## {result['title']} — targets")
    print(targets_table(result["targets"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result.get("ok", True) else 1


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def write_markdown(
    path: Path,
    results: list[dict[str, Any]],
    failed: list[str],
    info_start: dict[str, Any],
    info_end: dict[str, Any],
    command: str,
) -> None:
    lines = [
        "# Benchmarks",
        "",
        "What the registry costs, and what its choices save (issues 6 and 14). Generated by",
        "`make bench` (`benchmarks/run_all.py`); see `benchmarks/README.md` for what each",
        "benchmark measures. Timings are the median of repeated runs after a warm-up, with the",
        "minimum and maximum in brackets; ratios compare figures measured side by side "
        "in this run.",
        "",
        f"- Date: {info_start['date']}",
        f"- CPU: {info_start['cpu']} ({info_start['cpus']} logical CPUs)",
        f"- Python: {info_start['python']}",
        f"- Platform: {info_start['platform']}",
        "- Paths are left out on purpose: the figures do not depend on where things live.",
        f"- Load average (1/5/15 min) at start: {info_start['load']}; at end: {info_end['load']}",
        f"- Command: `{command}`",
        "",
        "## Summary of targets",
        "",
    ]
    all_targets = [
        dict(t, what=f"{r['short']}: {t['what']}") for r in results for t in r["targets"]
    ]
    lines.append(targets_table(all_targets))
    if failed:
        lines += [
            "",
            f"**Benchmarks that failed to run:** {', '.join(failed)} (see the console output).",
        ]
    for r in results:
        lines += [
            "",
            f"## {r['title']}",
            "",
            f"`{r['command']}`",
            "",
            r["markdown"].rstrip(),
            "",
            "Targets:",
            "",
            targets_table(r["targets"]),
        ]
        png = r.get("png")
        if png:
            rel = os.path.relpath(png, path.parent)
            lines += ["", f"![{r['title']}]({Path(rel).as_posix()})"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(SCRIPTS)}"
    )
    p.add_argument(
        "--skip-legacy",
        action="store_true",
        help="detect_vs_seed: skip the torch_xla measurement even when its environment exists",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCRIPTS)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    small = tiny(args)
    out_dir = Path(args.output).resolve() if args.output else ROOT
    if args.output and not args.no_write:
        out_dir.mkdir(parents=True, exist_ok=True)
    info_start = machine()
    command = (
        "python benchmarks/run_all.py"
        + (" --tiny" if small else "")
        + (f" --only {args.only}" if args.only else "")
    )
    print(
        f"# tpu-registry benchmarks — {info_start['date']}, {info_start['cpu']}, "
        f"{info_start['python']}"
    )
    tiny_note = "; TINY mode (smoke test, figures meaningless)" if small else ""
    print(f"# load average {info_start['load']}{tiny_note}")
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tpu-registry-bench-") as tmp:
        env = dict(os.environ)
        env[ENV_PYCACHE] = str(Path(tmp) / "pycache")
        for name in names:
            out_json = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--json", str(out_json)]
            if small:
                cmd.append("--tiny")
            if args.no_write:
                cmd.append("--no-write")
            elif args.output:
                cmd += ["--output", str(out_dir)]
            if name == "detect_vs_seed" and args.skip_legacy:
                cmd.append("--skip-legacy")
            print(f"\n{'=' * 100}\n# {name}: {' '.join(cmd[1:])}\n{'=' * 100}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            print(f"# {name}: exit {rc} after {time.perf_counter() - t0:.1f} s", flush=True)
            if out_json.is_file():
                results.append(json.loads(out_json.read_text()))
            if rc != 0 or not out_json.is_file():
                failed.append(name)
    info_end = machine()
    if not args.no_write and results:
        md = out_dir / "BENCHMARKS.md"
        write_markdown(md, results, failed, info_start, info_end, command)
        print(f"\nwrote {md}")
    print("\n# Summary of targets")
    print(
        targets_table(
            [dict(t, what=f"{r['short']}: {t['what']}") for r in results for t in r["targets"]]
        )
    )
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
