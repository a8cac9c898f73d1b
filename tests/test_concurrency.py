"""Concurrency (issue 7): resolve() under threads, across fork, and as the environment changes.

Real components throughout: the computation is counted by wrapping ``resolve._compute`` (the
wrapper calls the real one) and by a test policy registered on the real plugin manager.
Caches are cleared around every test by conftest's autouse fixture; monkeypatch restores the
environment.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import threading
import time

import pytest

import tpu_registry
from tpu_registry import Layer, Workload
from tpu_registry.plugins import get_plugin_manager

resolve_mod = importlib.import_module("tpu_registry.resolution")
resolve = resolve_mod.resolve
plugins_mod = importlib.import_module("tpu_registry.plugins")

WORKLOAD = Workload(num_q_heads=32, num_kv_heads=8, head_dim=128, max_model_len=4096)
N_THREADS = 32

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def counted(monkeypatch):
    """Counts real computations: resolve._compute wrapped, and a slow test policy's calls."""
    counts = {"compute": 0, "policy": 0}
    lock = threading.Lock()
    real = resolve_mod._compute

    def compute(*args, **kwargs):
        with lock:
            counts["compute"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(resolve_mod, "_compute", compute)

    class SlowCountingPolicy:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            with lock:
                counts["policy"] += 1
            time.sleep(0.02)  # widen the window in which the 32 threads overlap
            return None

    pm = get_plugin_manager()
    pm.register(SlowCountingPolicy(), name="counting")
    yield counts
    if get_plugin_manager().has_plugin("counting"):
        get_plugin_manager().unregister(name="counting")


def _together(n: int, fn):
    """Run fn(i) in n threads released at the same instant; return results in order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, errors
    return results


def test_32_threads_same_arguments_one_computation(counted):
    results = _together(N_THREADS, lambda i: resolve(WORKLOAD, simulate="v6e"))
    assert counted["compute"] == 1
    assert counted["policy"] >= 1
    first = results[0]
    assert all(r is first for r in results), "every thread gets the one cached result"
    assert first.generation == "v6e" and first.value("page_size") == 256
    # A later call is a cache hit: no computation, same object.
    assert resolve(WORKLOAD, simulate="v6e") is first
    assert counted["compute"] == 1


def test_32_threads_equal_arguments_built_separately(counted):
    """Equal (not identical) arguments, including a workload given as a mapping."""
    shapes = [WORKLOAD, Workload(32, 8, 128, max_model_len=4096), WORKLOAD.to_dict()]
    results = _together(N_THREADS, lambda i: resolve(shapes[i % 3], simulate="v6e"))
    assert counted["compute"] == 1
    assert len({id(r) for r in results}) == 1


def test_32_threads_four_different_workloads(counted):
    workloads = [Workload(32, 8, 128, max_model_len=n) for n in (1024, 2048, 4096, 16384)]
    results = _together(N_THREADS, lambda i: resolve(workloads[i % 4], simulate="v6e"))
    assert counted["compute"] == 4
    for i, r in enumerate(results):
        assert r is results[i % 4]
        assert r.workload == workloads[i % 4]
    # Each equals a fresh sequential computation of the same arguments.
    fresh = {}
    for w in workloads:
        resolve_mod._cache.clear()
        fresh[w] = resolve(w, simulate="v6e").to_dict()
    assert all(r.to_dict() == fresh[r.workload] for r in results)


def test_errors_are_not_cached_and_threads_all_see_them(counted):
    """A failing resolve (no TPU) raises the same error in every thread and caches nothing."""
    from tpu_registry.errors import DetectionError

    def call(i):
        try:
            resolve(WORKLOAD)
        except DetectionError as e:
            return str(e)
        return None

    results = _together(N_THREADS, call)
    assert len(set(results)) == 1 and results[0].startswith(
        "detection: cannot resolve: no TPU was found"
    )
    assert counted["compute"] == N_THREADS  # nothing to share: each call tries again
    assert not resolve_mod._cache


# ---------------------------------------------------------------------------------------------
# fork
# ---------------------------------------------------------------------------------------------


def _in_child(fn, timeout: float = 30.0) -> dict:
    """Fork; the child runs fn() and writes its JSON result to a pipe, then os._exit. The
    parent waits at most ``timeout`` seconds (a child stuck on a lock fails the test)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            data = json.dumps(fn()).encode()
        except BaseException as e:  # noqa: BLE001
            data = json.dumps({"child_error": f"{type(e).__name__}: {e}"}).encode()
            code = 1
        try:
            os.write(w, data)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the forked child gave no answer within {timeout:g} s (deadlocked?)")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b"{}")
    assert "child_error" not in out, out
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return out


@needs_fork
def test_fork_after_resolve_child_gets_the_right_answer():
    parent = resolve(WORKLOAD, simulate="v6e")

    def child():
        same = resolve(WORKLOAD, simulate="v6e").to_dict()
        other = resolve(Workload(8, 1, 64, max_model_len=1024), simulate="v5e").to_dict()
        return {"same": same, "other": other}

    out = _in_child(child)
    assert out["same"] == json.loads(json.dumps(parent.to_dict()))
    resolve_mod._cache.clear()
    expected_other = resolve(Workload(8, 1, 64, max_model_len=1024), simulate="v5e").to_dict()
    assert out["other"] == json.loads(json.dumps(expected_other))


@needs_fork
def test_fork_while_another_thread_is_resolving(counted):
    """The child of a fork taken while a thread holds resolve's lock (mid-computation) must
    not inherit the held lock."""
    parent_pid = os.getpid()
    inside, release = threading.Event(), threading.Event()

    class Blocker:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            if os.getpid() == parent_pid and workload.max_model_len == 8192:
                inside.set()
                release.wait(30)
            return None

    get_plugin_manager().register(Blocker(), name="blocker")
    t = threading.Thread(
        target=resolve, args=(Workload(32, 8, 128, max_model_len=8192),), kwargs={"simulate": "v6e"}
    )
    t.start()
    try:
        assert inside.wait(30)
        out = _in_child(lambda: resolve(WORKLOAD, simulate="v6e").to_dict(), timeout=20)
        assert out["generation"] == "v6e" and out["knobs"]["page_size"]["value"] == 256
    finally:
        release.set()
        t.join(30)
        get_plugin_manager().unregister(name="blocker")


LOCKS = {
    "plugins": lambda: plugins_mod._lock,  # held while a thread builds the plugin manager
    "catalog": lambda: (
        importlib.import_module("tpu_registry.catalog")._lock
    ),  # held around the catalog cache
    "resolve": lambda: resolve_mod._lock,  # held while a thread computes a result
}


@needs_fork
@pytest.mark.parametrize("which", sorted(LOCKS))
def test_fork_while_another_thread_holds_a_registry_lock(which):
    """Each module lock a resolve() takes may be held by another thread at the moment of a
    fork (a server warming up in a thread while it forks workers); the child must not
    inherit it held. The lock is held here by a helper thread, as the module's own code holds
    it. (A thread that is *importing* a module at the fork leaves Python's per-module import
    lock held in the child: no library can undo that, so that case is not tested.)"""
    get_plugin_manager()  # built (and modules imported) before the fork
    held, release = threading.Event(), threading.Event()
    lock = LOCKS[which]()

    def hold():
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(10)
        out = _in_child(lambda: resolve(WORKLOAD, simulate="v6e").to_dict(), timeout=20)
        assert out["generation"] == "v6e" and out["knobs"]["page_size"]["value"] == 256
    finally:
        release.set()
        holder.join(10)


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------


def test_changing_the_generation_variable_changes_the_next_answer(monkeypatch, counted):
    monkeypatch.setenv("TPU_REGISTRY_GENERATION", "v6e")
    first = resolve(WORKLOAD)
    assert (first.generation, first.detection.status) == ("v6e", "explicit")
    assert resolve(WORKLOAD) is first
    monkeypatch.setenv("TPU_REGISTRY_GENERATION", "v5e")
    second = resolve(WORKLOAD)
    assert second.generation == "v5e"
    monkeypatch.setenv("TPU_REGISTRY_GENERATION", "v6e")
    assert resolve(WORKLOAD) is first  # back to a cached answer
    assert counted["compute"] == 2


def test_changing_the_overrides_variable_changes_the_next_answer(monkeypatch, tmp_path):
    path = tmp_path / "overrides.toml"
    path.write_text(
        'schema_version = 1\n\n[[override]]\ngeneration = "*"\nknobs = { page_size = 64 }\n'
    )
    base = resolve(WORKLOAD, simulate="v6e")
    assert (base.value("page_size"), base.layer("page_size")) == (256, "baseline")
    monkeypatch.setenv("TPU_REGISTRY_OVERRIDES", str(path))
    over = resolve(WORKLOAD, simulate="v6e")
    assert (over.value("page_size"), over.layer("page_size")) == (64, "overrides")
    monkeypatch.delenv("TPU_REGISTRY_OVERRIDES")
    assert resolve(WORKLOAD, simulate="v6e") is base


def test_changing_detection_variables_changes_the_next_answer(monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    assert resolve(WORKLOAD).generation == "v5p"
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-8")
    assert resolve(WORKLOAD).generation == "v6e"


def test_environment_changes_while_threads_resolve(monkeypatch):
    """Threads resolving while the variable flips see one answer or the other, never a mix."""
    answers = {
        "v6e": resolve(WORKLOAD, simulate="v6e").to_dict(),
        "v5e": resolve(WORKLOAD, simulate="v5e").to_dict(),
    }
    for a in answers.values():
        a["detection"] = None  # explicit vs simulated differ; compare the rest
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for g in ("v6e", "v5e"):
                os.environ["TPU_REGISTRY_GENERATION"] = g
                time.sleep(0.001)

    monkeypatch.setenv("TPU_REGISTRY_GENERATION", "v6e")
    flipper = threading.Thread(target=flip)
    flipper.start()
    try:

        def call(i):
            out = []
            for _ in range(20):
                d = resolve(WORKLOAD).to_dict()
                d["detection"] = None
                out.append(d)
            return out

        results = [d for ds in _together(16, call) for d in ds]
    finally:
        stop.set()
        flipper.join()
    assert all(d in answers.values() for d in results)


def test_policy_registered_after_a_warm_call_needs_a_reset():
    """resolve() caches on arguments and environment, not on the plugin set: installing a
    plugin at run time takes effect after plugins.reset()/clear_cache() (documented)."""
    assert resolve(WORKLOAD, simulate="v6e").value("page_size") == 256

    class Small:
        @tpu_registry.hookimpl
        def tpu_registry_tune(self, spec, workload, detection):
            return Layer("small", {"page_size": 32})

    resolve_mod._cache.clear()
    get_plugin_manager().register(Small(), name="small")
    try:
        assert resolve(WORKLOAD, simulate="v6e").layer("page_size") == "small"
    finally:
        get_plugin_manager().unregister(name="small")
