"""Edges of the command line and its inputs: counts that are not counts, absurd budgets,
configs of the wrong shape, Ctrl-C, --version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata

import pytest
from conftest import cli_path, run_cli

from tpu_registry import Evidence, Workload, load_catalog, units
from tpu_registry.detection import detect, reconcile


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8", 8),
        ("128", 128),
        ("0", None),
        ("", None),
        ("٨", None),
        ("8x", None),
        ("1" * 10, None),
        ("1" * 5000, None),
        (" 16 ", 16),
        ("-4", None),
    ],
)
def test_a_count_is_ascii_digits_of_sane_length(text, want):
    assert units.count(text) == want


def test_an_accelerator_type_with_thousands_of_digits_is_unrecognised_not_a_crash():
    huge = "v6e-" + "1" * 5000
    r = run_cli("show", huge)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    shown = f"{huge[:60]}...(5004 characters)"  # a long name is shortened in the message
    assert r.stderr == f"error: no generation is named {shown!r} (try `tpu-registry list`)\n"
    cat = load_catalog()
    assert cat.accelerator_prefix(huge)[2] is None
    assert cat.accelerator_prefix("v6e-٨")[2] is None  # an Arabic-Indic digit is no count


def test_the_env_detector_keeps_other_evidence_beside_an_absurd_suffix():
    env = {"TPU_ACCELERATOR_TYPE": "v6e-" + "1" * 4400, "TPU_REGISTRY_GENERATION": "v5e"}
    d = detect(env=env, sysfs_root="/nonexistent-sysfs-root")
    assert not d.faults
    assert (d.generation, d.status) == ("v5e", "explicit")
    [accel] = [f for f in d.findings if f.evidence.kind == "accelerator_type"]
    assert accel.evidence.count is None


def test_an_absurd_detection_budget_is_a_clear_error():
    for value in ("1e308", "601", "-1", "nan", "soon"):
        r = run_cli("detect", env={"TPU_REGISTRY_DETECT_TIMEOUT": value})
        assert r.returncode == 2 and "Traceback" not in r.stderr, (value, r.stderr)
        assert "is not a number of seconds in (0, 600]" in r.stderr


@pytest.mark.parametrize("text_config", [None, [], "llama", 7])
def test_hf_config_text_config_of_the_wrong_shape(tmp_path, text_config):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"model_type": "x", "text_config": text_config}))
    r = run_cli("resolve", "--simulate", "v6e", "--hf-config", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "internal error" not in r.stderr
    if text_config is None:
        assert "num_attention_heads: missing or not a number" in r.stderr
    else:
        assert f"{f}: text_config: is not a JSON object" in r.stderr


def test_text_config_is_read_when_the_heads_live_there(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(
        json.dumps(
            {"text_config": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128}}
        )
    )
    w = Workload.from_hf_config(f)
    assert (w.num_q_heads, w.num_kv_heads, w.head_dim) == (8, 2, 128)


def test_version():
    r = run_cli("--version")
    assert (r.returncode, r.stdout.strip()) == (
        0,
        f"tpu-registry {metadata.version('tpu-registry')}",
    )


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """A detector that blocks keeps the command busy; SIGINT then ends it with one line."""
    plugin = tmp_path / "slowdetector.py"
    plugin.write_text(
        "import time, tpu_registry\n"
        "@tpu_registry.hookimpl\n"
        "def tpu_registry_detect(context):\n"
        "    time.sleep(60)\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import slowdetector\n"
        "from tpu_registry.plugins import get_plugins\n"
        "get_plugins().register(slowdetector, 'slow')\n"
        "from tpu_registry import cli\n"
        "print('ready', flush=True)\n"
        "sys.exit(cli.main(['detect']))\n"
    )
    env = {**os.environ, "TPU_REGISTRY_DETECT_TIMEOUT": "60"}
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, (out, err)
    assert err.strip() == "interrupted" and "Traceback" not in err
    assert os.path.exists(cli_path())  # the console script is the same entry (cli.main)


def test_reconcile_counts_a_suffix_only_in_ascii():
    cat = load_catalog()
    d = reconcile(
        cat,
        [
            Evidence(
                "accelerator_type", "v6e-٨", "test", count=None, count_unit="suffix", scope="slice"
            )
        ],
    )
    assert d.generation == "v6e" and d.slice_chips is None
