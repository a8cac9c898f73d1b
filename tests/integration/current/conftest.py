"""Shared set-up of the current-stack integration tests (vLLM 0.32 + tpu-inference 0.32 on CPU).

Run through ``integration/run_tests.sh current``, which installs the repository and the vLLM
plugin into the environment and sets the variables checked below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

OFFLINE = {
    "TPU_NAME": "local",
    "TPU_ACCELERATOR_TYPE": "v6e-1",
    "TPU_WORKER_ID": "0",
    "JAX_PLATFORMS": "cpu",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
}

# A tiny Llama: 8 query heads, 2 KV heads, head_dim 128 (the v3 kernel's path; 64 goes to hd64).
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def pytest_configure(config) -> None:
    missing = {k: v for k, v in OFFLINE.items() if os.environ.get(k) != v}
    if missing:
        names = ", ".join(f"{k}={v}" for k, v in missing.items())
        raise pytest.UsageError(f"run through integration/run_tests.sh current (missing: {names})")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    return d


def child_env(changes: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``changes`` applied (None removes a variable)."""
    env = dict(os.environ)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_python(code: str, *, env: dict[str, str | None] | None = None, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh interpreter of this environment; it prints one JSON line last."""
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env(env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise AssertionError(f"subprocess failed ({p.returncode}):\n{p.stderr[-6000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class Background:
    """Subprocesses started together (each takes ~20 s of imports) and collected one by one."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, dict] = {}

    def start(self, name: str, code: str, env: dict[str, str | None]) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, name: str, timeout: int = 600) -> dict:
        if name in self.results:
            return self.results[name]
        p = self.procs[name]
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"subprocess {name} failed ({p.returncode}):\n{err[-6000:]}")
        result = json.loads(out.strip().splitlines()[-1])
        result["_stdout"] = out
        self.results[name] = result
        return result


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the upstream-agreement counts (test_upstream_agreement.py) at the end of the run."""
    mod = sys.modules.get("test_upstream_agreement")
    summary = getattr(mod, "SUMMARY", None)
    if summary:
        terminalreporter.section("registry baseline vs tpu-inference 0.32 (matching / workloads)")
        for gen, c in summary.items():
            terminalreporter.write_line(
                f"{gen:6} {c['workloads']} workloads: block sizes {c['block_sizes']}, VMEM "
                f"{c['vmem']}, page size {c['page_size']}, min page size {c['min_page_size']}, "
                f"max_num_seqs {c['max_num_seqs']}; differences {c['differences']}; upstream "
                f"tuples its kernel would refuse as arguments: {c['kernel_rejects_as_argument']}"
            )
