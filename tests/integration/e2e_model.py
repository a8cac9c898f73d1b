"""What the end-to-end tests of both stacks share: the tiny model, built at test time (no hub),
the prompts, and the float32 oracle the generated tokens are checked against.

A random Llama with GQA (4 query heads, 2 KV heads) and head dim 128, the shape that takes
the backend's RPA v3 path (``build(..., head_dim=64)`` makes the hd64 kernel's shape). Its weights
are drawn in float32, rounded to bfloat16 and saved as bfloat16 with ``save_pretrained``, so
vLLM (bfloat16) and the float32 oracle read exactly the same numbers.

Random weights at the usual scale give flat logits, where bfloat16 noise decides greedy
choices and a wrong attention barely shows. The attention projections and the LM head are
therefore scaled up: attention then dominates the residual stream, logits spread over several
units, and a wrong softmax scale changes most greedy tokens (see the negative control).

The tokenizer is a byte-level BPE with no merges, built with ``tokenizers`` offline: 256 byte
tokens and ``<s>``/``</s>``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SEED = 1234
VOCAB = 512  # 258 used by the tokenizer; the rest can still be generated (random weights)
CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.02,
)
QK_GAIN, VO_GAIN, LM_HEAD_GAIN = 4.0, 8.0, 10.0
LAYERS = CONFIG["num_hidden_layers"]
Q_HEADS, KV_HEADS, HEAD_DIM = (
    CONFIG["num_attention_heads"],
    CONFIG["num_key_value_heads"],
    CONFIG["head_dim"],
)

MAX_TOKENS = 48  # greedy tokens per prompt
MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 512, 4, 128
_words = (
    "the a of page kernel block cache token query value head tensor chip memory layer model prompt"
).split()
_rng = random.Random(5)
PROMPTS = [
    "Hello, TPU.",
    "One registry for every chip generation.",
    # 336 tokens: prefilled in three chunks of at most MAX_NUM_BATCHED_TOKENS, over many pages
    " ".join(_rng.choice(_words) for _ in range(60)),
    "ok",
]
LONG = 2

# A greedy token may differ from the float32 argmax only where the two are this close (in
# logits; the model's logits have a standard deviation of about 3 and a median gap of about
# 0.75 between the best two tokens). The engines compute in bfloat16.
MARGIN = 0.25


def build(path: Path, **changes) -> Path:
    """The tiny model, with ``changes`` to CONFIG (e.g. ``head_dim=64`` for the hd64 kernel)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **changes})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for proj, gain in (
                (a.q_proj, QK_GAIN),
                (a.k_proj, QK_GAIN),
                (a.v_proj, VO_GAIN),
                (a.o_proj, VO_GAIN),
            ):
                proj.weight.mul_(gain)
        model.lm_head.weight.mul_(LM_HEAD_GAIN)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {ch: 3 + i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=CONFIG["max_position_embeddings"],
    )
    fast.save_pretrained(path)
    return path


class Oracle:
    """Teacher-forced comparison with transformers' float32 forward of the same weights."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._model = None
        self._logits: dict[tuple[int, ...], object] = {}

    def logits(self, seq: list[int]):
        """float64 NumPy logits of transformers' float32 forward, one row per position."""
        import torch
        from transformers import LlamaForCausalLM

        key = tuple(seq)
        if key not in self._logits:
            if self._model is None:
                self._model = LlamaForCausalLM.from_pretrained(
                    self.path, dtype=torch.float32
                ).eval()
            with torch.no_grad():
                self._logits[key] = (
                    self._model(torch.tensor([list(seq)])).logits[0].double().numpy()
                )
        return self._logits[key]

    def disagreements(
        self, prompt_tokens: list[list[int]], generated: list[list[int]]
    ) -> tuple[list[tuple], int]:
        """Each generated token against the argmax of the float32 forward over the prompt and
        the tokens generated before it. Returns the tokens that lose more than MARGIN logits to
        the argmax, as (prompt, step, token, argmax, loss), and the number of near-ties (a
        token other than the argmax, within MARGIN) accepted."""
        bad, near_ties = [], 0
        for i, (prompt, gen) in enumerate(zip(prompt_tokens, generated, strict=True)):
            rows = self.logits(prompt + gen)
            for j, token in enumerate(gen):
                row = rows[len(prompt) - 1 + j]
                best = int(row.argmax())
                loss = float(row[best] - row[token])
                if loss > MARGIN:
                    bad.append((i, j, token, best, round(loss, 3)))
                elif token != best:
                    near_ties += 1
        return bad, near_ties


def start_engine(
    name: str, spec: dict, child: Path, env_changes: dict, overrides: Path, work: Path
) -> tuple[subprocess.Popen, Path]:
    """Start one engine run in its own process (``child`` reads the spec, writes the result);
    the machine's TPU_REGISTRY_* variables are dropped, ``env_changes`` applied (None unsets)."""
    out = work / f"{name}.json"
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps({**spec, "name": name, "out": str(out)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_REGISTRY")}
    # the overrides file of the run, and not this machine's PCI bus
    env.update(
        TPU_REGISTRY_OVERRIDES=str(overrides), TPU_REGISTRY_SYSFS_ROOT="/nonexistent-sysfs-root"
    )
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    with open(work / f"{name}.log", "w") as log:  # a file, not a pipe: vLLM logs a lot
        p = subprocess.Popen(
            [sys.executable, str(child), str(spec_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
    return p, out


def collect(
    procs: dict[str, tuple[subprocess.Popen, Path]], work: Path, t0: float, timeout: float
) -> dict:
    """Wait for every run (all within ``timeout`` seconds of ``t0``); their results by name."""
    results = {}
    for name, (p, out) in procs.items():
        try:
            rc = p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q, _ in procs.values():
                q.kill()
            log = work / f"{name}.log"
            raise AssertionError(
                f"engine run {name!r} took longer than {timeout} s; log: {log}"
            ) from None
        if rc != 0 or not out.exists():
            tail = (work / f"{name}.log").read_text()[-8000:]
            raise AssertionError(f"engine run {name!r} failed ({rc}):\n{tail}")
        results[name] = json.loads(out.read_text())
    return results
