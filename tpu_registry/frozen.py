"""Frozen records without ``dataclasses``: the base of every record detection and tuning pass
around, and of the generated ``records``.

Importing ``dataclasses`` costs about 10 ms (it imports ``inspect``, ``ast``, ``dis`` and
``tokenize``), and building a dataclass compiles several methods, on every process that calls
``detect()``. A record here declares its fields once, as ``__slots__`` in order, and an
``__init__`` that passes them to ``_fill`` in that order. It compares, hashes, prints and
pickles like a frozen dataclass, and ``dataclasses.fields()``, ``replace()``, ``asdict()`` and
``is_dataclass()`` work on it: ``__dataclass_fields__`` is built, with ``dataclasses``, the
first time one of them asks. ``tests/test_frozen.py`` holds every record equal to the frozen
dataclass of the same fields.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    R = TypeVar("R", bound="Frozen")

_setattr = object.__setattr__


def _frozen_error(message: str) -> Exception:
    from dataclasses import FrozenInstanceError  # only when someone tries to change a record

    return FrozenInstanceError(message)


class _DataclassFields:
    """``__dataclass_fields__``, built from ``__slots__`` and ``__init__`` on first use."""

    def __init__(self) -> None:
        self._built: dict[type, dict[str, Any]] = {}

    def __get__(self, obj: object, owner: type) -> dict[str, Any]:
        found = self._built.get(owner)
        if found is None:
            found = self._built[owner] = _dataclass_fields(owner)
        return found


def _dataclass_fields(cls: type) -> dict[str, Any]:
    import dataclasses

    init = cls.__init__
    code = init.__code__
    positional = code.co_varnames[1 : code.co_argcount]
    given = init.__defaults__ or ()
    defaults = dict(zip(positional[len(positional) - len(given) :], given, strict=True))
    defaults.update(init.__kwdefaults__ or {})
    annotations = init.__annotations__  # every field is a parameter of __init__
    out = {}
    for name in cls.__slots__:
        default = defaults.get(name, dataclasses.MISSING)
        f = dataclasses.field(default=default, kw_only=name not in positional)
        f.name, f.type = name, annotations.get(name, "Any")
        f._field_type = dataclasses._FIELD  # what dataclasses.fields() selects on
        out[name] = f
    return out


def _restore(cls: type[R], values: tuple) -> R:
    """Unpickle: the values as they were, without ``__init__`` (fields may be keyword-only)."""
    obj = object.__new__(cls)
    for name, value in zip(cls.__slots__, values, strict=True):
        _setattr(obj, name, value)
    return obj


class Frozen:
    """Frozen, compared and hashed by value, fields in ``__slots__`` order."""

    __slots__ = ()
    __dataclass_fields__ = _DataclassFields()

    def _fill(self, *values: Any) -> None:
        """Set the fields from ``__init__``, in ``__slots__`` order."""
        for name, value in zip(self.__slots__, values, strict=True):
            _setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _frozen_error(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise _frozen_error(f"cannot delete field {name!r}")

    def _values(self) -> tuple:
        return tuple([getattr(self, n) for n in self.__slots__])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{self.__class__.__qualname__}({fields})"

    def __reduce__(self) -> tuple:
        return _restore, (self.__class__, self._values())

    def __replace__(self: R, **changes: Any) -> R:
        """A copy with ``changes`` (``copy.replace`` on Python 3.13, and ``replace`` below)."""
        unknown = set(changes).difference(self.__slots__)
        if unknown:
            raise TypeError(f"{self.__class__.__name__} has no field {sorted(unknown)[0]!r}")
        values = {n: getattr(self, n) for n in self.__slots__}
        values.update(changes)
        return self.__class__(**values)


def replace(obj: Any, /, **changes: Any) -> Any:
    """``dataclasses.replace`` for records, without importing ``dataclasses``; dataclasses
    (``Workload``) go to ``dataclasses.replace``."""
    if isinstance(obj, Frozen):
        return obj.__replace__(**changes)
    import dataclasses

    return dataclasses.replace(obj, **changes)


def asdict(obj: Frozen) -> dict[str, Any]:
    """The fields by name, shallow (what ``to_dict`` methods start from)."""
    return {n: getattr(obj, n) for n in obj.__slots__}
