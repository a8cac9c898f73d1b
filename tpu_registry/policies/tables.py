"""The tables policy: measured block sizes from TOML tables under ``hardware/tuning/``.

A table names the generations and the kernel family it applies to, the workload columns it
is keyed by and the knobs it sets. The workload is bucketed exactly as upstream bucketed it
when it measured the table (``bucket()`` is the one place that defines this). A miss sets
nothing, so the baseline shows through. Tables are validated like generation files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tpu_registry import records, snapshot
from tpu_registry.catalog import builtin_hardware_dir
from tpu_registry.errors import CatalogError, Problem
from tpu_registry.hookspecs import hookimpl
from tpu_registry.types import Layer, TuneContext
from tpu_registry.units import align, cdiv, next_pow2, norm_cell

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from tpu_registry.workload import Workload


def __getattr__(name: str) -> Any:
    """``Table`` (the pydantic model) is defined in ``schemas``: imported only when asked for."""
    if name in ("Table", "KeyColumn"):
        from tpu_registry.policies import schemas

        return getattr(schemas, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENV_TABLES = "TPU_REGISTRY_TABLES_PATH"


def bucket(column: str, w: Workload, page: int, mla_kv_packing: int = 0) -> Any:
    """The table key cell for a workload: the single definition of the bucketing rules.

    Dtypes by canonical name; heads per device (and per RPA v2 block, the kernel's
    ``get_min_heads_per_blk``); head dim aligned to 128; page size, batched tokens and
    ``max_model_len_pow2`` to the next power of two; ``max_model_len_paged`` to whole pages;
    sliding window exact (0 for none). The head-dim-64 kernel's keys
    (``get_simplified_raw_key``): ``num_q_heads_pow2`` / ``num_kv_heads_pow2`` from
    ``kernels.hd64_heads``, ``max_model_len_paged_pow2`` the whole pages of a sequence raised to
    a power of two. The MLA kernel's keys (``TuningKey`` as ``mla_attention`` fills it) are
    exact: the call's padded tokens, the latent and rope widths, the cache's rows per page
    and ``kv_packing``, ``max_num_seqs`` and pages per sequence.
    """
    if column in ("q_dtype", "kv_dtype"):
        return getattr(w, column)
    if column == "num_q_heads":
        return w.q_heads_per_device
    if column == "num_kv_heads":
        return w.kv_heads_per_device
    from tpu_registry import kernels  # on first use: detection registers this plugin too

    if column in ("num_q_heads_per_block", "num_kv_heads_per_block"):
        heads = kernels.min_heads_per_block(
            w.q_heads_per_device, 2 * w.kv_heads_per_device, w.q_dtype, w.kv_dtype
        )
        if heads is None:
            return None
        return heads[0] if column == "num_q_heads_per_block" else heads[1] // 2
    if column == "head_dim":
        return align(w.head_dim, 128)
    if column == "page_size":
        return next_pow2(page)
    if column == "max_num_batched_tokens":  # the call's padded token count, as torch_xla keys it
        return next_pow2(w.tokens)
    if column == "max_model_len_paged":
        return page * cdiv(w.max_model_len, page)
    if column == "max_model_len_pow2":
        return next_pow2(w.max_model_len)
    if column == "sliding_window":
        return w.sliding_window or 0
    if column in ("num_q_heads_pow2", "num_kv_heads_pow2"):
        return kernels.hd64_heads(w)[column == "num_kv_heads_pow2"]
    if column == "max_model_len_paged_pow2":
        return next_pow2(page * cdiv(w.max_model_len, page))
    if column == "num_tokens":
        return w.tokens
    if column in ("kv_lora_rank", "qk_rope_head_dim"):
        return getattr(w, column)
    if column == "page_size_per_kv_packing":
        return align(page, mla_kv_packing) // mla_kv_packing if mla_kv_packing else None
    if column == "kv_packing":
        return mla_kv_packing or None
    if column == "max_num_seqs":
        return w.max_num_seqs
    if column == "pages_per_seq":
        return cdiv(w.max_model_len, page)
    raise KeyError(column)


class LoadedTable:
    """A validated table (a ``records.Table``) and its rows indexed by normalised key.

    From a snapshot it is built from the table's kernel and generations alone (``head``), and
    its rows are parsed on first use: a resolve reads the rows of the one or two tables its
    workload looks up, not of every table that lists its generation."""

    def __init__(
        self,
        table: records.Table | None,
        path: Path,
        *,
        head: dict[str, Any] | None = None,
        text: snapshot.Text | None = None,
    ):
        self.path, self._table, self._text = path, table, text
        if table is not None:
            self.kernel, self.generations = table.kernel, table.generations
        else:
            assert head is not None and text is not None
            self.kernel, self.generations = head["kernel"], tuple(head["generations"])
        self._index: dict[tuple, tuple] | None = None

    @property
    def table(self) -> records.Table:
        if self._table is None:
            self._table = records.Table.from_dict(self._text.load())  # type: ignore[union-attr]
        return self._table

    @property
    def index(self) -> dict[tuple, tuple]:
        """Built on first lookup: a resolve loads every table that lists its generation but
        looks up only those of the kernels its workload runs (cold ``resolve()`` spent 4 ms
        indexing tables it never read). Only dtype cells need normalising."""
        if self._index is None:
            key = self.table.key
            n = len(key)
            rows = self.table.rows
            dtypes = [i for i, c in enumerate(key) if c.endswith("dtype")]
            # A table repeats a few dtype names: each is normalised once, and rows are
            # rewritten only when one of them is not already canonical (bf16, not bfloat16).
            canonical = {
                name: norm_cell(key[i], name) for i in dtypes for name in {r[i] for r in rows}
            }
            if all(name == norm for name, norm in canonical.items()):
                index = {row[:n]: row[n:] for row in rows}
            else:
                index = {}
                for row in rows:
                    cells = list(row[:n])
                    for i in dtypes:
                        cells[i] = canonical[cells[i]]
                    index[tuple(cells)] = row[n:]
            self._index = index
        return self._index

    def lookup(self, w: Workload, page: int, mla_kv_packing: int = 0) -> dict[str, Any] | None:
        key = tuple(bucket(c, w, page, mla_kv_packing) for c in self.table.key)
        hit = self.index.get(key)
        if hit is None:
            return None
        return {
            f"{self.kernel}.{name}": value
            for name, value in zip(self.table.value, hit, strict=True)
        }


def table_folders(env: Mapping[str, str]) -> list[Path]:
    out = [builtin_hardware_dir() / "tuning"]
    for part in env.get(ENV_TABLES, "").split(os.pathsep):
        if part.strip():
            out.append(Path(part.strip()))
    return out


def _validated(path: Path) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """Parse and validate one table with its pydantic model: (its data, text, problems)."""
    from tpu_registry.modelerrors import validate
    from tpu_registry.policies.schemas import Table
    from tpu_registry.tomlfile import read_toml

    doc, text, problems = read_toml(path)
    if doc is None:
        return None, text, problems
    table, problems = validate(Table, doc, text, path)
    if table is None:
        return None, text, problems
    return table.model_dump(), text, []


def load_table(
    path: Path, generation: str | None = None
) -> tuple[LoadedTable | None, list[Problem]]:
    """Parse and validate one table. With ``generation``, a well-formed table that does not
    list it is skipped unvalidated (returns None, no problems): resolve() validates only what
    it uses; ``tpu-registry validate`` checks every table."""
    from tpu_registry.tomlfile import locate, read_toml

    doc, text, problems = read_toml(path)
    if doc is None:
        return None, problems
    listed = doc.get("generations")
    if (
        generation is not None
        and isinstance(listed, list)
        and all(isinstance(g, str) for g in listed)
        and generation not in listed
    ):
        return None, []
    data, text, problems = _validated(path)
    if data is None:
        return None, problems
    try:
        return LoadedTable(records.Table.from_dict(data), path), []
    except Exception as e:  # a dtype cell that names no dtype
        return None, [
            Problem(
                str(path),
                locate(text, ("rows",)),
                "rows",
                str(e),
                "use dtype names such as bfloat16",
            )
        ]


_cache: dict[tuple, list[LoadedTable]] = {}


# Snapshots of tables hold each table's kernel and generations beside its data as JSON text.
SNAPSHOT_KIND = "tuning-table"


def _head_index(data: dict[str, Any]) -> dict[str, Any]:
    return {"kernel": data["kernel"], "generations": list(data["generations"])}


def _head(head: Any, text: snapshot.Text) -> tuple[dict[str, Any], snapshot.Text]:
    if not (
        isinstance(head, dict)
        and isinstance(head.get("kernel"), str)
        and isinstance(head.get("generations"), list)
    ):
        raise ValueError("malformed table head")
    return head, text


def load_tables(folders: list[Path], generation: str | None = None) -> list[LoadedTable]:
    """The valid tables of ``folders`` that list ``generation`` (all with None), from their
    snapshots when unchanged. A table with problems is reported only when it is one this
    resolve uses (``load_table`` decides, as it always did)."""
    groups: list[tuple[Path, list[Path]]] = []
    problems: list[Problem] = []
    for folder in folders:
        if not folder.is_dir():
            if folder != builtin_hardware_dir() / "tuning":
                problems.append(
                    Problem(
                        str(folder),
                        None,
                        "",
                        f"tuning-table folder from {ENV_TABLES} does not exist",
                        "create it or fix the variable",
                    )
                )
            continue
        # os.listdir, not glob: glob compiles a pattern on every process's first resolve()
        names = sorted(n for n in os.listdir(folder) if n.endswith(".toml") and n[0] != ".")
        paths = [folder / n for n in names]
        groups.append((folder, paths))
    files = [p for _, paths in groups for p in paths]
    key = (generation, *((str(p), p.stat().st_mtime_ns) for p in files))
    if key in _cache and not problems:
        return _cache[key]
    tables = []
    for folder, paths in groups:
        for item in snapshot.load(
            SNAPSHOT_KIND, folder, paths, _validated, _head, index=_head_index
        ):
            if item.data is not None:
                head, text = item.data
                if generation is None or generation in head["generations"]:
                    tables.append(LoadedTable(None, item.path, head=head, text=text))
                continue
            t, probs = load_table(item.path, generation)  # reports it only if this resolve uses it
            problems += probs
            if t is not None:
                tables.append(t)
    if problems:
        raise CatalogError(problems)
    _cache[key] = tables
    return tables


def lookup(
    spec_id: str,
    family: str,
    w: Workload,
    page: int,
    tables: list[LoadedTable],
    mla_kv_packing: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    knobs: dict[str, Any] = {}
    used = []
    for t in tables:
        if spec_id in t.generations and t.kernel == family:
            hit = t.lookup(w, page, mla_kv_packing)
            if hit:
                for k, v in hit.items():
                    knobs.setdefault(k, v)
                used.append(t.path.name)
    return knobs, used


@hookimpl
def tpu_registry_tune(spec, workload: Workload, context: TuneContext) -> Layer | None:
    from tpu_registry import kernels  # on first use: detection registers this plugin too

    page = kernels.page_size_of(spec, workload)
    knobs: dict[str, Any] = {}
    used: list[str] = []
    tables = load_tables(table_folders(context.env), generation=spec.id)
    mla = spec.kernels.mla_v2.kv_packing if spec.kernels.mla_v2 is not None else 0
    for family in kernels.families_for(spec, workload):
        hit, names = lookup(spec.id, family, workload, page, tables, mla)
        knobs.update(hit)
        used += names
    if not knobs:
        return None
    pages_per_seq = cdiv(workload.max_model_len, page)
    # Upstream clamps a table hit the same way it clamps its defaults.
    if "rpa_v2.num_kv_pages_per_block" in knobs:
        knobs["rpa_v2.num_kv_pages_per_block"] = min(
            pages_per_seq, knobs["rpa_v2.num_kv_pages_per_block"]
        )
    if "rpa_v2.num_queries_per_block" in knobs:
        knobs["rpa_v2.num_queries_per_block"] = min(
            workload.tokens, knobs["rpa_v2.num_queries_per_block"]
        )
    bkv_p, bq = (knobs.get(k) for k in kernels.HD64_KNOBS)
    if bkv_p is not None and bq is not None:  # get_tuned_block_sizes clamps a hit per call
        bkv_p, bq = kernels.rpa_v3_hd64_clamp(workload, page, bkv_p, bq)
        knobs.update(zip(kernels.HD64_KNOBS, (bkv_p, bq), strict=True))
    return Layer("tables", knobs, note="from " + ", ".join(used))


def clear_cache() -> None:
    _cache.clear()
