"""Unit and dtype arithmetic: whole-number rounding, MiB to bytes, dtype widths and packing."""

from __future__ import annotations

import math

from .errors import TuningError

MIB = 1024 * 1024

# dtype name -> bits. Names as JAX/torch spell them, plus the short forms people type.
DTYPE_BITS = {
    "float32": 32,
    "bfloat16": 16,
    "float16": 16,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "int8": 8,
}
DTYPE_ALIASES = {
    "f32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "auto": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "e5m2": "float8_e5m2",
    "i8": "int8",
}


def canonical_dtype(name: str) -> str:
    """``bf16`` -> ``bfloat16``; raises TuningError for a name that is no dtype."""
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BITS:
        known = ", ".join(sorted(DTYPE_BITS))
        raise TuningError(
            f"unknown dtype {name!r} (use one of: {known}, or bf16, fp8, fp8_e5m2, int8)"
        )
    return key


_DTYPES: dict[str, str | None] = {}


def dtype_or_none(name: str) -> str | None:
    """Canonical dtype name or None, memoised (a table repeats a few names thousands of times)."""
    if name not in _DTYPES:
        try:
            _DTYPES[name] = canonical_dtype(name)
        except TuningError:
            _DTYPES[name] = None
    return _DTYPES[name]


def norm_cell(column: str, value):
    """A tuning-table key cell as rows are indexed: dtypes by canonical name."""
    return dtype_or_none(value) if column.endswith("dtype") else value


def packing(dtype: str) -> int:
    """Values of ``dtype`` in one 32-bit word (the kernels' sublane packing)."""
    return 32 // DTYPE_BITS[dtype]


def itemsize(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


def count(text: str, max_digits: int = 9) -> int | None:
    """A positive whole number written in ASCII digits (``"8"``), else None. Other scripts'
    digits (``"٨"``) and absurd lengths are not counts: int() would accept the first and take
    quadratic time (or raise) on the second."""
    text = text.strip()
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= max_digits):
        return None
    return int(text) or None


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(x: int, a: int) -> int:
    return cdiv(x, a) * a


def mib_to_bytes(mib: float) -> int:
    return int(math.floor(mib * MIB))
