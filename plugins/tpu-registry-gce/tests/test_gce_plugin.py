"""The GCE plugin against a real HTTP server on 127.0.0.1.

The fake metadata server and the fixtures live here, not in a conftest.py: the core suite's
tests import helpers with ``from conftest import ...``, and a second conftest module collected
in the same run would shadow it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points

import pytest
import tpu_registry_gce as gce

from tpu_registry.detection import DetectContext, Evidence, detect
from tpu_registry.errors import DetectionError

# ---------------------------------------------------------------------------------------------
# A fake GCE metadata server (a real ThreadingHTTPServer on 127.0.0.1:0)
# ---------------------------------------------------------------------------------------------

PREFIX = "/computeMetadata/v1/instance/attributes/"


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    drip: float = 0.0  # if set: send the body one byte per `drip` seconds
    content_length: bool = True


class FakeMetadata:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}{PREFIX}"
        self.routes: dict[str, Route] = {}
        self.hits: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()  # set at teardown: wakes sleeping handlers

    def serve(self, key: str, body: str | bytes, **kw) -> None:
        """Serve ``body`` at ``PREFIX + key`` (or at ``key`` itself when it starts with /)."""
        path = key if key.startswith("/") else PREFIX + key
        self.routes[path] = Route(body.encode() if isinstance(body, str) else body, **kw)

    def path(self, key: str) -> str:
        return PREFIX + key

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.hits]


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        fake: FakeMetadata = self.server.fake  # type: ignore[attr-defined]
        fake.hits.append((self.path, dict(self.headers)))
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._plain(403, b"Missing Metadata-Flavor:Google header.\n")
        route = fake.routes.get(self.path)
        if route is None:
            return self._plain(404, b"not found\n")
        if route.delay and fake.stop.wait(route.delay):
            return
        self.send_response(route.status)
        for k, v in route.headers.items():
            self.send_header(k, v)
        if route.content_length:
            self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        try:
            if not route.drip:
                self.wfile.write(route.body)
                return
            for i in range(len(route.body)):  # bounded by the body; stops at teardown
                self.wfile.write(route.body[i : i + 1])
                self.wfile.flush()
                if fake.stop.wait(route.drip):
                    return
        except OSError:
            pass  # the client gave up: expected in the timeout tests

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def metadata_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake = FakeMetadata(server.server_address[1])
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        fake.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def clean_plugin_env(monkeypatch):
    """No plugin settings inherited from the machine; a fresh plugin manager per test."""
    from tpu_registry.plugins import reset

    for name in list(os.environ):
        if name.startswith("TPU_"):
            monkeypatch.delenv(name, raising=False)
    reset()
    yield
    reset()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

TPU_ENV = """\
ACCELERATOR_TYPE: 'v5p-8'
CHIPS_PER_HOST_BOUNDS: '2,2,1'
HOST_BOUNDS: '1,1,1'
TOPOLOGY: '2x2x1'
WORKER_ID: '0'
ZONE: 'us-east5-a'
MEGASCALE_COORDINATOR_ADDRESS: '10.0.0.2:8080'
"""


def ctx(server, **env: str) -> DetectContext:
    return DetectContext(env={"TPU_REGISTRY_GCE": "1", "TPU_REGISTRY_GCE_URL": server.url, **env})


def core_env(server, **env: str) -> dict[str, str]:
    """An environment for detect(): the plugin on, no real sysfs."""
    return {
        "TPU_REGISTRY_GCE": "1",
        "TPU_REGISTRY_GCE_URL": server.url,
        "TPU_REGISTRY_SYSFS_ROOT": "/nonexistent-sysfs-root",
        **env,
    }


# --- evidence ------------------------------------------------------------------------------


def test_evidence_from_accelerator_type_and_tpu_env(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8\n")
    metadata_server.serve("tpu-env", TPU_ENV)
    assert gce.tpu_registry_detect(ctx(metadata_server)) == [
        Evidence(
            "accelerator_type",
            "v5p-8",
            "gce metadata accelerator-type",
            count=8,
            count_unit="suffix",
            scope="slice",
        ),
        Evidence(
            "topology", "2,2,1", "gce metadata tpu-env CHIPS_PER_HOST_BOUNDS", count=4, scope="host"
        ),
        Evidence(
            "topology",
            "2x2x1",
            "gce metadata tpu-env TOPOLOGY",
            count=4,
            scope="slice",
            topology="2x2x1",
        ),
        Evidence(
            "topology",
            "1,1,1",
            "gce metadata tpu-env HOST_BOUNDS",
            count=1,
            count_unit="hosts",
            scope="slice",
        ),
    ]
    assert sorted(metadata_server.paths) == sorted(
        [
            metadata_server.path("accelerator-type"),
            metadata_server.path("tpu-env"),
            "/computeMetadata/v1/instance/machine-type",
        ]
    )


def test_tpu_env_accelerator_type_used_when_key_absent(metadata_server):
    metadata_server.serve("tpu-env", "ACCELERATOR_TYPE: 'v6e-4'\n")  # accelerator-type: 404
    assert gce.tpu_registry_detect(ctx(metadata_server)) == [
        Evidence(
            "accelerator_type",
            "v6e-4",
            "gce metadata tpu-env ACCELERATOR_TYPE",
            count=4,
            count_unit="suffix",
            scope="slice",
        ),
    ]


def test_accelerator_type_key_wins_over_tpu_env(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8")
    metadata_server.serve("tpu-env", "ACCELERATOR_TYPE: 'v4-8'\n")
    [ev] = gce.tpu_registry_detect(ctx(metadata_server))
    assert (ev.value, ev.source) == ("v5p-8", "gce metadata accelerator-type")


def test_both_keys_absent_is_no_evidence(metadata_server):
    assert gce.tpu_registry_detect(ctx(metadata_server)) is None
    assert len(metadata_server.hits) == 3  # asked, got 404 three times, no error


def test_parse_tpu_env():
    assert gce.parse_tpu_env(
        "A: 'x'\nB: \"y\"\n\n# comment: no\nC: z\nD: '1.2.3.4:80'\nnot a pair\n"
    ) == {"A": "x", "B": "y", "C": "z", "D": "1.2.3.4:80"}


@pytest.mark.parametrize(
    ("shape", "count"),
    [("2,2,1", 4), ("2x4", 8), ("4x4x4", 64), ("2,0,1", None), ("2,a", None), ("", None)],
)
def test_shape_product(shape, count):
    assert gce._product(shape) == count


def test_installed_as_entry_point():
    eps = [ep for ep in entry_points(group="tpu_registry") if ep.name == "gce"]
    assert [ep.value for ep in eps] == ["tpu_registry_gce"], (
        "pip install -e plugins/tpu-registry-gce"
    )
    assert eps[0].dist.metadata["Name"] == "tpu-registry-gce"


# --- network rules -------------------------------------------------------------------------


def test_sends_metadata_flavor_header(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8")
    # The fake server, like the real one, refuses a request without the header...
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(metadata_server.url + "accelerator-type", timeout=5)  # noqa: S310
    assert e.value.code == 403
    metadata_server.hits.clear()
    # ...and the plugin gets through because it sends it.
    assert gce.tpu_registry_detect(ctx(metadata_server))[0].value == "v5p-8"
    assert metadata_server.hits and all(
        h.get("Metadata-Flavor") == "Google" for _, h in metadata_server.hits
    )


def test_forbidden_is_an_error(metadata_server):
    metadata_server.serve("accelerator-type", "no", status=403)
    with pytest.raises(gce.MetadataError, match=r"accelerator-type: HTTP 403"):
        gce.tpu_registry_detect(ctx(metadata_server))


def test_server_error_is_an_error(metadata_server):
    metadata_server.serve("tpu-env", "boom", status=500)
    with pytest.raises(gce.MetadataError, match=r"tpu-env: HTTP 500"):
        gce.tpu_registry_detect(ctx(metadata_server))


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_opt_in_off_makes_no_request(metadata_server, value):
    metadata_server.serve("accelerator-type", "v5p-8")
    env = {"TPU_REGISTRY_GCE_URL": metadata_server.url} | (
        {"TPU_REGISTRY_GCE": value} if value else {}
    )
    assert gce.tpu_registry_detect(DetectContext(env=env)) is None
    d = detect(env={**env, "TPU_REGISTRY_SYSFS_ROOT": "/nonexistent-sysfs-root"})
    assert d.generation is None and not d.faults
    assert metadata_server.hits == []


def test_reads_context_env_not_os_environ(metadata_server, monkeypatch):
    metadata_server.serve("accelerator-type", "v5p-8")
    monkeypatch.setenv("TPU_REGISTRY_GCE", "1")
    monkeypatch.setenv("TPU_REGISTRY_GCE_URL", metadata_server.url)
    assert gce.tpu_registry_detect(DetectContext(env={})) is None
    assert metadata_server.hits == []


def test_timeout_fails_fast(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8", delay=10)
    start = time.monotonic()
    with pytest.raises(
        gce.MetadataError,
        match=r"accelerator-type: no complete answer within 0.3 s \(TPU_REGISTRY_GCE_TIMEOUT\)",
    ):
        gce.tpu_registry_detect(ctx(metadata_server, TPU_REGISTRY_GCE_TIMEOUT="0.3"))
    assert time.monotonic() - start < 2


def test_default_timeout_is_half_a_second(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8", delay=10)
    start = time.monotonic()
    with pytest.raises(gce.MetadataError, match=r"within 0.5 s"):
        gce.tpu_registry_detect(ctx(metadata_server))
    assert 0.4 < time.monotonic() - start < 2


def test_timeout_covers_the_whole_body(metadata_server):
    # Headers arrive at once, then one byte every 0.1 s: each read is quick, the whole is not.
    metadata_server.serve("tpu-env", TPU_ENV, drip=0.1)
    start = time.monotonic()
    with pytest.raises(gce.MetadataError, match=r"tpu-env: no complete answer within 0.3 s"):
        gce.tpu_registry_detect(ctx(metadata_server, TPU_REGISTRY_GCE_TIMEOUT="0.3"))
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "until-close"])
def test_oversize_body_rejected(metadata_server, content_length):
    metadata_server.serve("tpu-env", b"#" * (gce.MAX_BYTES + 1), content_length=content_length)
    with pytest.raises(gce.MetadataError, match=r"tpu-env: response .*exceeds the 64 KiB limit"):
        gce.tpu_registry_detect(ctx(metadata_server, TPU_REGISTRY_GCE_TIMEOUT="5"))


def test_body_of_exactly_the_limit_is_read(metadata_server):
    body = ("TOPOLOGY: '2x2x1'\n" + "#" * gce.MAX_BYTES)[: gce.MAX_BYTES]
    metadata_server.serve("tpu-env", body, content_length=False)
    [ev] = gce.tpu_registry_detect(ctx(metadata_server, TPU_REGISTRY_GCE_TIMEOUT="5"))
    assert ev.topology == "2x2x1"


@pytest.mark.parametrize(
    "location",
    ["/elsewhere/accelerator-type", "http://127.0.0.1:{port}/elsewhere/accelerator-type"],
)
def test_redirect_not_followed(metadata_server, location):
    metadata_server.serve("/elsewhere/accelerator-type", "v5p-8")
    metadata_server.serve(
        "accelerator-type",
        "",
        status=302,
        headers={"Location": location.format(port=metadata_server.port)},
    )
    with pytest.raises(
        gce.MetadataError,
        match=r"accelerator-type: HTTP 302 redirect to .*elsewhere/accelerator-type' refused",
    ):
        gce.tpu_registry_detect(ctx(metadata_server))
    assert "/elsewhere/accelerator-type" not in metadata_server.paths
    assert metadata_server.paths == [metadata_server.path("accelerator-type")]


def test_connection_refused_is_an_error():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"TPU_REGISTRY_GCE": "1", "TPU_REGISTRY_GCE_URL": f"http://127.0.0.1:{port}/"}
    start = time.monotonic()
    with pytest.raises(
        gce.MetadataError,
        match=rf"http://127.0.0.1:{port}/accelerator-type: ConnectionRefusedError",
    ):
        gce.tpu_registry_detect(DetectContext(env=env))
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TPU_REGISTRY_GCE_URL": "https://127.0.0.1/"}, "need an http:// URL"),
        ({"TPU_REGISTRY_GCE_URL": "file:///etc/passwd"}, "need an http:// URL"),
        ({"TPU_REGISTRY_GCE_TIMEOUT": "soon"}, "is not a number of seconds"),
        ({"TPU_REGISTRY_GCE_TIMEOUT": "0"}, "must be a positive number of seconds"),
        ({"TPU_REGISTRY_GCE_TIMEOUT": "nan"}, "must be a positive number of seconds"),
        ({"TPU_REGISTRY_GCE_TIMEOUT": "inf"}, "must be a positive number of seconds"),
    ],
)
def test_bad_settings_are_errors(metadata_server, env, message):
    with pytest.raises(gce.MetadataError, match=message):
        gce.tpu_registry_detect(ctx(metadata_server, **env))
    assert metadata_server.hits == []


# --- end to end through the core -------------------------------------------------------------


def test_detect_end_to_end(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8")
    metadata_server.serve("tpu-env", TPU_ENV)
    d = detect(env=core_env(metadata_server))
    assert (d.generation, d.status) == ("v5p", "detected")
    assert (d.slice_chips, d.chips_per_host, d.topology) == (4, 4, "2x2x1")
    assert not d.faults and not d.conflicts
    accel = [f for f in d.findings if f.evidence.kind == "accelerator_type"]
    assert [(f.evidence.detector, f.candidates, f.status) for f in accel] == [
        ("gce", ("v5p",), "decides")
    ]
    assert {f.evidence.detector for f in d.findings} == {"gce"}


def test_detect_reports_a_failing_server_as_a_fault(metadata_server):
    metadata_server.serve("accelerator-type", "", status=302, headers={"Location": "/elsewhere"})
    d = detect(env=core_env(metadata_server))
    assert d.generation is None
    [fault] = d.faults
    assert fault.plugin == "gce"
    assert fault.message.startswith("raised MetadataError: ") and "302 redirect" in fault.message
    with pytest.raises(DetectionError, match="302 redirect"):
        detect(env=core_env(metadata_server), strict=True)


def test_detect_stays_within_its_budget_when_the_server_hangs(metadata_server):
    metadata_server.serve("accelerator-type", "v5p-8", delay=10)
    start = time.monotonic()
    d = detect(env=core_env(metadata_server))
    assert time.monotonic() - start < 2
    assert [f.plugin for f in d.faults] == ["gce"] and "within 0.5 s" in d.faults[0].message


# --- a VM in a multi-host slice ----------------------------------------------------------------

MACHINE_TYPE = "/computeMetadata/v1/instance/machine-type"
MULTI_HOST = [
    # accelerator type, topology, host bounds, machine type, generation, VMs in the slice
    ("v5litepod-16", "4x4", "2,2,1", "ct5lp-hightpu-4t", "v5e", 4),
    ("v6e-16", "4x4", "2,2,1", "ct6e-standard-4t", "v6e", 4),
    ("v5p-128", "4x4x4", "2,2,4", "ct5p-hightpu-4t", "v5p", 16),
    ("tpu7x-64", "2x4x4", "1,2,4", "tpu7x-standard-4t", "tpu7x", 8),
]


@pytest.mark.parametrize("case", MULTI_HOST, ids=[c[0] for c in MULTI_HOST])
def test_a_vm_in_a_multi_host_slice_from_metadata(metadata_server, case):
    accel, topo, hosts, machine, gid, vms = case
    metadata_server.serve("accelerator-type", accel)
    metadata_server.serve(
        "tpu-env",
        f"ACCELERATOR_TYPE: '{accel}'\nCHIPS_PER_HOST_BOUNDS: '2,2,1'\nHOST_BOUNDS: '{hosts}'\n"
        f"TOPOLOGY: '{topo}'\nWORKER_ID: '3'\n",
    )
    metadata_server.serve(MACHINE_TYPE, f"projects/123456789/machineTypes/{machine}")
    d = detect(env=core_env(metadata_server))
    assert (d.generation, d.chips_per_host, d.slice_chips, d.topology) == (gid, 4, 4 * vms, topo)
    assert (d.slice.machine_type, d.slice.vms, d.slice.accelerator_type) == (machine, vms, accel)
    assert d.conflicts == () and d.faults == ()
    kinds = {(f.evidence.kind, f.evidence.value): f.status for f in d.findings}
    assert kinds[("machine_type", machine)] == "agrees"


def test_machine_type_alone_names_the_generation_and_the_vm_size(metadata_server):
    metadata_server.serve(MACHINE_TYPE, "projects/1/machineTypes/ct6e-standard-8t")
    d = detect(env=core_env(metadata_server))
    assert (d.generation, d.chips_per_host, d.slice) == ("v6e", 8, None)
    assert d.reason == "machine_type 'ct6e-standard-8t' from gce metadata machine-type"


def test_machine_type_that_disagrees_with_the_slice_is_a_conflict(metadata_server):
    metadata_server.serve("accelerator-type", "v6e-16")
    metadata_server.serve(MACHINE_TYPE, "projects/1/machineTypes/ct6e-standard-8t")
    d = detect(env=core_env(metadata_server))
    assert (d.generation, d.chips_per_host) == ("v6e", 4)
    assert d.conflicts == (
        "gce metadata machine-type says 'ct6e-standard-8t': a v6e slice of topology 4x4 does "
        "not run on machine type 'ct6e-standard-8t' (it runs on ct6e-standard-4t)",
    )


def test_machine_type_of_another_generation_is_outranked(metadata_server):
    metadata_server.serve("accelerator-type", "v6e-16")
    metadata_server.serve(MACHINE_TYPE, "projects/1/machineTypes/ct5p-hightpu-4t")
    d = detect(env=core_env(metadata_server))
    assert d.generation == "v6e"
    assert d.conflicts == (
        "gce metadata machine-type says 'ct5p-hightpu-4t' (v5p) but gce metadata "
        "accelerator-type (accelerator_type) says v6e; machine_type is trusted less",
    )
