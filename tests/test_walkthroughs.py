"""CONTRIBUTING.md followed from fresh temporary projects, packaging included, and the plugin
tests run with a user's own policy plugin visible (issue 15).

The projects are built from the blocks of CONTRIBUTING.md itself and installed with pip into
a folder on PYTHONPATH (``pip install --target``), so the test venv is left untouched. There
is no network: pip builds without isolation, with the build backend the walkthrough's
``[build-system]`` names (hatchling, a test extra). Marked ``slow``: they run once, in the
Python 3.11 suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HARDWARE, REPO, SHAPE, run_cli
from test_catalog import v9x_from_v6e

pytestmark = pytest.mark.slow

DOC = (REPO / "CONTRIBUTING.md").read_text()


def section(name: str) -> str:
    return DOC.split(f"<!-- section: {name} -->")[1].split(f"<!-- end: {name} -->")[0]


def fenced(text: str, lang: str) -> list[str]:
    """The fenced blocks of ``text`` with info string ``lang``, dedented."""
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S):
        indent, info, body = m.groups()
        if info == lang:
            out.append(
                "\n".join(
                    line[len(indent) :] if line.startswith(indent) else line
                    for line in body.splitlines()
                )
                + "\n"
            )
    return out


def pip_install(project: Path, target: Path) -> None:
    """`pip install .` in ``project``, into ``target`` (offline: no index, no isolation)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            ".",
        ],
        capture_output=True,
        text=True,
        cwd=project,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr


def visible(target: Path) -> dict:
    """Environment in which ``target`` is installed: on PYTHONPATH, nothing blocked."""
    env = {"PYTHONPATH": str(target), "TPU_REGISTRY_DISABLE_PLUGINS": ""}
    return env


def test_detector_walkthrough_from_a_fresh_project(tmp_path):
    text = section("detector-plugin")
    pyproject = next(b for b in fenced(text, "toml") if "[build-system]" in b)
    module = next(b for b in fenced(text, "python") if b.startswith("# my_detector/__init__.py"))
    project = tmp_path / "my-detector"
    (project / "my_detector").mkdir(parents=True)
    (project / "pyproject.toml").write_text(pyproject)
    (project / "my_detector" / "__init__.py").write_text(module)
    target = tmp_path / "site"
    pip_install(project, target)
    assert list(target.glob("my_detector-0.1.0.dist-info"))

    # "the my_detector row says my-detector"
    r = run_cli("plugins", "--json", env=visible(target))
    assert r.returncode == 0, r.stderr
    row = next(p for p in json.loads(r.stdout)["plugins"] if p["name"] == "my_detector")
    assert (row["kind"], row["distribution"], row["hooks"]) == (
        "entry point",
        "my-detector",
        ["tpu_registry_detect"],
    )
    # "MY_SITE_TPU=v5p-8 tpu-registry detect then names v5p from detector my_detector"
    assert "`MY_SITE_TPU=v5p-8 tpu-registry detect`" in text
    r = run_cli("detect", "--json", env={**visible(target), "MY_SITE_TPU": "v5p-8"})
    d = json.loads(r.stdout)
    assert (r.returncode, d["generation"], d["status"], d["slice_chips"]) == (
        0,
        "v5p",
        "detected",
        4,
    )
    assert [(e["detector"], e["value"]) for e in d["evidence"]] == [("my_detector", "v5p-8")]


def test_tuning_policy_walkthrough_from_a_fresh_project(tmp_path):
    text = section("tuning-policy")
    module = next(b for b in fenced(text, "python") if b.startswith("# my_policy.py"))
    pyproject = next(b for b in fenced(text, "toml") if "[build-system]" in b)
    project = tmp_path / "my-policy"
    project.mkdir()
    (project / "my_policy.py").write_text(module)
    (project / "pyproject.toml").write_text(pyproject)
    target = tmp_path / "site"
    pip_install(project, target)
    env = visible(target)

    row = next(
        p
        for p in json.loads(run_cli("plugins", "--json", env=env).stdout)["plugins"]
        if p["name"] == "my_policy"
    )
    assert (row["kind"], row["distribution"]) == ("entry point", "my-policy")
    command = (
        "tpu-registry resolve --simulate v6e --heads 32 --kv-heads 8 --head-dim 128 "
        "--max-model-len 32768"
    )
    assert f"`{command}`" in text
    r = run_cli(*command.split()[1:], "--json", env=env)
    knobs = json.loads(r.stdout)["knobs"]
    assert (knobs["page_size"]["value"], knobs["page_size"]["layer"]) == (128, "my-policy")
    r = run_cli(*command.split()[1:], "--explain", env=env)
    assert "derived from page_size [my-policy]" in r.stdout


def test_add_a_generation_step_5_in_a_copy_of_the_checkout(tmp_path):
    """Step 5: a file added to hardware/ passes the catalog tests (they read the ids from the
    folder). The copy holds the tracked files of this checkout; `make test` itself would
    rebuild the shared integration environments, so the catalog tests step 5 names run."""
    text = section("add-generation")
    assert "run `make test`" in text and "`tests/test_catalog.py`" in text
    files = (
        subprocess.run(
            ["git", "ls-files", "-z"], capture_output=True, cwd=REPO, check=True, timeout=60
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path / "checkout"
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / name)
    (copy / "hardware" / "v9x.toml").write_text(v9x_from_v6e((HARDWARE / "v6e.toml").read_text()))
    # "add a row for each": the identifiers of the new file, as step 5 says.
    assert "`IDENTIFIERS` table of `tests/test_detect.py`" in " ".join(text.split())
    detect_tests = copy / "tests" / "test_detect.py"
    last = '    ("torch_xla_version", "7", None, "chips", "tpu7x", None, None),\n]'
    rows = (
        '    ("device_kind", "TPU v9x", 8, "devices", "v9x", 8, None),\n'
        '    ("accelerator_type", "v9x-8", 8, "suffix", "v9x", 8, 8),\n'
        '    ("gke_accelerator", "tpu-v9x-slice", None, "chips", "v9x", None, None),\n'
        '    ("pci", "1ae0:0999", 8, "chips", "v9x", 8, None),\n'
    )
    source = detect_tests.read_text()
    assert last in source
    detect_tests.write_text(source.replace(last, last[:-1] + rows + "]"))
    env = {**os.environ, "PYTHONPATH": str(copy), "TPU_REGISTRY_CACHE_DIR": "off"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_catalog.py",
            "tests/test_detect.py",
            "tests/test_packaging.py::test_source_checkout_without_install",
        ],
        capture_output=True,
        text=True,
        cwd=copy,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    probe = subprocess.run(
        [sys.executable, "-c", "import tpu_registry; print(tpu_registry.load_catalog().ids())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert "'v9x'" in probe.stdout, probe.stderr


POLICY = '''import tpu_registry
from tpu_registry import Layer


@tpu_registry.hookimpl
def tpu_registry_tune(spec, workload):
    """A user's own policy, installed beside tpu-registry: larger pages on v6e."""
    if spec.id != "v6e" or workload.max_model_len < 4096:
        return None
    return Layer("site-policy", {"page_size": 128})
'''
PLUGIN_TESTS = [
    "tests/test_faulty_plugins.py",
    "tests/test_tune.py",
    "tests/test_hooks_doc.py",
    "tests/test_settings.py",
    "plugins/tpu-registry-gce/tests",
]


def test_plugin_tests_pass_with_a_users_policy_plugin_visible(tmp_path):
    """A third-party policy (a ``*.dist-info`` with its entry point, on PYTHONPATH in a
    temporary folder) is really loaded and changes answers, and the core suite's plugin tests
    still pass beside it; the test venv is not touched."""
    site = tmp_path / "site"
    info = site / "site_policy_x-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "site_policy_x.py").write_text(POLICY)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: site-policy-x\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tpu_registry]\nsite_policy = site_policy_x\n")
    env = {"PYTHONPATH": str(site), "TPU_REGISTRY_DISABLE_PLUGINS": ""}
    listed = json.loads(run_cli("plugins", "--json", env=env).stdout)["plugins"]
    assert ("site_policy", "site-policy-x") in {(p["name"], p["distribution"]) for p in listed}
    r = run_cli(
        "resolve",
        "--simulate",
        "v6e",
        *SHAPE,
        "--max-model-len",
        "8192",
        "--json",
        env=env,
    )
    assert json.loads(r.stdout)["knobs"]["page_size"]["layer"] == "site-policy"

    full = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    full.update(PYTHONPATH=str(site), TPU_REGISTRY_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PLUGIN_TESTS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout) and " failed" not in r.stdout
