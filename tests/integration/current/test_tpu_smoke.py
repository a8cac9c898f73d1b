"""benchmarks/tpu_smoke.py: importable, ``--help`` works, and it refuses to run without a TPU.

The benchmark itself has not been run on a TPU; nothing here runs it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "tpu_smoke.py"


def test_imports_and_parses():
    spec = importlib.util.spec_from_file_location("tpu_smoke", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--model", "/m", "--prompts", "8"])
    assert (args.model, args.prompts, args.worker) == ("/m", 8, None)
    assert "NOT YET RUN ON A TPU" in mod.__doc__


def test_help():
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "--attention-backend TPU_REGISTRY" in p.stdout and "--model" in p.stdout


def test_refuses_without_a_tpu():
    # This host only has TPU_ACCELERATOR_TYPE=v6e-1 in its environment: a claim, not hardware.
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "no TPU detected" in p.stderr and "this benchmark needs a TPU VM" in p.stderr
