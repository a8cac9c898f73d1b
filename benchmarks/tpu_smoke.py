"""TPU smoke benchmark: vLLM's offline ``LLM`` API with and without
``--attention-backend TPU_REGISTRY``.

NOT YET RUN ON A TPU. It was written and checked (``--help``, the no-TPU refusal) on a CPU-only
machine; its first real run on a TPU VM is still to come, so treat its numbers as unreviewed.

On a TPU VM with vLLM, tpu-inference and this repository's plugin installed::

    pip install -e . -e plugins/tpu-registry-vllm
    python benchmarks/tpu_smoke.py                                    # Qwen/Qwen2.5-1.5B-Instruct
    python benchmarks/tpu_smoke.py --model /path/to/model --prompts 128 --max-tokens 256

It runs the same greedy generation twice, each in its own process so that neither run's
compiled kernels, caches or plugin state reach the other:

- ``upstream``: ``TPU_REGISTRY_VLLM=off``, so the plugin stays out entirely (tpu-inference's
  own page size and kernel defaults);
- ``registry``: ``--attention-backend TPU_REGISTRY`` with the plugin on (the registry's page
  size, block sizes and VMEM limit; its start-up line is in that run's log).

It prints generated tokens per second side by side and their ratio (registry / upstream). With
``baseline`` knobs the two should be close: the registry then reproduces tpu-inference's own
numbers, so a ratio far from 1 points at overrides, tables or noise (use ``--repeats``).

It refuses to run (exit status 2) unless ``tpu_registry.detect`` finds a TPU on this host from
the hardware itself (PCI ids or a JAX device kind): an explicit ``TPU_REGISTRY_GENERATION`` or
a ``TPU_ACCELERATOR_TYPE`` variable alone does not count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

EXIT_NO_TPU = 2
HARDWARE_EVIDENCE = ("pci", "device_kind")
# Head dim 128 (12 query / 2 KV heads): the RPA v3 kernel the backend drives (head dim 64 goes
# to tpu-inference's hd64 kernel unchanged).
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
# MODEL_IMPL_TYPE=vllm in both runs: by default tpu-inference runs Qwen2 as a JAX module whose
# attention never calls a backend, and the comparison would measure only the page size.
RUNS = {
    "upstream": ({"TPU_REGISTRY_VLLM": "off", "MODEL_IMPL_TYPE": "vllm"}, None),
    "registry": ({"TPU_REGISTRY_VLLM": "auto", "MODEL_IMPL_TYPE": "vllm"}, "TPU_REGISTRY"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Not yet run on a TPU: see the module docstring.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face id or local path (default {DEFAULT_MODEL})",
    )
    p.add_argument("--prompts", type=int, default=64, help="prompts per batch (default 64)")
    p.add_argument(
        "--max-tokens", type=int, default=128, help="tokens generated per prompt (default 128)"
    )
    p.add_argument(
        "--max-model-len", type=int, default=2048, help="vLLM --max-model-len (default 2048)"
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="vLLM --max-num-seqs (default 64)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed batches per run; the best is kept (default 3)"
    )
    p.add_argument("--only", choices=sorted(RUNS), help="run one side only")
    p.add_argument("--worker", choices=sorted(RUNS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def tpu_or_exit() -> str:
    from tpu_registry import detect

    d = detect()
    hardware = [
        f
        for f in d.findings
        if f.evidence.kind in HARDWARE_EVIDENCE and f.status in ("agrees", "decides")
    ]
    if d.generation is None or d.status != "detected" or not hardware:
        kinds = ", ".join(sorted({f.evidence.kind for f in d.findings}))
        why = (
            f"{d.status}: {d.reason}"
            if not d.generation or d.status != "detected"
            else f"{d.generation} only from {kinds}, no PCI or JAX device evidence"
        )
        print(
            f"tpu_smoke: no TPU detected on this host ({why}); this benchmark needs a TPU VM.",
            file=sys.stderr,
        )
        sys.exit(EXIT_NO_TPU)
    return d.generation


def worker(args: argparse.Namespace) -> None:
    """One side, in its own process: build the engine, warm up, time greedy generation."""
    from vllm import LLM, SamplingParams

    _, backend = RUNS[args.worker]
    kwargs = {"attention_backend": backend} if backend else {}
    llm = LLM(
        model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, **kwargs
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [f"Write a short story about the number {i}." for i in range(args.prompts)]
    llm.generate(prompts[: min(4, len(prompts))], params, use_tqdm=False)  # compile
    best = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if best is None or tokens / elapsed > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
    print("TPU_SMOKE_RESULT " + json.dumps(best), flush=True)


def run_side(name: str, args: argparse.Namespace) -> dict:
    env_changes, _ = RUNS[name]
    env = {**os.environ, **env_changes}
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--model",
        args.model,
        "--prompts",
        str(args.prompts),
        "--max-tokens",
        str(args.max_tokens),
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--repeats",
        str(args.repeats),
    ]
    print(f"tpu_smoke: running {name} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # its stderr passes through
    lines = [line for line in p.stdout.splitlines() if line.startswith("TPU_SMOKE_RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-8000:])
        raise SystemExit(
            f"tpu_smoke: the {name} run failed (exit {p.returncode}); "
            "the end of its output is above"
        )
    for line in p.stdout.splitlines():
        if "tpu-registry: " in line:
            print(f"  {name}: {line.strip()}", file=sys.stderr)
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    gen = tpu_or_exit()
    names = [args.only] if args.only else list(RUNS)
    results = {name: run_side(name, args) for name in names}
    print(
        f"\n{gen}: {args.model}, {args.prompts} prompts x {args.max_tokens} tokens, "
        f"max_model_len {args.max_model_len}, best of {args.repeats}"
    )
    print(f"{'run':10} {'tokens':>8} {'seconds':>9} {'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:10} {r['tokens']:>8} {r['seconds']:>9.2f} {r['tokens_per_s']:>10.1f}")
    if len(results) == 2:
        ratio = results["registry"]["tokens_per_s"] / results["upstream"]["tokens_per_s"]
        print(f"ratio registry/upstream: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
