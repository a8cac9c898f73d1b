"""tpu-registry-gce: TPU evidence from the Google Compute Engine metadata server.

This module is also the worked example of a detector plugin (CONTRIBUTING.md, "Write a
detector plugin"). A detector reports what it *saw*; the catalog decides which generation
that means. Here it reads two keys of the TPU VM's instance attributes:

* ``accelerator-type`` (``v5p-8``)  -> ``accelerator_type`` evidence for the whole slice;
* ``tpu-env`` (``KEY: 'value'`` lines) -> ``TOPOLOGY``, ``CHIPS_PER_HOST_BOUNDS`` and
  ``HOST_BOUNDS`` as ``topology`` evidence, and ``ACCELERATOR_TYPE`` when the key above is
  absent;

and the instance's own ``machine-type`` (``projects/N/machineTypes/ct6e-standard-4t``) ->
``machine_type`` evidence: the catalog's slice data knows how many chips a VM of it has.

It talks to the network, so it is opt-in: nothing happens unless ``TPU_REGISTRY_GCE=1``.
Every request is bounded: one host (the configured one), a short timeout for the whole
request, a 64 KiB cap on the body, and no redirects. Anything unexpected raises
``MetadataError``; tpu-registry reports that as a fault of the plugin ``gce`` and carries on
with the other detectors. Only the standard library is used.
"""

from __future__ import annotations

import math
import time
from urllib.parse import urljoin, urlsplit

import tpu_registry
from tpu_registry import DetectContext, Evidence, Setting

ENV_ENABLE = "TPU_REGISTRY_GCE"  # "1" turns the plugin on
ENV_URL = "TPU_REGISTRY_GCE_URL"  # base URL of the attributes (tests use 127.0.0.1)
ENV_TIMEOUT = "TPU_REGISTRY_GCE_TIMEOUT"  # seconds per request
DEFAULT_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
DEFAULT_TIMEOUT_S = 0.5
MAX_BYTES = 64 * 1024


class MetadataError(RuntimeError):
    """The metadata server could not be read; the message says which URL and why."""


def fetch(base_url: str, key: str, timeout_s: float) -> str | None:
    """GET ``base_url + key``; the text, or None on 404 (the key is absent)."""
    import http.client  # here, not at the top: every process loads this plugin, few opt in

    url = base_url.rstrip("/") + "/" + key
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise MetadataError(f"{ENV_URL}={base_url!r}: need an http:// URL with a host")
    deadline = time.monotonic() + timeout_s

    def left() -> float:  # the time budget covers the whole request, not each read
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        return remaining

    # http.client, not urllib: it never follows redirects and ignores *_proxy variables,
    # so the only host contacted is the one configured.
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path, headers={"Metadata-Flavor": "Google"})
        sock = conn.sock  # kept: the connection may drop it once the response is read
        sock.settimeout(left())
        resp = conn.getresponse()
        if resp.status == 404:
            return None
        if 300 <= resp.status < 400:
            raise MetadataError(
                f"{url}: HTTP {resp.status} redirect to {resp.getheader('Location')!r} refused "
                "(redirects are not followed)"
            )
        if resp.status != 200:
            raise MetadataError(f"{url}: HTTP {resp.status} {resp.reason}")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > MAX_BYTES:
            raise MetadataError(
                f"{url}: response of {length} bytes exceeds the {MAX_BYTES // 1024} KiB limit"
            )
        body = b""
        while len(body) <= MAX_BYTES:  # bounded: each pass reads >= 1 byte or stops
            sock.settimeout(left())
            chunk = resp.read1(MAX_BYTES + 1 - len(body))
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_BYTES:
            raise MetadataError(f"{url}: response exceeds the {MAX_BYTES // 1024} KiB limit")
        return body.decode("utf-8", errors="replace")
    except TimeoutError:
        raise MetadataError(
            f"{url}: no complete answer within {timeout_s:g} s ({ENV_TIMEOUT})"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise MetadataError(f"{url}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()


def parse_tpu_env(text: str) -> dict[str, str]:
    """``KEY: 'value'`` lines -> dict. Deliberately tiny: tpu-env is flat, no YAML needed."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key or key.startswith("#"):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value.strip()
    return out


def _product(shape: str) -> int | None:
    """``2,2,1`` or ``2x2x1`` -> 4; None unless every part is a positive integer."""
    parts = shape.replace("x", ",").split(",")
    if not all(p.strip().isascii() and p.strip().isdecimal() and int(p) > 0 for p in parts):
        return None
    return math.prod(int(p) for p in parts)


def _suffix(accelerator_type: str) -> int | None:
    """``v5p-8`` -> 8. Cores or chips? The catalog knows per generation (count_unit=suffix)."""
    tail = accelerator_type.rpartition("-")[2]
    ok = tail.isascii() and tail.isdecimal() and len(tail) <= 9  # not "٨", not 5,000 digits
    return int(tail) if ok and int(tail) > 0 else None


def instance_url(attributes_url: str) -> str:
    """The instance folder above the attributes folder, where ``machine-type`` lives."""
    return urljoin(attributes_url.rstrip("/") + "/", "..")


@tpu_registry.hookimpl
def tpu_registry_settings() -> list[Setting]:
    return [
        Setting(
            ENV_ENABLE,
            "`1` lets the GCE detector ask the metadata server (opt-in: it talks to the network).",
            affects_resolve=True,
        ),
        Setting(
            ENV_URL,
            "Base URL of the metadata attributes (tests point it at 127.0.0.1).",
            default=DEFAULT_URL,
            affects_resolve=True,
        ),
        Setting(
            ENV_TIMEOUT,
            "Seconds per metadata request.",
            default=str(DEFAULT_TIMEOUT_S),
            affects_resolve=True,
        ),
    ]


@tpu_registry.hookimpl
def tpu_registry_detect(context: DetectContext) -> list[Evidence] | None:
    env = context.env  # never os.environ: detection may run for an environment given to it
    if env.get(ENV_ENABLE, "").strip().lower() not in ("1", "true", "yes", "on"):
        return None  # opt-in: no network traffic at all unless asked for
    base = env.get(ENV_URL, "").strip() or DEFAULT_URL
    try:
        timeout_s = float(env.get(ENV_TIMEOUT, "").strip() or DEFAULT_TIMEOUT_S)
    except ValueError:
        raise MetadataError(
            f"{ENV_TIMEOUT}={env.get(ENV_TIMEOUT)!r} is not a number of seconds"
        ) from None
    if not 0 < timeout_s < math.inf:
        raise MetadataError(
            f"{ENV_TIMEOUT}={env.get(ENV_TIMEOUT)!r} must be a positive number of seconds"
        )

    out: list[Evidence] = []
    accel = (fetch(base, "accelerator-type", timeout_s) or "").strip()
    tpu_env = parse_tpu_env(fetch(base, "tpu-env", timeout_s) or "")
    source = "gce metadata accelerator-type"
    if not accel and tpu_env.get("ACCELERATOR_TYPE"):
        accel, source = tpu_env["ACCELERATOR_TYPE"], "gce metadata tpu-env ACCELERATOR_TYPE"
    if accel:
        count = _suffix(accel)  # cores or chips: the catalog knows, per generation
        kind = "accelerator_type"
        out.append(Evidence(kind, accel, source, count=count, count_unit="suffix", scope="slice"))
    if bounds := tpu_env.get("CHIPS_PER_HOST_BOUNDS"):
        where = "gce metadata tpu-env CHIPS_PER_HOST_BOUNDS"
        out.append(Evidence("topology", bounds, where, count=_product(bounds), scope="host"))
    if topo := tpu_env.get("TOPOLOGY"):
        where, count = "gce metadata tpu-env TOPOLOGY", _product(topo)
        out.append(Evidence("topology", topo, where, count=count, scope="slice", topology=topo))
    if hosts := tpu_env.get("HOST_BOUNDS"):
        where, count = "gce metadata tpu-env HOST_BOUNDS", _product(hosts)
        out.append(
            Evidence("topology", hosts, where, count=count, count_unit="hosts", scope="slice")
        )
    machine = (fetch(instance_url(base), "machine-type", timeout_s) or "").strip()
    if machine := machine.rpartition("/")[2]:  # projects/123/machineTypes/ct6e-standard-4t
        out.append(Evidence("machine_type", machine, "gce metadata machine-type"))
    return out or None
