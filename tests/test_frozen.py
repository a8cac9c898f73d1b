"""Every ``frozen.Frozen`` record behaves as the frozen dataclass of the same fields.

The records detection and tuning pass around (and the generated ``records``) are plain classes
so that ``detect()`` never imports ``dataclasses``. Here each one is compared, value for value,
with a frozen dataclass built from its own field list: equality, hashing, ``repr``, pickling,
``dataclasses.replace`` / ``asdict`` / ``fields`` / ``is_dataclass``, and refusing changes.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import pickle
import pkgutil
import subprocess
import sys

import pytest

import tpu_registry
from tpu_registry.frozen import Frozen, replace
from tpu_registry.types import DetectContext, Evidence, Knob, ReadOnlyMap, Tuning


def _all_records() -> list[type]:
    for info in pkgutil.walk_packages(tpu_registry.__path__, "tpu_registry."):
        importlib.import_module(info.name)
    found, todo = [], [Frozen]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("tpu_registry.") and cls.__dict__.get("__slots__"):
            found.append(cls)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


RECORDS = _all_records()


def test_the_records_are_found():
    names = {c.__qualname__ for c in RECORDS}
    expected = {"Evidence", "Detection", "Fault", "Finding", "DetectContext", "Knob", "Layer"}
    assert expected | {"Problem", "Slice", "Setting", "Generation", "Chip"} <= names


def _reference(cls: type) -> type:
    """The frozen dataclass of ``cls``'s fields: same names, order, defaults and keyword-only
    split, taken from the signature of its ``__init__``."""
    fields = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        kw = {"kw_only": p.kind is p.KEYWORD_ONLY}
        if p.default is not p.empty:
            kw["default"] = p.default
        fields.append((p.name, object, dataclasses.field(**kw)))
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True)


def _values(cls: type) -> dict:
    # Strings, one per field: hashable, and told apart in every comparison. A Tuning's knobs
    # must be a mapping (it keeps a read-only copy), so it gets a read-only one.
    out = {n: f"{n}-value" for n in cls.__slots__}
    if cls is Tuning:
        out["knobs"] = ReadOnlyMap({"page_size": Knob(16, "baseline")})
    return out


def _construct(cls: type, values: dict):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    args = [values[p.name] for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    kwargs = {p.name: values[p.name] for p in params if p.kind is p.KEYWORD_ONLY}
    return cls(*args, **kwargs)


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_a_record_behaves_as_the_frozen_dataclass_of_its_fields(cls):
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    assert params == list(cls.__slots__), "__init__ must take the fields in __slots__ order"
    values = _values(cls)
    obj, ref = _construct(cls, values), _construct(_reference(cls), values)
    for name in cls.__slots__:
        assert getattr(obj, name) == getattr(ref, name), name

    assert repr(obj) == repr(ref)
    assert obj == _construct(cls, values) and obj != ref  # another class is never equal
    try:
        expected_hash = hash(ref)
    except TypeError:  # a field holds a mapping
        with pytest.raises(TypeError):
            hash(obj)
    else:
        assert hash(obj) == expected_hash

    # dataclasses' functions see the same fields, defaults and keyword-only split.
    assert dataclasses.is_dataclass(obj) and dataclasses.is_dataclass(cls)
    mine, theirs = dataclasses.fields(obj), dataclasses.fields(ref)
    assert [(f.name, f.default, f.kw_only) for f in mine] == [
        (f.name, f.default, f.kw_only) for f in theirs
    ]
    assert dataclasses.asdict(obj) == dataclasses.asdict(ref)
    first, last = cls.__slots__[0], cls.__slots__[-1]
    changed = dataclasses.replace(obj, **{last: "other"})
    assert type(changed) is cls and getattr(changed, last) == "other"
    assert changed == replace(obj, **{last: "other"}) != obj
    with pytest.raises(TypeError, match="no field 'nonexistent'"):
        replace(obj, nonexistent=1)

    # Pickled (fields may be keyword-only) and copied, equal; never changed in place.
    assert pickle.loads(pickle.dumps(obj)) == obj == copy.deepcopy(obj) == copy.copy(obj)
    with pytest.raises(dataclasses.FrozenInstanceError, match=f"cannot assign to field '{first}'"):
        setattr(obj, first, "x")
    with pytest.raises(dataclasses.FrozenInstanceError, match=f"cannot delete field '{first}'"):
        delattr(obj, first)
    with pytest.raises(AttributeError):
        obj.not_a_field = 1  # noqa: B010 - no __dict__ either


def test_a_tuning_keeps_its_knobs_read_only():
    knobs = {"page_size": Knob(16, "baseline")}
    t = Tuning(knobs, ("baseline",))
    knobs["page_size"] = Knob(32, "x")  # the caller's dict changes; the tuning does not
    assert t.knobs["page_size"].value == 16
    with pytest.raises(TypeError):
        t.knobs["page_size"] = Knob(1, "y")  # type: ignore[index]


def test_required_fields_and_keyword_only_fields_are_enforced():
    with pytest.raises(TypeError):
        Evidence("pci", "1ae0:0063")  # no source
    with pytest.raises(TypeError):
        Evidence("pci", "1ae0:0063", "sysfs", 4)  # count is keyword-only
    with pytest.raises(TypeError):
        DetectContext({}, "/")  # sysfs_root is keyword-only
    assert Evidence("pci", "v", "s").count_unit == "chips"


def test_detection_records_import_neither_dataclasses_nor_typing():
    """What ``detect()`` imports to build its records: not dataclasses (with inspect, ast, dis
    and tokenize), not typing."""
    code = (
        "import sys\n"
        "import tpu_registry.types, tpu_registry.errors, tpu_registry.slices, "
        "tpu_registry.records, tpu_registry.catalog, tpu_registry.plugins\n"
        "print(sorted({'dataclasses', 'typing', 'inspect', 'pluggy'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
