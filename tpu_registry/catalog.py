"""Find, parse and validate generation files; index them by id, alias and identifier.

Folders are read in a fixed order: the built-in ``hardware/`` folder, folders contributed by
plugins (``tpu_registry_hardware_dirs``), folders on ``TPU_REGISTRY_PATH`` and folders passed
by the caller. Every problem in every file is collected before one ``CatalogError`` is raised;
a catalog is never returned half-loaded.
"""

from __future__ import annotations

import gc
import os
import re
import stat
import sys
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import snapshot
from .errors import CatalogError, Problem, shorten, warn
from .frozen import Frozen
from .records import Generation
from .tomlfile import locate
from .units import count

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

    from . import spec

ENV_PATH = "TPU_REGISTRY_PATH"


# Identifier kinds that must name at most one generation. torch_xla version numbers and
# generation numbers are deliberately shared (torch_xla says 5 for both v5e and v5p).
UNIQUE_KINDS = ("device_kind", "accelerator_type", "gke_accelerator", "pci")


def builtin_hardware_dir() -> Path:
    """The shipped catalog: the checkout's hardware/ when running from a source tree or an
    editable install (so edits show at once), else the copy packaged inside the wheel."""
    global _builtin
    if _builtin is None:
        here = Path(__file__).resolve().parent
        root = here.parent
        if (root / "hardware").is_dir() and (root / "pyproject.toml").is_file():
            _builtin = root / "hardware"
        else:  # the wheel's copy, inside the package (what importlib.resources gives)
            _builtin = here / "hardware"
    return _builtin


_builtin: Path | None = None


def norm(text: str) -> str:
    """Names and aliases match case-insensitively, in NFKC form (a full-width ｖ６ｅ is v6e),
    and ignore surrounding space."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def pci_key(vendor: int, device: int, subsystem: int | None = None) -> str:
    key = f"{vendor:04x}:{device:04x}"
    return f"{key}/{subsystem:04x}" if subsystem is not None else key


class Head:
    """What the catalog indexes of a generation file served from its snapshot (id, names,
    identifiers, sort order), and the file's validated data as JSON text, parsed into its
    ``records.Generation`` on first use: a catalog of thousands of files is indexed without
    building thousands of records (``snapshot.load(..., index=)``)."""

    __slots__ = ("id", "replaces", "aliases", "generation", "provisional", "ids", "typed", "_json")

    def __init__(self, index: dict[str, Any], text: snapshot.Text) -> None:
        self.id, self.replaces = index["id"], index["replaces"]
        self.aliases = tuple(index["aliases"])
        self.generation, self.provisional = index["generation"], index["provisional"]
        self.ids = [(kind, value) for kind, value in index["ids"]]
        self.typed = [(kind, field, value) for kind, field, value in index["typed"]]
        if not isinstance(self.id, str):
            raise TypeError("malformed index")
        self._json = text

    def spec(self) -> Generation:
        return Generation.from_dict(self._json.load())


def head_index(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a validated generation file that ``Head`` keeps."""
    spec = Generation.from_dict(data)
    return {
        "id": spec.id,
        "replaces": spec.replaces,
        "aliases": list(spec.aliases),
        "generation": spec.generation,
        "provisional": spec.provisional,
        "ids": [list(pair) for pair in identifiers(spec)],
        "typed": [list(row) for row in _typed(spec)],
    }


class Entry:
    """A generation in the catalog: its record (built on first use from a ``Head``), the file
    it comes from, and the file it replaced, if any."""

    __slots__ = ("_spec", "path", "replaced")

    def __init__(self, spec: Generation | Head, path: Path, replaced: Path | None = None):
        self._spec, self.path, self.replaced = spec, path, replaced

    @property
    def spec(self) -> Generation:
        spec = self._spec
        if isinstance(spec, Head):
            spec = self._spec = spec.spec()
        return spec

    def sort_key(self) -> tuple:
        s = self._spec
        return (s.generation, s.provisional, s.id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.spec, self.path, self.replaced) == (other.spec, other.path, other.replaced)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Entry(spec={self.spec!r}, path={self.path!r}, replaced={self.replaced!r})"


class Broken(Frozen):
    """A generation file left out of a tolerant catalog, and why."""

    __slots__ = ("path", "gid", "problems")
    path: Path
    gid: str  # the id it declares, or its file name
    problems: tuple[Problem, ...]

    def __init__(self, path: Path, gid: str, problems: tuple[Problem, ...]) -> None:
        self._fill(path, gid, problems)


class Catalog:
    """The generations by id, the folders they came from, the files left out (``broken``),
    and the indexes lookups use (names and aliases; identifiers by kind)."""

    __slots__ = ("entries", "folders", "broken", "_names", "_index")

    def __init__(
        self,
        entries: dict[str, Entry],
        folders: tuple[Path, ...],
        broken: tuple[Broken, ...] = (),
        _names: dict[str, str] | None = None,
        _index: dict[tuple[str, str], set[str]] | None = None,
    ) -> None:
        self.entries, self.folders, self.broken = entries, folders, broken
        self._names = {} if _names is None else _names
        self._index = {} if _index is None else _index

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Catalog(ids={list(self.entries)!r}, folders={self.folders!r})"

    def __iter__(self) -> Iterator[Generation]:
        return (e.spec for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, gid: str) -> bool:
        return gid in self.entries

    def __getitem__(self, gid: str) -> Generation:
        return self.entries[gid].spec

    def ids(self) -> list[str]:
        return list(self.entries)

    def lookup(self, kind: str, value: str) -> set[str]:
        """Generations an identifier of `kind` names (empty set: unknown)."""
        if kind == "pci":
            exact = self._index.get(("pci", value.lower()), set())
            if exact or "/" not in value:
                return set(exact)
            return set(self._index.get(("pci", value.split("/")[0].lower()), set()))
        if kind in ("name",):
            gid = self._names.get(norm(value))
            return {gid} if gid else set()
        key = value if kind == "device_kind" else value.strip().lower()
        return set(self._index.get((kind, key), set()))

    def accelerator_prefix(self, accelerator_type: str) -> tuple[set[str], str, int | None]:
        """Split ``v5p-128`` into its prefix and suffix and look the prefix up."""
        text = accelerator_type.strip().lower()
        prefix, _, suffix = text.rpartition("-")
        if not prefix:
            prefix, suffix = text, ""
        return self.lookup("accelerator_type", prefix), prefix, count(suffix)

    def find(self, text: str) -> set[str]:
        """Resolve what a person typed: id, alias, or any identifier string."""
        if (gid := self._names.get(norm(text))) is not None:
            return {gid}
        return self.find_identifier(text)

    def find_identifier(self, text: str) -> set[str]:
        """What ``find`` resolves through identifiers alone (not ids or aliases)."""
        for kind in ("device_kind", "gke_accelerator", "accelerator_type"):
            if hit := self.lookup(kind, text):
                return hit
        t = text.strip().lower()
        hit, prefix, n = self.accelerator_prefix(text)
        if hit and (n is not None or prefix == t):  # "v5p-8" or "v5p"; not "v5p-" + junk
            return hit
        if t.startswith("0x") or ":" in t:
            try:
                parts = [int(p, 16) for p in t.replace("/", ":").split(":")]
                if len(parts) in (2, 3):
                    return self.lookup("pci", pci_key(*parts))
            except ValueError:
                pass
        return set()

    def get(self, text: str) -> Generation:
        hits = self.find(text)
        if len(hits) == 1:
            return self[next(iter(hits))]
        if not hits:
            raise CatalogError(
                f"no generation is named {shorten(text)!r} (try `tpu-registry list`)"
            )
        raise CatalogError(f"{text!r} names more than one generation: {', '.join(sorted(hits))}")


def identifiers(spec: Generation | Head) -> Iterator[tuple[str, str]]:
    if isinstance(spec, Head):
        yield from spec.ids
        return
    ident = spec.identify
    for dk in ident.device_kinds:
        yield "device_kind", dk
    for at in ident.accelerator_types:
        yield "accelerator_type", at.prefix.lower()
    for g in ident.gke_accelerators:
        yield "gke_accelerator", g.strip().lower()
    for p in ident.pci:
        yield "pci", pci_key(p.vendor, p.device, p.subsystem_device)
    for v in ident.torch_xla_versions:
        yield "torch_xla_version", str(v)
    yield "generation_number", str(spec.generation)


def search_folders(
    extra: Iterable[os.PathLike | str] = (), *, plugin_dirs: Iterable[Path] = ()
) -> list[tuple[Path, str]]:
    """Folders to read, each with where it came from (for messages)."""
    out = [(builtin_hardware_dir(), "built-in")]
    out += [(Path(p), "plugin") for p in plugin_dirs]
    for part in os.environ.get(ENV_PATH, "").split(os.pathsep):
        if part.strip():
            out.append((Path(part.strip()), ENV_PATH))
    out += [(Path(p), "argument") for p in extra]
    return out


def list_files(folder: Path, origin: str) -> tuple[list[Path], list[Problem]]:
    shown = str(folder)
    try:
        if not folder.exists():
            if folder.is_symlink():
                return [], [
                    Problem(
                        shown,
                        None,
                        "",
                        f"folder from {origin} is a broken or looping symlink",
                        "point it at a real folder",
                    )
                ]
            return [], [
                Problem(
                    shown,
                    None,
                    "",
                    f"folder from {origin} does not exist",
                    f"create it or remove it from {origin}",
                )
            ]
        if not folder.is_dir():
            return [], [
                Problem(
                    shown,
                    None,
                    "",
                    f"{origin} names a file, not a folder",
                    "name the folder that holds the .toml files",
                )
            ]
        files = sorted(
            (p for p in folder.iterdir() if p.suffix == ".toml" and not p.name.startswith(".")),
            key=lambda p: p.name,  # one folder: the order of the paths, without Path compares
        )
        warn_if_writable_by_others(folder, origin)
    except OSError as e:
        msg = "symlink loop" if e.errno == 40 else (e.strerror or str(e))
        return [], [
            Problem(
                shown,
                None,
                "",
                f"cannot read folder from {origin}: {msg}",
                "check its permissions and links",
            )
        ]
    return files, []


def warn_if_writable_by_others(folder: Path, origin: str) -> bool:
    """Catalog files are trusted data: a folder other users can write to lets them change the
    facts and knobs this user gets. Logged as a warning (not an error); True when warned."""
    mode = folder.stat().st_mode
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    who = "all users" if mode & stat.S_IWOTH else "its group"
    warn(
        "catalog folder %s (from %s) is writable by %s; anyone who can write there chooses your "
        "TPU facts and kernel knobs (chmod go-w %s)",
        folder,
        origin,
        who,
        folder,
    )
    return True


def load_catalog(
    folders: Iterable[os.PathLike | str] = (), *, plugins: bool = True, tolerant: bool = False
) -> Catalog:
    """Load and validate the catalog. Raises ``CatalogError`` with every problem found.

    ``tolerant``: a file with problems is left out instead (listed in ``Catalog.broken``), so
    one broken generation file fails only what uses it; folder problems are still errors.
    """
    plugin_dirs: list[Path] = []
    if plugins:
        plugin_dirs = _plugin_dirs()
    return _load(tuple(search_folders(folders, plugin_dirs=plugin_dirs)), tolerant)


def _plugin_dirs() -> list[Path]:
    """Folders the plugins contribute. No plugin is loaded (nor pluggy) when the cached entry
    points say that none contributes any and no manager is built yet: ``list`` and ``show``
    then read the catalog and nothing else."""
    from . import entrypoints

    built = sys.modules.get(f"{__package__}.plugins")
    manager = built.current() if built is not None else None
    if manager is None:
        if entrypoints.no_plugin_implements("tpu_registry_hardware_dirs"):
            return []
        from .plugins import get_plugins

        manager = get_plugins()
    return manager.hardware_dirs()


_lock = threading.Lock()
_cache: dict[tuple, Catalog] = {}


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's lock may have been held by another thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _signature(sources: tuple[tuple[Path, str], ...]) -> tuple:
    sig = []
    for folder, origin in sources:
        try:
            with os.scandir(folder) as it:
                found = [e for e in it if e.name.endswith(".toml")]
            entries = tuple(
                sorted((e.name, st.st_mtime_ns, st.st_size) for e in found for st in (e.stat(),))
            )
        except OSError:
            entries = None
        sig.append((str(folder), origin, entries))
    return tuple(sig)


def _load(sources: tuple[tuple[Path, str], ...], tolerant: bool = False) -> Catalog:
    # Loading allocates many small objects that all stay alive; the cyclic garbage collector
    # would rescan the growing heap again and again (per-file cost grew with catalog size).
    # It is paused while the folders are listed and loaded, and the new objects are then moved
    # to the oldest generation (``_promote_new_objects``) rather than scanned all at once by
    # the first collection after. A cached catalog moves nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    built = False
    try:
        key = (_signature(sources), tolerant)
        with _lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached
        built = True
        problems: list[Problem] = []
        broken: list[Broken] = []
        loaded: list[tuple[Generation, Path, str | None]] = []
        for folder, origin in sources:
            files, probs = list_files(folder, origin)
            problems += probs
            items = snapshot.load("generation", folder, files, validated_data, Head, head_index)
            for item in items:
                if item.problems and tolerant:
                    broken.append(
                        Broken(item.path, _id_of(item.text or "", item.path), tuple(item.problems))
                    )
                    continue
                problems += item.problems
                if item.data is not None:
                    loaded.append((item.data, item.path, item.text))
        file_problems = len(problems)
        catalog = _assemble(loaded, tuple(f for f, _ in sources), problems)
    finally:
        if was_enabled:
            if built:
                _promote_new_objects()
            gc.enable()
    if tolerant:  # entries that collide were left out by _assemble: say so per file
        by_file: dict[str, list[Problem]] = {}
        for prob in problems[file_problems:]:
            by_file.setdefault(prob.path, []).append(prob)
        broken += [Broken(Path(f), Path(f).stem, tuple(ps)) for f, ps in by_file.items()]
        problems = problems[:file_problems]
        catalog.broken = tuple(broken)
    if problems:
        raise CatalogError(problems)
    with _lock:
        _cache[key] = catalog
    return catalog


def _promote_new_objects() -> None:
    """Move every object the collector tracks to its oldest generation, without scanning them.

    Everything allocated while the collector was paused sits in the youngest generation, and
    the next collection would walk all of it: 10 % of loading 5,000 files, measured with
    ``gc.callbacks``. ``gc.freeze()`` then ``gc.unfreeze()`` moves the objects to the oldest
    generation instead (as the ``gc`` documentation describes each); garbage among them is
    still collected by the next full collection. Skipped when the program has frozen objects
    of its own (a pre-fork server), which ``unfreeze`` would release."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def _id_of(text: str, path: Path) -> str:
    """The id a broken file was meant to have: its ``id = "..."`` line, else its name."""
    m = re.search(r'^\s*id\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else path.stem


def load_generation_file(path: Path) -> tuple[spec.Generation | None, str, list[Problem]]:
    """Parse one generation file and validate it with the pydantic model (always)."""
    from .modelerrors import validate
    from .spec import Generation as Model
    from .tomlfile import read_toml

    doc, text, problems = read_toml(path)
    if doc is None:
        return None, text, problems
    model, problems = validate(Model, doc, text, path)
    return model, text, problems  # type: ignore[return-value]


def validated_data(path: Path) -> tuple[dict[str, Any] | None, str, list[Problem]]:
    """A generation file's validated data (``model_dump()``), for its snapshot."""
    model, text, problems = load_generation_file(path)
    return (None if model is None else model.model_dump()), text, problems


class _Texts(dict):
    """File texts, read on first use: only a problem needs a line number, and files served
    from a snapshot are not read."""

    def __missing__(self, path: Path) -> str:
        raw = snapshot.read_regular(path)
        text = "" if raw is None else raw.decode("utf-8", errors="replace")
        self[path] = text
        return text


def _assemble(
    loaded: list[tuple[Any, Path, str | None]], folders: tuple[Path, ...], problems: list[Problem]
) -> Catalog:
    entries: dict[str, Entry] = {}
    # Texts place problems on their lines: read only when there is a problem to place.
    texts = _Texts({path: text for _, path, text in loaded if text is not None})
    replacing = [(s, p) for s, p, _ in loaded if s.replaces]
    for spec, path, _text in loaded:
        if spec.replaces:
            continue
        if spec.id in entries:
            other = entries[spec.id].path
            problems.append(
                Problem(
                    str(path),
                    locate(texts[path], ("id",)),
                    "id",
                    f"id {spec.id!r} is already defined in {other}",
                    f'pick another id, or write replaces = "{spec.id}" to replace it',
                )
            )
            continue
        entries[spec.id] = Entry(spec, path)
    replaced_by: dict[str, Path] = {}
    for spec, path in replacing:
        text = texts[path]
        target = spec.replaces
        line = locate(text, ("replaces",))
        if spec.id != target:  # renaming through replaces would make ids depend on file order
            problems.append(
                Problem(
                    str(path),
                    line,
                    "replaces",
                    f"replaces {target!r}, but the file's id is {spec.id!r}; a replacement keeps "
                    "the id it replaces",
                    f'write id = "{target}", or remove replaces to add a new generation',
                )
            )
            continue
        if target in replaced_by:  # checked first: the first replacement removed the target
            problems.append(
                Problem(
                    str(path),
                    line,
                    "replaces",
                    f"{target!r} is already replaced by {replaced_by[target]}",
                    "keep only one replacement",
                )
            )
            continue
        if target not in entries:
            problems.append(
                Problem(
                    str(path),
                    line,
                    "replaces",
                    f"replaces {target!r}, but no generation has that id",
                    "use the id of a generation in `tpu-registry list`",
                )
            )
            continue
        old = entries.pop(target)
        replaced_by[target] = path
        entries[spec.id] = Entry(spec, path, replaced=old.path)
    names: dict[str, str] = {}
    index: dict[tuple[str, str], set[str]] = {}
    for gid, entry in entries.items():
        for label, name in [("id", gid)] + [("aliases", a) for a in entry._spec.aliases]:
            key = norm(name)
            if key in names and names[key] != gid:
                other = entries[names[key]].path
                problems.append(
                    Problem(
                        str(entry.path),
                        locate(texts[entry.path], (label,)),
                        label,
                        f"name {name!r} is already used by {names[key]!r} in {other}",
                        "choose a different alias",
                    )
                )
                continue
            names[key] = gid
        for kind, value in identifiers(entry._spec):
            ids = index.setdefault((kind, value), set())
            if kind in UNIQUE_KINDS and ids and gid not in ids:
                other_id = next(iter(ids))
                field_name = {
                    "device_kind": "identify.device_kinds",
                    "accelerator_type": "identify.accelerator_types",
                    "gke_accelerator": "identify.gke_accelerators",
                    "pci": "identify.pci",
                }[kind]
                problems.append(
                    Problem(
                        str(entry.path),
                        locate(texts[entry.path], tuple(field_name.split("."))),
                        field_name,
                        f"{kind} {value!r} is already claimed by {other_id!r} in "
                        f"{entries[other_id].path}",
                        "an identifier may name only one generation; remove it from one file",
                    )
                )
                continue
            ids.add(gid)
    entries = dict(sorted(entries.items(), key=lambda kv: kv[1].sort_key()))
    catalog = Catalog(entries=entries, folders=folders, _names=names, _index=index)
    problems += _namespace_problems(catalog, texts)
    return catalog


# Fields whose strings a person may type (`show X`, TPU_REGISTRY_GENERATION=X), as
# (kind for messages, field name, strings of a generation).
def _typed(spec: Generation | Head) -> Iterator[tuple[str, str, str]]:
    if isinstance(spec, Head):
        yield from spec.typed
        return
    yield "id", "id", spec.id
    for a in spec.aliases:
        yield "alias", "aliases", a
    for dk in spec.identify.device_kinds:
        yield "device_kind", "identify.device_kinds", dk
    for g in spec.identify.gke_accelerators:
        yield "gke_accelerator", "identify.gke_accelerators", g
    for at in spec.identify.accelerator_types:
        yield "accelerator_type", "identify.accelerator_types", at.prefix


def _disguised(catalog: Catalog, value: str, gid: str) -> tuple[str, str] | None:
    """(generation, how) when a name reads as another generation's accelerator type with a
    count (``v5p-8``) or PCI id (``1ae0:006f``); plain equal strings are checked as claims."""
    hits, prefix, n = catalog.accelerator_prefix(value)
    if n is not None and hits - {gid}:
        return sorted(hits - {gid})[
            0
        ], f"reads as an accelerator type (prefix {prefix!r} and a count)"
    t = value.strip().lower()
    if t.startswith("0x") or ":" in t:
        try:
            parts = [int(p, 16) for p in t.replace("/", ":").split(":")]
        except ValueError:
            return None
        if len(parts) in (2, 3) and all(0 <= p <= 0xFFFF for p in parts):
            key = pci_key(*parts)
            if hits := catalog.lookup("pci", key) - {gid}:
                return sorted(hits)[0], f"reads as pci id {key!r}"
    return None


def _namespace_problems(catalog: Catalog, texts: dict[Path, str]) -> list[Problem]:
    """Ids, aliases and identifiers share one namespace: a string that names one generation
    by one kind must not name another by a different kind (an alias "TPU v5 lite" in a new
    file would capture `show` and TPU_REGISTRY_GENERATION while detection still says v5e).
    Collisions within one kind are reported by ``_assemble`` already."""
    out: list[Problem] = []
    claims: dict[str, tuple[str, str, str]] = {}  # normalised text -> (gid, kind, text)
    names_kinds = ("id", "alias")
    for gid, entry in catalog.entries.items():
        for kind, field_name, value in _typed(entry._spec):  # a Head is not parsed for this
            if kind in names_kinds:
                reported = catalog._names.get(norm(value), gid) != gid
            else:
                ikey = value if kind == "device_kind" else value.strip().lower()
                reported = bool(catalog._index.get((kind, ikey), set()) - {gid})
            if reported:  # a collision within one kind: _assemble has reported it
                continue
            key = norm(value)
            other = claims.get(key)
            if other is None or other[0] == gid:
                claims.setdefault(key, (gid, kind, value))
                other = None
                if kind in names_kinds:  # "v5p-8", "1ae0:006f": an identifier in disguise
                    other = _disguised(catalog, value, gid)
                if other is None:
                    continue
                ogid, what = other
            elif other[1] == kind or {other[1], kind} <= set(names_kinds):
                continue  # the same kind (v6e's id and its accelerator prefix "v6e" coincide)
            else:
                ogid, what = other[0], f"is already {other[1]} {other[2]!r}"
            out.append(
                Problem(
                    str(entry.path),
                    locate(texts[entry.path], tuple(field_name.split("."))),
                    field_name,
                    f"{kind} {value!r} {what} of {ogid!r} in {catalog.entries[ogid].path}",
                    "ids, aliases and identifiers share one namespace; a string may name only "
                    "one generation",
                )
            )
    return out


def clear_cache() -> None:
    with _lock:
        _cache.clear()
