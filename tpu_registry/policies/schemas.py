"""The schemas (pydantic models) of tuning tables and overrides files.

Imported only to validate a file that is new or changed, and by ``validate`` and ``schema``:
the policies read validated snapshots as plain records (``tpu_registry.records``, generated
from these models), so serving a resolve() never imports pydantic.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from tpu_registry import knobs as knob_registry
from tpu_registry.errors import TuningError
from tpu_registry.modelerrors import data_error
from tpu_registry.spec import SCHEMA_VERSION, DataModel, KernelFamily
from tpu_registry.units import DTYPE_BITS, canonical_dtype, dtype_or_none, norm_cell
from tpu_registry.workload import Workload

KeyColumn = Literal[
    "q_dtype",
    "kv_dtype",
    "num_q_heads",
    "num_kv_heads",
    "num_q_heads_per_block",
    "num_kv_heads_per_block",
    "head_dim",
    "page_size",
    "max_num_batched_tokens",
    "max_model_len_paged",
    "max_model_len_pow2",
    "max_model_len_paged_pow2",
    "sliding_window",
    "num_q_heads_pow2",
    "num_kv_heads_pow2",
    "num_tokens",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "page_size_per_kv_packing",
    "kv_packing",
    "max_num_seqs",
    "pages_per_seq",
]


class Table(DataModel):
    schema_version: int
    kernel: KernelFamily
    generations: list[str] = Field(min_length=1)
    source: str = Field(min_length=1)
    note: str = ""
    key: list[KeyColumn] = Field(min_length=1)
    value: list[str] = Field(min_length=1)
    rows: list[list[Any]]
    _index: dict[tuple, int] = PrivateAttr(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if not 1 <= v <= SCHEMA_VERSION:
            raise data_error(
                f"schema_version {v} is not one this tpu-registry understands ({SCHEMA_VERSION})",
                "upgrade tpu-registry, or write the schema_version it supports",
            )
        return v

    @model_validator(mode="after")
    def _rows(self) -> Table:
        columns = self.key + self.value
        width = len(columns)
        n = len(self.key)
        # Per-column checks are decided once, not per cell: tables have thousands of cells.
        kinds = [
            "dtype" if c.endswith("dtype") else "count0" if c == "sliding_window" else "count"
            for c in columns
        ]
        seen: dict[tuple, int] = {}
        for i, row in enumerate(self.rows):
            if len(row) != width:
                raise data_error(
                    f"rows[{i}] has {len(row)} columns, expected {width} ({', '.join(columns)})",
                    "give one cell per key and value column",
                    ("rows", i),
                )
            for col, kind, cell in zip(columns, kinds, row, strict=True):
                if kind == "dtype":
                    if not (isinstance(cell, str) and dtype_or_none(cell)):
                        raise data_error(
                            f"rows[{i}] {col} must be a dtype name, got {cell!r}",
                            f"use one of: {', '.join(sorted(DTYPE_BITS))}",
                            ("rows", i),
                        )
                elif type(cell) is not int or cell < (0 if kind == "count0" else 1):
                    what = (
                        "a whole number, 0 or more"
                        if kind == "count0"
                        else "a positive whole number"
                    )
                    hint = (
                        "write the number without quotes"
                        if type(cell) is not int
                        else "check the cell against its column"
                    )
                    raise data_error(
                        f"rows[{i}] {col} must be {what}, got {cell!r}", hint, ("rows", i)
                    )
            k = tuple(norm_cell(c, v) for c, v in zip(self.key, row[:n], strict=True))
            if k in seen:
                raise data_error(
                    f"rows[{i}] repeats the key of rows[{seen[k]}]",
                    "keep one row per key: remove or merge the duplicate",
                    ("rows", i),
                )
            seen[k] = i
        self._index = seen  # reused by LoadedTable: the key of every row, normalised
        return self


WORKLOAD_FIELDS = tuple(f.name for f in fields(Workload))


class Override(DataModel):
    generation: str = Field(min_length=1)
    match: dict[str, int | str] = Field(default_factory=dict)
    knobs: dict[str, Any] = Field(min_length=1)
    note: str = ""

    @field_validator("match")
    @classmethod
    def _known_fields(cls, v: dict) -> dict:
        unknown = sorted(set(v) - set(WORKLOAD_FIELDS))
        if unknown:
            raise data_error(
                f"match names unknown workload fields: {', '.join(unknown)}",
                f"known: {', '.join(WORKLOAD_FIELDS)}",
                (unknown[0],),
            )
        # A value of the wrong kind would silently never match; a dtype must be one we know.
        for k, want in v.items():
            if k.endswith("dtype"):
                try:
                    canonical_dtype(want)
                except TuningError:
                    raise data_error(
                        f"match {k} {want!r} is not a dtype",
                        f"use one of: {', '.join(sorted(DTYPE_BITS))}",
                        (k,),
                    ) from None
            elif not isinstance(want, int) or isinstance(want, bool):
                raise data_error(
                    f"match {k} must be a whole number, got {want!r}",
                    "write the number without quotes",
                    (k,),
                )
        return v

    @field_validator("knobs", mode="before")
    @classmethod
    def _knobs(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for k, val in v.items():
            if isinstance(val, dict):  # [override.knobs.rpa_v3], or an unquoted dotted key
                inner = next(iter(val), "name")
                hint = f'write "{k}.{inner}" = ... (quoted: an unquoted dotted key makes a table)'
                raise data_error(f"{k} is a table; knob names are flat", hint, (k,))
            try:
                out[k] = knob_registry.coerce(k, val)
            except knob_registry.KnobError as e:
                raise data_error(str(e), e.hint, tuple(k.split("."))) from None
        return out


class OverridesFile(DataModel):
    schema_version: int
    override: list[Override] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if not 1 <= v <= SCHEMA_VERSION:
            raise data_error(
                f"schema_version {v} is not one this tpu-registry understands ({SCHEMA_VERSION})",
                "upgrade tpu-registry, or write the schema_version it supports",
            )
        return v
