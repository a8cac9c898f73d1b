"""Fuzzing (issue 7): bad data gives our error type, never a crash; reconcile is order-free.

Six properties, each with a fixed seed (``derandomize=True``):

- near-valid documents (a real generation file, tuning table or overrides file with one
  mutation: a key deleted, a value of the wrong type or an extreme number, an unknown key...)
  written to a file and read back: ``read_toml`` + ``validate`` report ``Problem``s and raise
  nothing, and ``tpu-registry validate``'s checker does the same;
- a real generation file with exactly one field made invalid (wrong type, out of range, an
  unknown key, a required field missing) is refused with that field, and only it, named; valid
  variations are accepted (a third test shows both checks fail stub validators);
- arbitrary text and bytes in a data file: the same;
- random evidence drawn from the real catalog's identifiers plus junk: ``reconcile`` returns a
  ``Detection`` or raises ``DetectionError`` only for explicit values that name nothing, several
  generations, or disagree;
- any permutation of the same evidence gives the same ``Detection.to_dict()``.

The total number of examples is ``TPU_REGISTRY_FUZZ_EXAMPLES`` (default 3000), split over the
properties by weight; ``make fuzz`` sets 50000.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import HARDWARE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpu_registry.catalog import identifiers as catalog_identifiers
from tpu_registry.catalog import load_catalog
from tpu_registry.detection import PRIORITY, Detection, Evidence, reconcile
from tpu_registry.errors import DetectionError, Problem
from tpu_registry.modelerrors import validate
from tpu_registry.policies.overrides import OverridesFile
from tpu_registry.policies.tables import LoadedTable, Table, load_table
from tpu_registry.spec import Generation
from tpu_registry.tomlfile import read_toml, tomllib
from tpu_registry.validate import file_kind, validate_paths

TOTAL = int(os.environ.get("TPU_REGISTRY_FUZZ_EXAMPLES", "3000"))
WEIGHTS = {"documents": 0.30, "text": 0.20, "bytes": 0.05, "evidence": 0.30, "permutations": 0.15}


def budget(name: str) -> settings:
    return settings(
        max_examples=max(10, int(TOTAL * WEIGHTS[name])),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# Examples actually run, per property (reported by test_zz_report_counts when run with -s).
RUN: dict[str, int] = {k: 0 for k in (*WEIGHTS, "faults")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder for the files the properties write (function-scoped tmp_path does not mix
    with @given), and a private parse cache so the JSON round-trip is fuzzed too."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(autouse=True)
def private_parse_cache(work, monkeypatch):
    monkeypatch.setenv("TPU_REGISTRY_CACHE_DIR", str(work / "cache"))


# ---------------------------------------------------------------------------------------------
# A small TOML writer (inline tables only; enough for any document tomllib returns)
# ---------------------------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def dumps(doc: dict) -> str:
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in doc.items())


# ---------------------------------------------------------------------------------------------
# Near-valid documents
# ---------------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


GENERATIONS = [_load(p) for p in sorted(HARDWARE.glob("*.toml"))]
TABLES = [_load(p) for p in sorted((HARDWARE / "tuning").glob("*.toml"))]
for _t in TABLES:
    _t["rows"] = _t["rows"][:12]  # a dozen rows mutate like a thousand, and write faster
OVERRIDES = [
    {
        "schema_version": 1,
        "override": [
            {
                "generation": "v6e",
                "match": {"max_model_len": 4096, "kv_dtype": "bf16"},
                "note": "n",
                "knobs": {"page_size": 64, "rpa_v3.d_block_sizes": [1, 1024, 1, 1024]},
            },
            {
                "generation": "*",
                "knobs": {"rpa_v2": {"num_kv_pages_per_block": 16}, "vmem_limit_bytes": 1 << 26},
            },
        ],
    }
]
BASES = (
    [("generation", d) for d in GENERATIONS]
    + [("table", d) for d in TABLES]
    + [("overrides", d) for d in OVERRIDES]
)

EXTREMES = [
    0,
    -1,
    1,
    127,
    129,
    2**31,
    2**63 - 1,
    -(2**63),
    10**30,
    0.0,
    -0.0,
    1e-308,
    1e308,
    -1e308,
    0.5,
    float("nan"),
    float("inf"),
    float("-inf"),
]
WRONG_TYPES: list[Any] = [
    "",
    " ",
    "32",
    "1.5e3",
    "true",
    "nan",
    "x" * 300,
    "TPU v6 lite",
    "v6e",
    "rpa_v2",
    "chip.hbm_gib",
    "é\u200b\U0001f600",
    True,
    False,
    [],
    [1, "a"],
    [[1, 2], [3]],
    {},
    {"a": 1},
    {"chip": {"x": 1}},
    [{}],
    dt.date(2024, 1, 1),
    dt.datetime(2024, 1, 1, 12, 0),
    dt.time(1, 2, 3),
]
UNKNOWN_KEYS = [
    "hbm_gb",
    "relase_year",
    "__class__",
    "include",
    "import",
    "exec",
    "x.y",
    "",
    "é",
    "rows",
    "chip",
    "override",
]


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside the document (tables, arrays and leaves)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _copy(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_copy(v) for v in doc]
    return doc


def _parent(doc: Any, path: tuple) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


@st.composite
def near_valid(draw):
    kind, base = draw(st.sampled_from(BASES))
    doc = _copy(base)
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    parent = _parent(doc, path)
    last = path[-1]
    op = draw(
        st.sampled_from(
            ["delete", "extreme", "wrong_type", "unknown_key", "swap", "empty", "duplicate", "nest"]
        )
    )
    if op == "delete":
        del parent[last]
    elif op == "extreme":
        parent[last] = draw(st.sampled_from(EXTREMES) | st.integers() | st.floats())
    elif op == "wrong_type":
        parent[last] = draw(st.sampled_from(WRONG_TYPES))
    elif op == "unknown_key":
        target = (
            parent[last]
            if isinstance(parent[last], dict)
            else parent
            if isinstance(parent, dict)
            else doc
        )
        target[draw(st.sampled_from(UNKNOWN_KEYS) | st.text(max_size=12))] = draw(
            st.sampled_from(EXTREMES + WRONG_TYPES)
        )
    elif op == "swap":
        other = draw(st.sampled_from(paths))
        parent[last] = _copy(_parent(base, other)[other[-1]])
    elif op == "empty":
        parent[last] = type(parent[last])() if isinstance(parent[last], (dict, list, str)) else None
        if parent[last] is None:
            del parent[last]
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(_copy(parent[last]))
    else:  # nest: bury the value a few levels down
        value = parent[last]
        for _ in range(draw(st.integers(1, 20))):
            value = [value] if draw(st.booleans()) else {"v": value}
        parent[last] = value
    return kind, doc, f"{op} {path}"


def _check_problems(problems: list, path: Path) -> None:
    assert problems, "a rejected document must say why"
    for p in problems:
        assert isinstance(p, Problem)
        text = str(p)
        assert text.startswith(str(path)) and "Traceback" not in text


MODELS = {"generation": Generation, "table": Table, "overrides": OverridesFile}


@budget("documents")
@given(case=near_valid())
def test_near_valid_documents_give_problems_not_crashes(case, work):
    RUN["documents"] += 1
    kind, doc, _what = case
    path = work / f"{kind}.toml"
    path.write_text(dumps(doc), encoding="utf-8")
    for _ in range(2):  # the second read may come from the parse cache: same answer
        parsed, text, problems = read_toml(path)
        if parsed is None:
            _check_problems(problems, path)
            return
        assert problems == []
        model, problems = validate(MODELS[kind], parsed, text, path)
        if model is None:
            _check_problems(problems, path)
        else:
            assert problems == []
            if kind == "table":
                loaded, problems = load_table(path)
                assert (loaded is None) == bool(problems)
                assert loaded is None or isinstance(loaded, LoadedTable)
    # The whole `tpu-registry validate` check (file kind, catalog collisions, overrides names).
    n, problems = validate_paths([path])
    assert n >= 1
    for p in problems:
        assert isinstance(p, Problem)


# ---------------------------------------------------------------------------------------------
# Single-field faults: a real generation file with exactly one field made invalid is refused,
# naming that field; valid variations are accepted. What is valid is stated here, from the
# documented schema (docs, the hardware files), not read from the models.
# ---------------------------------------------------------------------------------------------

TOP_REQUIRED = ("schema_version", "id", "name", "generation", "release_year", "chip")
TOP_REQUIRED += ("identify", "sources")
CHIP_COUNTS = (  # required numbers, each positive (sparse cores: 0 or more) and far below 10**7
    "tensorcores_per_chip",
    "mxus_per_core",
    "mxu_rows",
    "mxu_cols",
    "sparsecores_per_chip",
    "hbm_gib",
    "hbm_bandwidth_gb_s",
    "peak_bf16_tflops",
    "vmem_mib_per_core",
    "smem_kib_per_core",
    "lanes",
    "sublanes",
    "jax_devices_per_chip",
)
CHIP_OPTIONAL = (
    "peak_int8_tops",
    "peak_fp8_tflops",
    "ici_bandwidth_bidir_gb_s_per_chip",
    "ici_ports_per_chip",
    "max_pod_chips",
    "chips_per_host",
)
OUT_OF_RANGE = {
    "schema_version": [0, 99],
    "generation": [0, 100],
    "release_year": [1999, 2101],
    **{f"chip.{k}": [-1, 10**7] for k in CHIP_COUNTS + CHIP_OPTIONAL},
    "kernels.rpa_v2.default_num_kv_pages_per_block": [0, -8],
    "kernels.rpa_v2.vmem_limit_mib": [0, 10**6],
    "kernels.rpa_v3.decode_kv_bytes": [0, -1],
    "kernels.rpa_v3.chunk_q_budget": [0],
}
NOT_A_NUMBER = ["32", True, [1], {"v": 1}]
WRONG_TYPE = {
    **{k: NOT_A_NUMBER for k in OUT_OF_RANGE},
    "name": [5, True, ["TPU"]],
    "id": [6, ["v6e"]],
    "notes": [1, {"a": "b"}],
    "provisional": ["yes", 1],
    "aliases": ["v6", 3],
    "chip.matmul_dtypes": ["bf16", 16],
    "identify.device_kinds": ["TPU v6e", 1],
    "sources": ["https://cloud.google.com", 1],
}
REQUIRED = TOP_REQUIRED + tuple(f"chip.{k}" for k in CHIP_COUNTS) + ("chip.matmul_dtypes",)
NEW_KEYS = ["hbm_gb", "relase_year", "lane", "vmem_mib", "x_y"]
TABLES_IN = ("", "chip", "identify", "kernels", "kernels.rpa_v2", "kernels.rpa_v3")


def _get(doc: dict, dotted: str) -> tuple[dict, str] | None:
    """The table holding ``dotted`` and its last key, if the table exists."""
    *parents, last = dotted.split(".")
    for p in parents:
        doc = doc.get(p)
        if not isinstance(doc, dict):
            return None
    return doc, last


@st.composite
def one_field_invalid(draw):
    """(document, field) with exactly that field wrong: wrong type, out of range, unknown key,
    or a required field missing."""
    base = draw(st.sampled_from(GENERATIONS))
    doc = _copy(base)
    fault = draw(st.sampled_from(["wrong_type", "out_of_range", "unknown_key", "missing"]))
    if fault == "unknown_key":
        table = draw(st.sampled_from([t for t in TABLES_IN if t == "" or _get(doc, t + ".x")]))
        holder = _get(doc, table + ".x")[0] if table else doc
        key = draw(st.sampled_from([k for k in NEW_KEYS if k not in holder]))
        holder[key] = draw(st.sampled_from([1, "x", [2], 0.5]))
        return doc, f"{table}.{key}".lstrip(".")
    pool = {"wrong_type": WRONG_TYPE, "out_of_range": OUT_OF_RANGE}.get(fault, REQUIRED)
    present = [f for f in pool if (at := _get(doc, f)) and at[1] in at[0]]
    field = draw(st.sampled_from(sorted(present)))
    holder, last = _get(doc, field)
    if fault == "missing":
        del holder[last]
    else:
        holder[last] = _copy(draw(st.sampled_from(pool[field])))
    return doc, field


TEXT = st.text(  # within the BMP: the JSON escapes dumps() writes for others are not TOML's
    st.characters(
        min_codepoint=32,
        max_codepoint=0xFFFF,
        blacklist_characters="\x7f",
        blacklist_categories=("Cs",),
    ),
    min_size=1,
    max_size=40,
)
# A name is any printable text (no control or invisible characters), not blank.
NAME = TEXT.filter(lambda t: t.isprintable() and bool(t.strip()))


@st.composite
def valid_variation(draw):
    """A real generation file with in-range values changed and optional fields dropped (the
    file then marked provisional)."""
    doc = _copy(draw(st.sampled_from(GENERATIONS)))
    chip = doc["chip"]
    changes = {
        "name": NAME,
        "notes": st.just("") | TEXT,
        "release_year": st.integers(2015, 2100),
        "chip.hbm_gib": st.integers(64, 4096) | st.floats(64, 4096),
        "chip.hbm_bandwidth_gb_s": st.floats(10.5, 100_000),
        "chip.peak_bf16_tflops": st.floats(0.5, 100_000),
        "chip.mxus_per_core": st.integers(1, 64),
    }
    for field in draw(st.lists(st.sampled_from(sorted(changes)), unique=True, max_size=4)):
        holder, last = _get(doc, field)
        holder[last] = draw(changes[field])
    dropped = draw(st.lists(st.sampled_from(CHIP_OPTIONAL), unique=True, max_size=3))
    for opt in dropped:  # unpublished figures may be left out of a provisional file only
        chip.pop(opt, None)
        doc["provisional"] = True
    return doc


def _validate_generation(doc: dict, path: Path) -> tuple[Any, list[Problem]]:
    """The product's check of a generation file: read it back, validate it."""
    path.write_text(dumps(doc), encoding="utf-8")
    parsed, text, problems = read_toml(path)
    if parsed is None:
        return None, problems
    return validate(Generation, parsed, text, path)


def assert_refused_naming(validator, doc: dict, field: str, path: Path) -> None:
    model, problems = validator(doc, path)
    assert model is None, f"accepted a document whose {field} is invalid"
    assert {p.field for p in problems} == {field}, (field, [str(p) for p in problems])
    for p in problems:
        assert str(p).startswith(f"{path}:") and p.message, p


def assert_accepted(validator, doc: dict, path: Path) -> None:
    model, problems = validator(doc, path)
    assert problems == [] and isinstance(model, Generation), [str(p) for p in problems]


FAULTS = settings(budget("documents"), max_examples=max(20, int(TOTAL * 0.1)))


@FAULTS
@given(case=one_field_invalid())
def test_one_invalid_field_is_refused_and_named(case, work):
    RUN["faults"] += 1
    doc, field = case
    assert_refused_naming(_validate_generation, doc, field, work / "one_field.toml")


@FAULTS
@given(doc=valid_variation())
def test_valid_variations_are_accepted(doc, work):
    RUN["faults"] += 1
    assert_accepted(_validate_generation, doc, work / "variation.toml")


def test_the_fault_checks_fail_a_validator_that_accepts_everything(work):
    """The two checks above bite: a validator that accepts everything fails the first, one
    that refuses everything the second, one that names the wrong field the first too."""
    path = work / "stub.toml"
    doc = _copy(GENERATIONS[0])
    doc["chip"]["lanes"] = "128"

    def accept_everything(doc, path):
        return object(), []

    def refuse_everything(doc, path):
        return None, [Problem(str(path), 1, "", "no")]

    def name_another_field(doc, path):
        return None, [Problem(str(path), 1, "chip.sublanes", "bad")]

    for stub in (accept_everything, name_another_field):
        with pytest.raises(AssertionError):
            assert_refused_naming(stub, doc, "chip.lanes", path)
    with pytest.raises(AssertionError):
        assert_accepted(refuse_everything, _copy(GENERATIONS[0]), path)
    # and the real validator passes both on the same documents
    assert_refused_naming(_validate_generation, doc, "chip.lanes", path)
    assert_accepted(_validate_generation, _copy(GENERATIONS[0]), path)


# ---------------------------------------------------------------------------------------------
# Arbitrary text and bytes
# ---------------------------------------------------------------------------------------------

REAL_LINES = sorted(
    {line for p in sorted(HARDWARE.glob("*.toml")) for line in p.read_text().splitlines()}
)
FRAGMENTS = [
    "[chip]",
    "[[sources]]",
    "[identify]",
    "[kernels.rpa_v2]",
    "[[override]]",
    "[override.knobs]",
    "rows = [",
    "]",
    "[",
    "{",
    "}",
    "=",
    '"',
    "'",
    '"""',
    "'''",
    "\\",
    "#",
    ".",
    ",",
    "a",
    "a.b.c",
    "x = 1",
    "x = ",
    "1e999",
    "nan",
    "inf",
    "-0",
    "0x1ae0",
    "1979-05-27T07:32:00Z",
    "true",
    "\n",
    "\r\n",
    "\t",
    " ",
    "\x00",
    "\x7f",
    "é",
    "\U0001f600",
]
text_strategy = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join),
    st.lists(st.sampled_from(REAL_LINES), min_size=1, max_size=80).map("\n".join),
    st.tuples(st.sampled_from(REAL_LINES), st.integers(0, 60)).map(lambda t: t[0][: t[1]]),
    st.integers(0, 40).map(lambda n: "a = " + "[" * n + "1" + "]" * n),
    st.integers(0, 40).map(lambda n: "a = " + "{ b = " * n + "1" + " }" * n),
    st.integers(1, 3000).map(lambda n: ".".join(["k"] * n) + " = 1"),
    st.integers(1, 300).map(
        lambda n: "\n".join(f"[{'.'.join(['t'] * i)}]" for i in range(1, n + 1))
    ),
)


def _read_and_validate_everything(path: Path) -> None:
    doc, text, problems = read_toml(path)
    if doc is None:
        _check_problems(problems, path)
        return
    assert problems == [] and isinstance(doc, dict)
    for model in (Generation, Table, OverridesFile):
        m, probs = validate(model, doc, text, path)
        assert (m is None) == bool(probs)
        for p in probs:
            assert isinstance(p, Problem)
    assert file_kind(doc) in MODELS
    _, problems = validate_paths([path])
    assert all(isinstance(p, Problem) for p in problems)


@budget("text")
@given(text=text_strategy)
def test_arbitrary_text_gives_problems_not_crashes(text, work):
    RUN["text"] += 1
    path = work / "text.toml"
    path.write_text(
        text,
        encoding="utf-8",
        errors="surrogatepass" if any(0xD800 <= ord(c) <= 0xDFFF for c in text) else "strict",
    )
    _read_and_validate_everything(path)


@budget("bytes")
@given(
    raw=st.binary(max_size=300)
    | st.lists(st.sampled_from(REAL_LINES), max_size=20).map(
        lambda ls: "\n".join(ls).encode("utf-16")
    )
)
def test_arbitrary_bytes_give_problems_not_crashes(raw, work):
    RUN["bytes"] += 1
    path = work / "bytes.toml"
    path.write_bytes(raw)
    _read_and_validate_everything(path)


# ---------------------------------------------------------------------------------------------
# Evidence and reconcile
# ---------------------------------------------------------------------------------------------

CATALOG = load_catalog(plugins=False)


def _real_values() -> dict[str, list[str]]:
    values: dict[str, set[str]] = {k: set() for k in PRIORITY}
    for spec in CATALOG:
        values["explicit"] |= {spec.id, spec.name, *spec.aliases}
        for kind, value in catalog_identifiers(spec):
            values[kind].add(value)
        for at in spec.identify.accelerator_types:
            values["accelerator_type"] |= {
                f"{at.prefix}-8",
                f"{at.prefix}-128",
                at.prefix.upper() + "-4",
            }
        for p in spec.identify.pci:
            values["pci"].add(f"{p.vendor:04x}:{p.device:04x}/0001")
            values["explicit"].add(f"0x{p.vendor:04x}:0x{p.device:04x}")
        for vm in spec.slices.vm_types if spec.slices else ():
            # As GCE metadata returns it, and bare.
            full = f"projects/1/machineTypes/{vm.machine_type}"
            values["machine_type"] |= {vm.machine_type, full}
    values["topology"] |= {"2x2", "2x2x1", "4x4", "2,2,1"}
    return {k: sorted(v) for k, v in values.items()}


REAL = _real_values()
ALL_REAL = sorted({v for vs in REAL.values() for v in vs})
JUNK = [
    "",
    " ",
    "-",
    "v99",
    "TPU v99",
    "tpu-v99-slice",
    "v6e-",
    "-8",
    "v5p-abc",
    "0x1ae0:zz",
    "1ae0:006f/zzzz",
    "ffff:ffff",
    "0",
    "-1",
    "99",
    "1e3",
    "x" * 200,
    "TPU V6 LITE",
    " TPU v6 lite ",
    "é",
    "\x00",
    "v5litepod-16",
    "V6E",
    "v6e-8-8",
]

evidence_strategy = st.builds(
    Evidence,
    kind=st.sampled_from(list(PRIORITY)),
    value=st.one_of(st.sampled_from(ALL_REAL), st.sampled_from(JUNK), st.text(max_size=8)),
    source=st.sampled_from(["env A", "env B", "sysfs", "jax", "gce"]),
    count=st.none() | st.sampled_from([0, 1, 4, 8, 64, -3, 2**40]),
    count_unit=st.sampled_from(["chips", "cores", "devices", "suffix", "hosts"]),
    scope=st.sampled_from(["host", "slice", "galaxy"]),
    topology=st.none() | st.sampled_from(["2x2", "4x4x4", ""]),
    note=st.sampled_from(["", "n"]),
    detector=st.sampled_from(["", "env", "sysfs", "simulate", "plugin"]),
)


@st.composite
def evidence_lists(draw):
    """Mostly real identifiers of the right kind (so real decisions and conflicts happen),
    some of any kind, some junk."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 3)):
            kind = draw(
                st.sampled_from(
                    [k for k in PRIORITY if k != "explicit"]
                    + ["explicit"] * (draw(st.integers(0, 4)) == 0)
                )
            )
            base = draw(evidence_strategy)
            out.append(replace(base, kind=kind, value=draw(st.sampled_from(REAL[kind]))))
        else:
            out.append(draw(evidence_strategy))
    # Near-duplicates: the same observation differing only in how it counts or what it notes.
    for e in list(out):
        if draw(st.integers(0, 4)) == 0:
            field = draw(st.sampled_from(["count_unit", "scope", "topology", "note", "count"]))
            new = draw(
                st.sampled_from(
                    {
                        "count_unit": ["chips", "cores", "devices", "suffix"],
                        "scope": ["host", "slice"],
                        "topology": [None, "2x2", ""],
                        "note": ["", "m"],
                        "count": [None, 0, 8],
                    }[field]
                )
            )
            out.append(replace(e, **{field: new}))
    return out


def _explicit_is_bad(evidence: list[Evidence]) -> bool:
    explicit = [e for e in evidence if e.kind == "explicit"]
    # --simulate wins over every other explicit value (which is then only overridden).
    explicit = [e for e in explicit if e.detector == "simulate"] or explicit
    named = [CATALOG.find(e.value) for e in explicit]
    return any(len(n) != 1 for n in named) or len(set().union(*named)) > 1


def _outcome(evidence) -> Any:
    try:
        return reconcile(CATALOG, evidence).to_dict()
    except DetectionError as e:
        return ("DetectionError", [str(p) for p in e.problems])


@budget("evidence")
@given(evidence=evidence_lists())
def test_reconcile_raises_only_for_bad_explicit_values(evidence):
    RUN["evidence"] += 1
    try:
        d = reconcile(CATALOG, evidence)
    except DetectionError as e:
        assert _explicit_is_bad(evidence), f"DetectionError without a bad explicit value: {e}"
        assert e.problems and all(isinstance(p, Problem) for p in e.problems)
        return
    assert not _explicit_is_bad(evidence)
    assert isinstance(d, Detection)
    assert d.status in ("detected", "explicit", "simulated", "ambiguous", "conflict", "none")
    assert (d.generation is not None) == (d.status in ("detected", "explicit", "simulated"))
    assert d.generation is None or d.generation in CATALOG
    assert set(d.candidates) <= set(CATALOG.ids())
    assert len(d.findings) == len(set(evidence))
    json.dumps(d.to_dict())


@budget("permutations")
@given(data=st.data(), evidence=evidence_lists())
def test_reconcile_ignores_the_order_of_evidence(data, evidence):
    RUN["permutations"] += 1
    first = _outcome(evidence)
    for _ in range(3):
        shuffled = data.draw(st.permutations(evidence))
        assert _outcome(shuffled) == first


def test_zz_report_counts():
    """Prints how many examples each property ran (run with -s); runs last in this file."""
    print("\nfuzz examples run:", RUN, "total", sum(RUN.values()))
