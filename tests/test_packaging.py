"""hardware/ is found the same way from a wheel install, an editable install and a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from conftest import HARDWARE, REPO

PROBE = (
    "import json, tpu_registry, tpu_registry.catalog as c; cat = c.load_catalog(); "
    "print(json.dumps({'file': tpu_registry.__file__, 'dir': str(c.builtin_hardware_dir()), "
    "'ids': cat.ids()}))"
)


def _probe(env: dict, cwd) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("tpu_registry-*.whl")
    return whl


# One generation per file of hardware/ (a file added there is picked up).
N_FILES = len(list(HARDWARE.glob("*.toml")))


def test_wheel_ships_the_catalog(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(
        n.split("/")[-1]
        for n in names
        if n.startswith("tpu_registry/hardware/") and n.endswith(".toml")
    )
    expected = [
        p.name for sub in ("", "tuning", "unsupported") for p in (HARDWARE / sub).glob("*.toml")
    ]
    assert shipped == sorted(expected)


def test_wheel_install_finds_its_packaged_catalog(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    got = _probe(env, tmp_path)
    assert got["file"].startswith(str(target))
    assert got["dir"] == str(target / "tpu_registry" / "hardware")
    assert len(got["ids"]) == N_FILES


def test_editable_install_reads_the_checkout(tmp_path):
    # This test environment is an editable install (make test): the checkout's files win.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = _probe(env, tmp_path)
    assert got["dir"] == str(HARDWARE) and len(got["ids"]) == N_FILES


def test_source_checkout_without_install(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    got = _probe(env, tmp_path)
    assert got["file"] == str(REPO / "tpu_registry" / "__init__.py")
    assert got["dir"] == str(HARDWARE) and len(got["ids"]) == N_FILES


def test_mutation_testing_work_folder_is_not_packaged(tmp_path):
    """`make mutate` leaves a copy of tpu_registry/ and tests/ in mutants/; neither the sdist
    nor the wheel may pick it up (the sdist's include patterns would match it)."""
    root = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("tpu_registry", "hardware", "tests"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "CONTRIBUTING.md", "SECURITY.md"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(root / "tpu_registry", root / "mutants" / "tpu_registry")
    out = tmp_path / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (sdist,) = out.glob("*.tar.gz")
    (whl,) = out.glob("*.whl")
    with tarfile.open(sdist) as t:
        sdist_names = t.getnames()
    wheel_names = zipfile.ZipFile(whl).namelist()
    assert any(n.endswith("tpu_registry/kernels.py") for n in sdist_names)
    assert "tpu_registry/kernels.py" in wheel_names
    assert [n for n in sdist_names + wheel_names if "mutants" in n] == []
