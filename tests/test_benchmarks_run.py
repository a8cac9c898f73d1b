"""The benchmarks run (issue 6). Nothing here times anything: each script runs on its tiny
size in a subprocess, must exit 0 and report sane results, and must write only where told
(never the committed BENCHMARKS.md or benchmarks/kv_savings.png)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
SCRIPTS = ("startup", "resolve_latency", "detect_vs_seed", "catalog_scaling", "kv_savings")
COMMITTED = (REPO / "BENCHMARKS.md", BENCH / "kv_savings.png")
STATUSES = {"PASS", "MISSED", "SKIPPED"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The 3.11 run has matplotlib (a test extra of `make test`); the Python 3.10 run deselects these.
needs_matplotlib = pytest.mark.needs_matplotlib


def _state() -> list[tuple[bool, int | None]]:
    return [(p.exists(), p.stat().st_mtime_ns if p.exists() else None) for p in COMMITTED]


@pytest.fixture
def committed_untouched():
    before = _state()
    yield
    assert _state() == before, "a benchmark rewrote BENCHMARKS.md or benchmarks/kv_savings.png"


def _run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


# Comparisons, written out here rather than taken from the harness.
MEETS = {
    "<": lambda v, lim: v < lim,
    "<=": lambda v, lim: v <= lim,
    ">=": lambda v, lim: v >= lim,
    "==": lambda v, lim: v == lim,
}
FIGURE = re.compile(r"^(-?[\d,]*\.?\d+)")


def _printed_figure(measured: str) -> tuple[float, float]:
    """The first number a target prints, and half a unit of its last printed digit."""
    m = FIGURE.match(measured)
    assert m, f"the measured text {measured!r} does not start with its figure"
    text = m.group(1).replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text), 0.5 * 10**-decimals


def _check_target(t: dict) -> None:
    """A target's status follows from its figure: PASS exactly when the figure meets the
    limit, MISSED exactly when it does not, and the figure is the one printed."""
    assert t["status"] in STATUSES, t
    assert t["target"] and t["measured"], t
    if t["status"] == "SKIPPED":
        assert t["value"] is None, t
        return
    value, op, limit = t["value"], t["op"], t["limit"]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, t
    assert t["status"] == ("PASS" if MEETS[op](value, limit) else "MISSED"), t
    printed, half_unit = _printed_figure(t["measured"])
    assert abs(printed - value) <= half_unit + 1e-9 * abs(value), t


def _check_result(result: dict) -> None:
    assert result["title"] and result["command"].startswith("python benchmarks/")
    assert "|" in result["markdown"]  # at least one table
    assert result["targets"], "every benchmark states at least one target"
    for t in result["targets"]:
        _check_target(t)
    assert result["ok"] is True  # the measurements are sound (finite, not negative)


def test_target_status_check_bites():
    """The check above refuses a status that does not follow from the figure, and one whose
    figure is not the one printed (each target dict as the harness writes it)."""
    good = {"target": "< 100 ms", "measured": "120.4 ms", "value": 120.4, "op": "<"}
    good |= {"limit": 100.0, "status": "MISSED"}
    _check_target(good)
    for wrong in (
        {"status": "PASS"},  # MISSED counted as success
        {"measured": "12.4 ms"},  # a different figure printed
        {"value": float("nan"), "status": "MISSED"},
        {"value": 99.0, "measured": "99.0 ms"},  # met but reported MISSED
    ):
        with pytest.raises(AssertionError):
            _check_target(good | wrong)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=needs_matplotlib
            if n == "kv_savings"
            else pytest.mark.needs_jax
            if n == "detect_vs_seed"
            else (),
        )
        for n in SCRIPTS
    ],
)
def test_script_runs_tiny(name, tmp_path, committed_untouched):
    out = tmp_path / "result.json"
    args = [
        str(BENCH / f"{name}.py"),
        "--tiny",
        "--output",
        str(tmp_path / "out"),
        "--json",
        str(out),
    ]
    if name == "detect_vs_seed":
        args.append(
            "--skip-legacy"
        )  # importing torch_xla takes seconds and ~1 GB; `make bench` measures it
    proc = _run(args, cwd=tmp_path)
    result = json.loads(out.read_text())
    _check_result(result)
    assert "targets" in proc.stdout and ("PASS" in proc.stdout or "MISSED" in proc.stdout)
    if name == "kv_savings":
        png = tmp_path / "out" / "kv_savings.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert (
            result["targets"][0]["status"] == "PASS"
        )  # ours == upstream is arithmetic, not timing
        assert "2.00x" in result["markdown"]  # the seed's 256-wide padding on v6e for head dim 128
    if name == "catalog_scaling":
        assert "5,000" not in result["markdown"] and "| 50 " in result["markdown"]
    if name == "detect_vs_seed":
        assert "v6e (detected" in proc.stdout


@needs_matplotlib
def test_no_write_writes_nothing(tmp_path, committed_untouched):
    _run([str(BENCH / "kv_savings.py"), "--tiny", "--no-write"], cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_matplotlib
def test_run_all_assembles_benchmarks_md(tmp_path, committed_untouched):
    # Two quick benchmarks are enough to check the assembly; each script is run above.
    out = tmp_path / "out"
    proc = _run(
        [
            str(BENCH / "run_all.py"),
            "--tiny",
            "--only",
            "catalog_scaling,kv_savings",
            "--output",
            str(out),
        ],
        cwd=tmp_path,
    )
    md = (out / "BENCHMARKS.md").read_text()
    for needle in (
        "- Date: ",
        "- CPU: ",
        "- Python: ",
        "- Command: `python benchmarks/run_all.py --tiny --only catalog_scaling,kv_savings`",
        "## Summary of targets",
    ):
        assert needle in md
    for title in ("Catalog scaling", "KV cache memory"):
        assert f"## {title}" in md
    assert "![KV cache memory: ours vs upstream vs the seed](kv_savings.png)" in md
    assert (out / "kv_savings.png").read_bytes()[:8] == PNG_MAGIC
    assert "FAILED" not in proc.stdout
    assert (
        md.count("| PASS ") + md.count("| MISSED ") + md.count("| SKIPPED ") == 2 * 5
    )  # summary + sections: 3 catalog targets, 2 kv targets
