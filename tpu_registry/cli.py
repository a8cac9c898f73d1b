"""tpu-registry: list | show | slice | detect | resolve | validate | schema | plugins | doctor.

Exit codes: 0 success; 2 invalid input (bad data files, bad arguments, unknown generation,
failed validation); 3 ``detect --require`` found no TPU; 130 interrupted (Ctrl-C); 1 an
unexpected internal error (reported in one line; set TPU_REGISTRY_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_NO_TPU = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
JSON_HELP = 'machine-readable output; errors too, as {"error": ...} on stdout (see README)'


def safe(text: Any) -> str:
    """``text`` with every control or invisible character escaped (``\\x1b``, ``\\n``): data
    printed on a terminal must not move the cursor, recolour it or forge a line of output."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def safe_lines(text: str) -> str:
    """Escape each line of our own multi-line text (its newlines are ours; the data's are not)."""
    return "\n".join(safe(line) for line in text.split("\n"))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: left-aligned text, right-aligned numbers, data escaped."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else safe(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_is_num(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if numeric[i] and n else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_num(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return s == "-"


def _num(x: float | None) -> str | None:
    if x is None:
        return None
    return f"{x:g}" if x != int(x) else str(int(x))


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from .catalog import load_catalog

    cat = load_catalog(args.catalog)
    rows = []
    for gid, e in cat.entries.items():
        c = e.spec.chip
        rows.append(
            {
                "id": gid,
                "name": e.spec.name,
                "hbm_gib": c.hbm_gib,
                "hbm_bandwidth_gb_s": c.hbm_bandwidth_gb_s,
                "peak_bf16_tflops": c.peak_bf16_tflops,
                "vmem_mib_per_core": c.vmem_mib_per_core,
                "mxu": f"{c.mxus_per_core}x{c.mxu_rows}x{c.mxu_cols}",
                "chips_per_host": c.chips_per_host,
                "provisional": e.spec.provisional,
                "path": str(e.path),
                "replaces": str(e.replaced) if e.replaced else None,
            }
        )
    if args.json:
        _dump(rows)
        return EXIT_OK
    print(
        table(
            [
                "id",
                "name",
                "HBM GiB",
                "HBM GB/s",
                "bf16 TFLOPS",
                "VMEM MiB/core",
                "MXU/core",
                "chips/host",
                "provisional",
            ],
            [
                [
                    r["id"],
                    r["name"] + (" (replaces built-in)" if r["replaces"] else ""),
                    _num(r["hbm_gib"]),
                    _num(r["hbm_bandwidth_gb_s"]),
                    _num(r["peak_bf16_tflops"]),
                    _num(r["vmem_mib_per_core"]),
                    r["mxu"],
                    r["chips_per_host"],
                    "yes" if r["provisional"] else "",
                ]
                for r in rows
            ],
        )
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from .catalog import load_catalog

    cat = load_catalog(args.catalog)
    spec = cat.get(args.name)
    entry = cat.entries[spec.id]
    data = spec.to_dict()
    data["path"] = str(entry.path)
    data["replaced"] = str(entry.replaced) if entry.replaced else None
    if args.json:
        _dump(data)
        return EXIT_OK
    _say(f"{spec.id}: {spec.name}{'  [PROVISIONAL]' if spec.provisional else ''}")
    _say(f"  file: {entry.path}" + (f" (replaces {entry.replaced})" if entry.replaced else ""))
    _say(
        f"  generation {spec.generation}, released {spec.release_year}; aliases: "
        f"{', '.join(spec.aliases) or '-'}"
    )
    if spec.notes:
        _say(f"  notes: {spec.notes}")
    _say("chip (per chip unless per_core):")
    for k, v in data["chip"].items():
        _say(f"  {k:36} {'-' if v is None else v}")
    _say("identify:")
    for k, v in data["identify"].items():
        if k == "pci":
            v = [
                f"{p['vendor']:04x}:{p['device']:04x}"
                + (
                    f" subsystem {p['subsystem_device']:04x}"
                    if p.get("subsystem_device") is not None
                    else ""
                )
                for p in v
            ]
        elif k == "accelerator_types":
            v = [f"{a['prefix']}-N (N counts {a['suffix_counts']})" for a in v]
        _say(f"  {k:36} {', '.join(map(str, v)) or '-'}")
    _say(f"kernels: {', '.join(spec.kernels.families) or 'none'}")
    for fam in spec.kernels.families:
        for k, v in (data["kernels"][fam] or {}).items():
            _say(f"  {fam}.{k:30} {'-' if v is None else v}")
    if spec.slices is not None:
        from .slices import topologies

        sl = spec.slices
        _say(
            f"slices: {len(topologies(spec))} shapes, largest {sl.max_chips} chips; machine "
            "types (chips per VM): "
            f"{', '.join(f'{v.machine_type} ({v.chips})' for v in sl.vm_types)} "
            f"(`tpu-registry slice --list --generation {spec.id}`)"
        )
    else:
        _say("slices: not described")
    _say("sources:")
    for s in spec.sources:
        where = s.url or f"{s.repo}:{s.path}" + (f"@{s.commit[:12]}" if s.commit else "")
        _say(f"  - {s.title}")
        _say(f"    {where}")
        _say(f"    covers: {', '.join(s.fields)}")
        if s.note:
            _say(f"    note: {s.note}")
    return EXIT_OK


def _say(line: str) -> None:
    """Print one line of output built from data, escaped."""
    print(safe(line))


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_paths

    n, problems = validate_paths([Path(p) for p in args.paths])
    if args.json:
        _dump({"files": n, "ok": not problems, "problems": [p.to_dict() for p in problems]})
    else:
        for p in problems:
            print(safe(p), file=sys.stderr)
        print(
            f"{n} file{'s' if n != 1 else ''} checked, {len(problems)} "
            f"problem{'s' if len(problems) != 1 else ''}"
        )
    return EXIT_INVALID if problems else EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from .validate import json_schema

    _dump(json_schema(args.kind))
    return EXIT_OK


def _wrap_text(sl) -> str:
    if sl.wraparound is None:
        return "not published"
    dims = sl.topology.split("x")
    if not any(sl.wraparound):
        return "none"
    return ", ".join(
        f"{n}: {'yes' if w else 'no'}" for n, w in zip(dims, sl.wraparound, strict=True)
    )


def slice_text(sl) -> str:
    """The human-readable answer of `tpu-registry slice` (README shows it; a test checks)."""
    from .slices import hosts_text

    def fig(x, unit: str) -> str:
        return "-" if x is None else f"{_num(x)} {unit}"

    also = f" (also: {', '.join(sl.other_machine_types)})" if sl.other_machine_types else ""
    ici_link = (
        f"; per link {fig(sl.ici_link_gb_s_one_way, 'GB/s')} one way, "
        f"{fig(sl.ici_link_gb_s_bidir, 'GB/s')} bidirectional"
        if sl.ici_link_gb_s_one_way is not None
        else ""
    )
    rows = [
        ("topology", sl.topology),
        ("chips", sl.chips),
        ("TensorCores", sl.tensorcores),
        ("hosts", hosts_text(sl.hosts)),
        ("VMs", f"{sl.vms} x {sl.chips_per_vm} chips"),
        ("machine type", sl.machine_type + also),
        ("GKE accelerator", sl.gke_accelerator or "-"),
        (
            "VM",
            f"{sl.vcpus_per_vm or '-'} vCPUs, {fig(sl.memory_gb_per_vm, 'GB')} memory, "
            f"{sl.numa_nodes_per_vm or '-'} NUMA nodes",
        ),
        ("wraparound", _wrap_text(sl)),
        (
            "ICI",
            f"{fig(sl.ici_bandwidth_bidir_gb_s_per_chip, 'GB/s')} bidirectional per chip"
            + ici_link,
        ),
        ("DCN", f"{fig(sl.dcn_gbps_per_chip, 'Gbps')} per chip"),
    ]
    lines = [
        f"{sl.accelerator_type or sl.topology} ({sl.generation}, "
        f"{'multi' if sl.multi_host else 'single'}-host)"
    ]
    lines += [f"  {k:16} {v}" for k, v in rows]
    return "\n".join(lines)


def cmd_slice(args: argparse.Namespace) -> int:
    from .catalog import load_catalog
    from .errors import RegistryError
    from .slices import all_slices, slice_of

    cat = load_catalog(args.catalog)
    if args.list:
        if not args.generation or args.name:
            raise RegistryError("--list takes --generation ID and no accelerator type")
        found = all_slices(cat.get(args.generation))
        if args.json:
            _dump([s.to_dict() for s in found])
            return EXIT_OK
        print(
            table(
                ["accelerator type", "topology", "chips", "VMs", "chips/VM", "machine type"],
                [
                    [
                        s.accelerator_type or "-",
                        s.topology,
                        s.chips,
                        s.vms,
                        s.chips_per_vm,
                        s.machine_type,
                    ]
                    for s in found
                ],
            )
        )
        return EXIT_OK
    if not args.name:
        raise RegistryError(
            "give an accelerator type (v5p-128) or a topology with --generation (4x4x8)"
        )
    sl = slice_of(cat, args.name, generation=args.generation, machine_type=args.machine_type)
    if args.json:
        _dump(sl.to_dict())
    else:
        print(safe_lines(slice_text(sl)))
    return EXIT_OK


def _detection_text(d) -> str:
    lines = []
    if d.generation:
        lines.append(f"TPU: {d.generation} ({d.status}: {d.reason})")
    elif d.status == "none":
        lines.append(f"No TPU found ({d.reason}).")
    else:
        lines.append(f"TPU generation not decided: {d.status}: {d.reason}")
    lines.append(
        f"chips per host: {d.chips_per_host or '-'}   slice chips: {d.slice_chips or '-'}   "
        f"topology: {d.topology or '-'}"
    )
    if d.slice is not None:
        sl = d.slice
        vms = f"{sl.vms} VM{'s' if sl.vms != 1 else ''}"
        lines.append(
            f"slice: {sl.accelerator_type or sl.topology}, {vms} of {sl.machine_type} "
            f"({sl.chips_per_vm} chips each)"
        )
    if d.findings:
        lines.append("")
        lines.append(
            table(
                ["detector", "kind", "value", "candidates", "status", "source"],
                [
                    [
                        f.evidence.detector,
                        f.evidence.kind,
                        f.evidence.value,
                        ", ".join(f.candidates) or "-",
                        f.status,
                        f.evidence.source,
                    ]
                    for f in d.findings
                ],
            )
        )
    for c in d.conflicts:
        lines.append(f"conflict: {c}")
    for f in d.faults:
        lines.append(f"detector fault: {f.plugin}: {f.message}")
    return "\n".join(lines)


def cmd_detect(args: argparse.Namespace) -> int:
    from .catalog import load_catalog
    from .detection import detect

    d = detect(
        load_catalog(args.catalog),
        simulate=args.simulate,
        allow_runtime_init=args.probe,
        strict=args.strict,
    )
    if args.json:
        _dump(d.to_dict())
    else:
        print(safe_lines(_detection_text(d)))
    if args.require and not d.generation:
        return EXIT_NO_TPU
    return EXIT_OK


def _workload(args: argparse.Namespace, notes: list[str] | None = None):
    """The workload of ``resolve``/``doctor``: from --hf-config, where explicit --heads,
    --kv-heads and --head-dim win over the file (each such choice appended to ``notes``),
    else from those three flags."""
    from .errors import TuningError
    from .workload import Workload

    limits = {
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "page_size": args.page_size,
        "tensor_parallel": args.tp,
        "q_dtype": args.q_dtype,
        "kv_dtype": args.kv_dtype,
        "sliding_window": args.sliding_window,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "attention_sinks": args.attention_sinks,
    }
    limits = {k: v for k, v in limits.items() if v is not None}
    shape = {"num_q_heads": args.heads, "num_kv_heads": args.kv_heads, "head_dim": args.head_dim}
    if args.hf_config:
        shape = {k: v for k, v in shape.items() if v is not None}
        return Workload.from_hf_config(args.hf_config, notes=notes, **shape, **limits)
    if args.kv_lora_rank and args.qk_rope_head_dim:  # MLA: one shared latent per token
        if shape["num_kv_heads"] is None:
            shape["num_kv_heads"] = 1
        if shape["head_dim"] is None:
            shape["head_dim"] = args.kv_lora_rank + args.qk_rope_head_dim
    if None in shape.values():
        raise TuningError(
            "give the attention shape: --hf-config PATH, or --heads N --kv-heads N --head-dim N"
        )
    return Workload(**shape, **limits)


def vllm_flags(cfg) -> list[str]:
    """What to pass to vLLM for the same knobs without the plugin."""
    from .kernels import rpa_v3_rejection

    page = cfg.value("page_size")
    out = [f"--block-size {page}"]
    for var, knob in (
        ("RPA_V3_DECODE_BLOCK_SIZES", "rpa_v3.d_block_sizes"),
        ("RPA_V3_PREFILL_BLOCK_SIZES", "rpa_v3.p_block_sizes"),
        ("RPA_V3_MIXED_BLOCK_SIZES", "rpa_v3.m_block_sizes"),
    ):
        v = cfg.value(knob)
        if v is None:
            continue
        why = rpa_v3_rejection(v, page)
        if why:
            out.append(f"# {var} left unset: {why}; the kernel's own default applies")
        else:
            out.append(f"export {var}={','.join(map(str, v))}")
    return out


def cmd_resolve(args: argparse.Namespace) -> int:
    from .attention import plan
    from .errors import UsageError
    from .resolution import resolve

    fmt = args.format
    if args.json and fmt not in ("text", "json"):
        raise UsageError(f"--json and --format {fmt} ask for two outputs: give one")
    if args.explain and (args.json or fmt != "text"):
        given = "--json" if args.json else f"--format {fmt}"
        raise UsageError(
            f"--explain is text output and {given} is another: give one (the JSON holds every "
            "knob's layer and note)"
        )
    notes: list[str] = []
    w = _workload(args, notes)
    cfg = resolve(
        w,
        simulate=args.simulate,
        overrides=args.overrides,
        allow_runtime_init=args.probe,
        strict=args.strict,
        catalog_dirs=tuple(args.catalog),
    )
    if args.json or fmt == "json":
        out = {**cfg.to_dict(), "plan": plan(cfg).to_dict(), "vllm": vllm_flags(cfg)}
        _dump({**out, "workload_notes": notes})
    elif fmt == "vllm":
        print(f"# {cfg.spec.id}: equivalent vLLM settings without the tpu-registry plugin")
        for line in vllm_flags(cfg):
            print(line)
        v3 = cfg.value("rpa_v3.vmem_limit_bytes")
        if v3 is not None:
            print(
                f"# RPA v3 VMEM limit: {v3} bytes (tpu-inference's kernel default is the whole "
                "core VMEM)"
            )
    elif args.explain:
        lines = cfg.explain().split("\n")
        at = next((i + 1 for i, x in enumerate(lines) if x.startswith("workload:")), len(lines))
        lines[at:at] = [f"  workload note: {n}" for n in notes]
        print(safe_lines("\n".join(lines)))
    else:
        d = cfg.detection
        _say(f"{cfg.spec.id} ({cfg.spec.name}): {d.status}: {d.reason}")
        print(
            table(
                ["knob", "value", "layer"],
                [
                    [
                        k,
                        ",".join(map(str, v.value)) if isinstance(v.value, tuple) else v.value,
                        v.layer,
                    ]
                    for k, v in cfg.knobs.items()
                ],
            )
        )
        for f in cfg.tuning.faults:
            _say(f"policy fault: {f.plugin}: {f.message}")
        for n in notes + list(cfg.notes):
            _say(f"note: {n}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    given = args.hf_config or any(v is not None for v in (args.heads, args.kv_heads, args.head_dim))
    r = doctor.report(
        _workload(args) if given else None,
        simulate=args.simulate,
        overrides=args.overrides,
        allow_runtime_init=args.probe,
        strict=args.strict,
        catalog_dirs=tuple(args.catalog),
    )
    if args.json:
        _dump(r)
    else:
        print(safe_lines(doctor.text(r)))
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from . import settings
    from .plugins import get_plugins

    plugins = get_plugins()
    infos = plugins.describe()
    faults = plugins.load_faults + plugins.settings_faults
    if args.json:
        _dump(
            {
                "plugins": [i.to_dict() for i in infos],
                "load_faults": [f.to_dict() for f in faults],
                "settings": [asdict(s) for s in settings.all_settings()],
            }
        )
        return EXIT_OK
    print(
        table(
            ["name", "kind", "distribution", "version", "hooks"],
            [[i.name, i.kind, i.distribution, i.version, ", ".join(i.hooks)] for i in infos],
        )
    )
    for f in faults:
        _say(f"plugin {f.plugin}: {f.message}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------


def _version() -> str:
    from .version import __version__  # equal to the installed metadata (a test holds them)

    return __version__


COMMANDS = (
    "list",
    "show",
    "slice",
    "validate",
    "schema",
    "detect",
    "resolve",
    "doctor",
    "plugins",
)


class _Unbuilt:
    """Stands in for the parser of a command that is not running: building every command's
    arguments took 4 ms of each start, and a run parses one command's."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line. With ``only`` (the command being run), the other commands are left
    out; their help and parsing are what the full parser gives."""
    p = argparse.ArgumentParser(
        prog="tpu-registry",
        description="Facts and kernel knobs for Google TPU generations.",
        epilog="Exit codes: 0 ok, 2 invalid input, 3 no TPU (detect --require), 130 interrupted, "
        "1 internal error.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str, json_help: str = JSON_HELP) -> argparse.ArgumentParser:
        assert name in COMMANDS, name
        if only is not None and name != only:
            return _Unbuilt()  # type: ignore[return-value]
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help=json_help)
        sp.set_defaults(fn=fn)
        return sp

    def catalog_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--catalog",
            action="append",
            default=[],
            metavar="DIR",
            help="extra folder of generation files (repeatable)",
        )

    sp = add("list", cmd_list, "list the generations in the catalog")
    catalog_opt(sp)
    sp = add("show", cmd_show, "everything about one generation, with sources")
    sp.add_argument("name", help="id, alias or identifier (e.g. v6e, 'TPU v5 lite', v5p-8)")
    catalog_opt(sp)
    sp = add(
        "slice",
        cmd_slice,
        "a slice: topology, chips, cores, hosts, VMs, machine type, wraparound, ICI and DCN",
    )
    sp.add_argument("name", nargs="?", help="accelerator type (v5p-128) or topology (4x4x8)")
    sp.add_argument("--generation", metavar="ID", help="the generation of a topology")
    sp.add_argument("--machine-type", metavar="TYPE", help="one of the VM types the shape allows")
    sp.add_argument("--list", action="store_true", help="every slice of --generation")
    catalog_opt(sp)
    sp = add("validate", cmd_validate, "check generation files, tuning tables and overrides files")
    sp.add_argument(
        "paths", nargs="*", help="files or folders (default: the whole catalog and tuning tables)"
    )
    sp = add(
        "schema",
        cmd_schema,
        "JSON Schema of a data file (for editors such as Even Better TOML); always JSON",
        json_help="accepted for symmetry with the other commands: the schema is always JSON",
    )
    sp.add_argument(
        "--kind",
        choices=["generation", "table", "overrides"],
        default="generation",
        help="which data file: a generation file (default), a tuning table or an overrides file",
    )

    for name, fn, help in (
        ("detect", cmd_detect, "which TPU this host has, and why"),
        (
            "resolve",
            cmd_resolve,
            "the knobs for a workload on this (or a simulated) TPU, and who chose each",
        ),
        (
            "doctor",
            cmd_doctor,
            "installed versions, what the registry and the vLLM plugin would apply, and what "
            "they cannot reach (for bug reports)",
        ),
    ):
        sp = add(name, fn, help)
        sp.add_argument(
            "--simulate",
            metavar="ID",
            help="act as if this generation were detected (shown as simulated)",
        )
        sp.add_argument(
            "--probe",
            action="store_true",
            help="allow initialising JAX / torch_xla to ask them (slow; may lock the TPU)",
        )
        sp.add_argument("--strict", action="store_true", help="treat faulty plugins as errors")
        catalog_opt(sp)
        if name == "detect":
            sp.add_argument("--require", action="store_true", help="exit 3 when no TPU is found")
        else:
            sp.add_argument(
                "--hf-config",
                metavar="PATH",
                help="a Hugging Face config.json for the attention shape; max_model_len is its "
                "max_position_embeddings capped at 8192 (else 2048) unless --max-model-len is "
                "given; --heads, --kv-heads and --head-dim win over it",
            )
            for flag, dest, what in (
                ("--heads", "heads", "query heads of the model"),
                ("--kv-heads", "kv_heads", "KV heads (as many as --heads for MHA, 1 for MQA)"),
                ("--head-dim", "head_dim", "dimension of one attention head"),
                ("--max-model-len", "max_model_len", "longest sequence served (default 2048)"),
                ("--max-num-seqs", "max_num_seqs", "sequences in one batch (default 256)"),
                (
                    "--max-num-batched-tokens",
                    "max_num_batched_tokens",
                    "tokens in one batch (default 2048)",
                ),
                ("--page-size", "page_size", "fix the KV-cache page (vLLM --block-size)"),
                ("--tp", "tp", "tensor-parallel degree: heads are split across chips"),
                ("--sliding-window", "sliding_window", "attention window in tokens, if any"),
            ):
                sp.add_argument(flag, dest=dest, type=int, metavar="N", help=what)
            sp.add_argument(
                "--kv-lora-rank",
                dest="kv_lora_rank",
                type=int,
                metavar="N",
                help="MLA (DeepSeek V2/V3, Kimi): latent width; with --qk-rope-head-dim, "
                "--kv-heads defaults to 1 and --head-dim to their sum",
            )
            sp.add_argument(
                "--qk-rope-head-dim",
                dest="qk_rope_head_dim",
                type=int,
                metavar="N",
                help="MLA: rope width stored beside the latent",
            )
            sp.add_argument(
                "--attention-sinks",
                dest="attention_sinks",
                action="store_const",
                const=True,
                help="per-head attention sinks (gpt-oss; head dim 64 only)",
            )
            sp.add_argument("--q-dtype", metavar="T", help="query dtype (default bf16)")
            sp.add_argument(
                "--kv-dtype", metavar="T", help="KV-cache dtype: bf16, fp8 (e4m3), fp8_e5m2, int8"
            )
            sp.add_argument(
                "--overrides",
                metavar="PATH",
                help="a TOML overrides file (else TPU_REGISTRY_OVERRIDES)",
            )
            if name == "doctor":
                continue
            sp.add_argument("--explain", action="store_true", help="print the full reasoning")
            sp.add_argument(
                "--format",
                choices=["text", "json", "vllm"],
                default="text",
                help="text (default); json (as --json); vllm: the equivalent vLLM flags and "
                "variables. One output per run: --json with vllm, or --explain with json or "
                "vllm, is an error",
            )

    add("plugins", cmd_plugins, "installed plugins, where they come from, their hooks")
    return p


def _json_error(kind: str, code: int, problems: list[dict]) -> None:
    """With --json a failure is JSON on stdout too, so a script never parses text:
    ``{"error": {"type": ..., "exit": ..., "problems": [{"path", "line", "field", "message",
    "hint"}, ...]}}`` (the human lines still go to stderr)."""
    try:
        _dump({"error": {"type": kind, "exit": code, "problems": problems}})
    except BrokenPipeError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import RegistryError, cli_warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    # Warnings (such as a catalog folder or overrides file writable by other users) go to
    # stderr for the duration of the command.
    cli_warnings(True)
    as_json = getattr(args, "json", False) or getattr(args, "format", None) == "json"
    try:
        return args.fn(args)
    except RegistryError as e:
        for p in e.problems:
            print(f"error: {safe(p)}", file=sys.stderr)
        if as_json:
            _json_error(type(e).__name__, EXIT_INVALID, [p.to_dict() for p in e.problems])
        return EXIT_INVALID
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # never a traceback for users; the debug variable shows it
        if os.environ.get("TPU_REGISTRY_DEBUG"):
            raise
        hint = "set TPU_REGISTRY_DEBUG=1 for details and report it"
        print(f"internal error: {type(e).__name__}: {safe(e)} ({hint})", file=sys.stderr)
        if as_json:
            problem = {"path": "", "line": None, "field": "", "hint": hint}
            problem["message"] = f"{type(e).__name__}: {e}"
            _json_error("InternalError", EXIT_INTERNAL, [problem])
        return EXIT_INTERNAL
    finally:
        cli_warnings(False)


def run() -> None:
    """The ``tpu-registry`` console script: ``main()``, then exit with its code.

    The command's work is done when ``main()`` returns; what is left is the interpreter's last
    garbage collection, which walks every object of every module imported (7 ms of a 50 ms
    ``detect --json``, measured with and without it). Freezing the objects first makes that
    collection skip them: the process ends and the memory goes back all at once anyway. Only
    the console script does this; ``main()`` called in a program leaves its collector alone.
    """
    code = main()
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
