"""Attention metadata as tpu-inference's runner lays it out, for the numerics tests: padded to
max_num_seqs, decodes first, distribution (decode, decode, all), query_start_loc padded with
its last value."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from tpu_inference.layers.common.attention_metadata import AttentionMetadata


def runner_metadata(seqs, max_seqs: int, tables, tokens: int) -> AttentionMetadata:
    """``seqs``: (q_len, kv_len) per sequence, decodes first; ``tables``: each sequence's pages;
    ``tokens``: the padded token count of the step."""
    n = sum(ql for ql, _ in seqs)
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : len(seqs) + 1] = np.cumsum([ql for ql, _ in seqs])
    cu[len(seqs) + 1 :] = cu[len(seqs)]
    lens = np.zeros(max_seqs, np.int32)
    lens[: len(seqs)] = [kv for _, kv in seqs]
    positions = np.zeros(tokens, np.int32)
    positions[:n] = np.concatenate([np.arange(kv - ql, kv) for ql, kv in seqs])
    decodes = sum(1 for ql, _ in seqs if ql == 1)
    return AttentionMetadata(
        input_positions=jnp.asarray(positions),
        block_tables=jnp.asarray(np.concatenate(tables).astype(np.int32)),
        seq_lens=jnp.asarray(lens),
        query_start_loc=jnp.asarray(cu),
        request_distribution=jnp.asarray(np.array([decodes, decodes, len(seqs)], np.int32)),
    )
