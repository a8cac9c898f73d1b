"""The tiny model of the end-to-end tests, built at test time (no hub), and its float32 oracle.

A random Llama with GQA (4 query heads, 2 KV heads) and head dim 128, the shape that takes
the backend's RPA v3 path (head dim 64 is handed to tpu-inference's hd64 kernel). Its weights
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


def build(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for proj, gain in ((a.q_proj, QK_GAIN), (a.k_proj, QK_GAIN), (a.v_proj, VO_GAIN), (a.o_proj, VO_GAIN)):
                proj.weight.mul_(gain)
        model.lm_head.weight.mul_(LM_HEAD_GAIN)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {ch: 3 + i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=CONFIG["max_position_embeddings"])
    fast.save_pretrained(path)
    return path


def float32_logits(path: Path, sequences: list[list[int]]) -> list:
    """transformers' float32 forward of the saved weights, one full sequence at a time."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            out.append(model(torch.tensor([seq])).logits[0].double().numpy())
    return out
