"""CONTRIBUTING.md 'Write a detector plugin', followed literally.

The commands are taken from the section's ``sh`` blocks and run (with /tmp/gce-md moved into
tmp_path and PORT filled in); the snippets, the kind table and the expected JSON are checked
against the plugin, ``detect.PRIORITY`` and the actual output. If the section changes, this
test must change with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import selectors
import shlex
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from conftest import REPO, run_cli

from tpu_registry.detection import DEFAULT_TIMEOUT_S, ENV_TIMEOUT, KINDS, PRIORITY

PLUGIN = REPO / "plugins" / "tpu-registry-gce"

# The commands of the walkthrough, in order. The test below runs exactly these.
COMMANDS = [
    "pip install -e plugins/tpu-registry-gce",
    "tpu-registry plugins",
    "mkdir -p /tmp/gce-md",
    "printf 'v5p-8' > /tmp/gce-md/accelerator-type",
    "printf \"CHIPS_PER_HOST_BOUNDS: '2,2,1'\\nTOPOLOGY: '2x2x1'\\n\" > /tmp/gce-md/tpu-env",
    "printf 'projects/1/machineTypes/ct5p-hightpu-4t' > /tmp/gce-md/machine-type",
    "python -m http.server --bind 127.0.0.1 --directory /tmp/gce-md 0 &",
    "TPU_REGISTRY_GCE=1 TPU_REGISTRY_GCE_URL=http://127.0.0.1:PORT/ tpu-registry detect --json",
    "kill %1",
]


def section() -> str:
    doc = (REPO / "CONTRIBUTING.md").read_text()
    return doc.split("<!-- section: detector-plugin -->")[1].split("<!-- end: detector-plugin -->")[
        0
    ]


def blocks(lang: str) -> list[list[str]]:
    """The fenced blocks of the section whose info string is ``lang``, dedented, as lines."""
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", section(), re.M | re.S):
        indent, info, body = m.groups()
        if info == lang:
            out.append(
                [
                    line[len(indent) :] if line.startswith(indent) else line
                    for line in body.splitlines()
                ]
            )
    return out


def sh_commands() -> list[str]:
    return [
        line.strip()
        for block in blocks("sh")
        for line in block
        if line.strip() and not line.strip().startswith("#")
    ]


def plugin_installed() -> bool:
    return importlib.util.find_spec("tpu_registry_gce") is not None and any(
        ep.name == "gce" for ep in entry_points(group="tpu_registry")
    )


def wait_for_port(proc: subprocess.Popen, timeout_s: float = 15.0) -> int:
    """Read `Serving HTTP on 127.0.0.1 port N` from the server's stdout, within a deadline."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    seen = ""
    while (left := deadline - time.monotonic()) > 0:
        if not sel.select(left):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if m := re.search(r"Serving HTTP on 127\.0\.0\.1 port (\d+)", line):
            return int(m.group(1))
    raise AssertionError(f"http.server did not report its port within {timeout_s} s: {seen!r}")


def test_walkthrough_commands_are_the_tested_ones():
    assert sh_commands() == COMMANDS


def test_contributing_detector_plugin_walkthrough(tmp_path):
    cmds = iter(sh_commands())

    # Step 6: install the plugin (only when this environment does not have it yet).
    words = shlex.split(next(cmds))
    assert words[:3] == ["pip", "install", "-e"]
    path = REPO / words[3]
    assert path == PLUGIN and (path / "pyproject.toml").is_file()
    if not plugin_installed():
        r = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
    # The plugin the CLI will load is this checkout's (a fresh process sees a new install).
    r = subprocess.run(
        [sys.executable, "-c", "import tpu_registry_gce; print(tpu_registry_gce.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == PLUGIN / "tpu_registry_gce" / "__init__.py"
    assert shlex.split(next(cmds)) == ["tpu-registry", "plugins"]
    r = run_cli("plugins")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^gce\s+entry point\s+tpu-registry-gce\s", r.stdout, re.M), r.stdout
    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "--json").stdout)["plugins"]}
    assert listed["gce"]["distribution"] == "tpu-registry-gce"
    assert listed["gce"]["kind"] == "entry point" and listed["gce"]["hooks"] == [
        "tpu_registry_detect",
        "tpu_registry_settings",
    ]

    # Step 7: the metadata keys as files, served on 127.0.0.1.
    md = tmp_path / "gce-md"
    for _ in range(4):
        line = next(cmds)
        assert line.startswith(("mkdir ", "printf ")) and "/tmp/gce-md" in line
        subprocess.run(["bash", "-c", line.replace("/tmp/gce-md", str(md))], check=True, timeout=30)
    assert (md / "accelerator-type").read_text() == "v5p-8"
    assert (md / "tpu-env").read_text() == "CHIPS_PER_HOST_BOUNDS: '2,2,1'\nTOPOLOGY: '2x2x1'\n"
    assert (md / "machine-type").read_text() == "projects/1/machineTypes/ct5p-hightpu-4t"

    line = next(cmds)
    assert line.endswith(" &")
    words = shlex.split(line[:-2])
    assert (
        words[0] == "python"
        and words[-1] == "0"
        and words[words.index("--bind") + 1] == "127.0.0.1"
    )
    argv = [sys.executable, *(str(md) if w == "/tmp/gce-md" else w for w in words[1:])]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = wait_for_port(server)

        words = shlex.split(next(cmds))
        env = dict(w.split("=", 1) for w in words[:2])
        assert (
            list(env) == ["TPU_REGISTRY_GCE", "TPU_REGISTRY_GCE_URL"] and words[2] == "tpu-registry"
        )
        env = {k: v.replace("PORT", str(port)) for k, v in env.items()}
        r = run_cli(*words[3:], env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)

        # What the section says the answer is: each top-level line of its json block.
        [shown] = blocks("json")
        for text in shown:
            if (text := text.strip().rstrip(",")) not in ("{", "}", "..."):
                key, value = next(iter(json.loads("{" + text + "}").items()))
                assert out[key] == value, key
        assert out["faults"] == [] and out["conflicts"] == []
        assert [(e["detector"], e["kind"], e["value"], e["status"]) for e in out["evidence"]] == [
            ("gce", "accelerator_type", "v5p-8", "decides"),
            ("gce", "machine_type", "ct5p-hightpu-4t", "agrees"),
            ("gce", "topology", "2,2,1", "info"),
            ("gce", "topology", "2x2x1", "info"),
        ]
        requests = log_requests(tmp_path / "server.log")
        assert requests == ["GET /accelerator-type", "GET /tpu-env", "GET /machine-type"]

        # "Without TPU_REGISTRY_GCE=1 the plugin sends nothing and the answer is 'no TPU'."
        off = json.loads(
            run_cli(
                "detect", "--json", env={"TPU_REGISTRY_GCE_URL": env["TPU_REGISTRY_GCE_URL"]}
            ).stdout
        )
        assert off["generation"] is None and off["status"] == "none" and off["faults"] == []
        assert log_requests(tmp_path / "server.log") == requests
    finally:
        server.terminate()
        server.wait(timeout=15)
        log.close()
    assert next(cmds) == "kill %1"

    # "With the server stopped, faults holds gce: raised MetadataError: ...ConnectionRefusedError"
    stopped = json.loads(run_cli("detect", "--json", env=env).stdout)
    assert stopped["generation"] is None
    [fault] = stopped["faults"]
    assert fault["plugin"] == "gce"
    assert (
        fault["message"].startswith("raised MetadataError: ")
        and "ConnectionRefusedError" in fault["message"]
    )
    assert next(cmds, None) is None


def log_requests(path: Path) -> list[str]:
    return re.findall(r'"(GET \S+) HTTP', path.read_text())


def test_walkthrough_snippets_match_the_plugin():
    text = section()
    # Step 1: the layout.
    [tree] = blocks("")
    assert tree[0].strip() == "plugins/tpu-registry-gce/"
    for line in tree[1:]:
        name = line.split("#")[0].strip()
        assert (PLUGIN / name).exists(), name
    # Step 2: the pyproject of one's own project is the example's with its own names: each
    # line, names swapped, is in the real pyproject.toml (tests/test_walkthroughs.py builds
    # and installs it).
    real = {line.strip() for line in (PLUGIN / "pyproject.toml").read_text().splitlines()}
    [toml] = blocks("toml")
    assert "[project.entry-points.tpu_registry]" in toml and 'my_detector = "my_detector"' in toml
    assert 'gce = "tpu_registry_gce"' in text
    for line in filter(str.strip, toml):
        line = line.replace('my_detector = "my_detector"', 'gce = "tpu_registry_gce"')
        line = line.replace("my-detector", "tpu-registry-gce").replace(
            "my_detector", "tpu_registry_gce"
        )
        assert line.strip() in real, line
    # Step 3: every line of the hook excerpt (but the elisions) is in the real module.
    source = {
        line.strip()
        for line in (PLUGIN / "tpu_registry_gce" / "__init__.py").read_text().splitlines()
    }
    [py] = [b for b in blocks("python") if any("fetch(" in line for line in b)]
    assert "@tpu_registry.hookimpl" in py
    for line in filter(str.strip, py):
        if line.strip() != "...":
            assert line.strip() in source, line
    # Step 5: the numbers and names the rules quote (read from the checkout, installed or not).
    spec = importlib.util.spec_from_file_location(
        "_gce_walkthrough", PLUGIN / "tpu_registry_gce" / "__init__.py"
    )
    gce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gce)
    assert gce.DEFAULT_TIMEOUT_S == 0.5 and "(0.5 s, `TPU_REGISTRY_GCE_TIMEOUT`)" in text
    assert gce.MAX_BYTES == 64 * 1024 and "64 KiB" in text
    assert DEFAULT_TIMEOUT_S == 2 and f"(2 s, `{ENV_TIMEOUT}`)" in text


def test_walkthrough_kind_table_matches_the_core():
    rows = re.findall(r"^\s*\| `(\w+)` \| (.+?) \| (\d+) \|$", section(), re.M)
    assert {kind: int(trust) for kind, _, trust in rows} == PRIORITY
    assert [kind for kind, _, _ in rows] == list(KINDS)  # most trusted first
    quoted = re.search(r"`(accelerator_types = \[.*?\])`", section()).group(1)
    assert quoted in (REPO / "hardware" / "v5p.toml").read_text()
