"""The workload: the attention shape of a model and the limits it is served with.

Built from explicit values, a mapping (``from_dict``) or a Hugging Face ``config.json``
(``from_hf_config``); every field is checked when it is built, with errors that name it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import KW_ONLY, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import Problem, TuningError
from .files import FileRefused, read_capped
from .units import canonical_dtype

# A config.json is a few KiB (the largest, with label maps, a few hundred): anything near this
# cap is not a model config, and reading it whole would cost memory for nothing.
MAX_HF_CONFIG_BYTES = 4 * 1024 * 1024
# --hf-config: max_model_len is the model's max_position_embeddings capped here (a 128K
# context would size every knob for sequences nobody asked for); without it, the default.
HF_MAX_MODEL_LEN_CAP = 8192

# config.json ``model_type``s whose attention has per-head sinks (tpu-inference runs them
# through the head-dim-64 kernel, the only one that takes sinks).
SINK_MODEL_TYPES = ("gpt_oss",)


@dataclass(frozen=True)
class Workload:
    """What a tuning decision needs to know about the model and the serving limits."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    _: KW_ONLY
    q_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int | None = None  # fixed by the user (vLLM --block-size)
    sliding_window: int | None = None
    tensor_parallel: int = 1
    # The padded token count of one kernel call (vLLM compiles one graph per bucket); None
    # means the largest, max_num_batched_tokens. Upstream sizes query blocks per call.
    num_tokens: int | None = None
    # Per-head attention sinks (gpt-oss): only tpu-inference's head-dim-64 kernel takes them.
    attention_sinks: bool = False
    # Multi-head latent attention (DeepSeek V2/V3, Kimi): the cache holds one latent of
    # kv_lora_rank plus the rope part per token; head_dim is their sum, num_kv_heads 1.
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None

    def __post_init__(self) -> None:
        problems = []

        def bad(name: str, msg: str, hint: str) -> None:
            problems.append(Problem("workload", None, name, msg, hint))

        for name in (
            "num_q_heads",
            "num_kv_heads",
            "head_dim",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "tensor_parallel",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, f"must be a positive whole number, got {v!r}", "check the model config")
        for name in (
            "page_size",
            "sliding_window",
            "num_tokens",
            "kv_lora_rank",
            "qk_rope_head_dim",
        ):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                bad(
                    name,
                    f"must be a positive whole number or unset, got {v!r}",
                    "leave it unset to let the registry choose",
                )
        if not isinstance(self.attention_sinks, bool):
            bad("attention_sinks", f"must be true or false, got {self.attention_sinks!r}", "")
        if not problems and (self.kv_lora_rank is None) != (self.qk_rope_head_dim is None):
            bad(
                "kv_lora_rank" if self.kv_lora_rank is None else "qk_rope_head_dim",
                "multi-head latent attention needs both kv_lora_rank and qk_rope_head_dim",
                "give both (config.json has them), or neither for multi-head attention",
            )
        elif not problems and self.is_mla:
            width = self.kv_lora_rank + self.qk_rope_head_dim
            if self.head_dim != width:
                bad(
                    "head_dim",
                    f"{self.head_dim}: with MLA the cache stores kv_lora_rank + "
                    f"qk_rope_head_dim = {width} values per token",
                    f"use head_dim {width}",
                )
            if self.num_kv_heads != 1:
                bad(
                    "num_kv_heads",
                    f"{self.num_kv_heads}: with MLA every query head reads one shared latent",
                    "use num_kv_heads 1",
                )
            if self.attention_sinks:
                bad("attention_sinks", "no MLA kernel takes attention sinks", "")
        if not problems and self.attention_sinks and self.head_dim != 64:
            bad(
                "attention_sinks",
                f"attention sinks need head_dim 64 (tpu-inference's hd64 kernel), got "
                f"{self.head_dim}",
                "tpu-inference raises NotImplementedError for sinks at other head dims",
            )
        if not problems:
            if self.num_q_heads % self.num_kv_heads:
                bad(
                    "num_kv_heads",
                    f"{self.num_kv_heads} KV heads do not divide {self.num_q_heads} query heads",
                    "grouped-query attention needs q heads = k x kv heads",
                )
            if not self.is_mla and self.num_q_heads % self.tensor_parallel:
                bad(
                    "tensor_parallel",
                    f"{self.tensor_parallel}-way tensor parallelism does not divide "
                    f"{self.num_q_heads} query heads",
                    "use a tensor-parallel degree that divides the heads",
                )
            most = 1 << (self.max_model_len - 1).bit_length()
            if self.page_size is not None and self.page_size > most:
                msg = (
                    f"{self.page_size} is above {most}, the most a sequence of max_model_len "
                    f"{self.max_model_len} needs"
                )
                bad("page_size", msg, f"use a page of at most {most}")
            elif self.page_size is not None and self.page_size & (self.page_size - 1):
                bad(
                    "page_size",
                    f"must be a power of two, got {self.page_size}",
                    "use 16, 32, 64, 128 or 256",
                )
            if self.num_tokens is not None and self.num_tokens > self.max_num_batched_tokens:
                msg = (
                    f"{self.num_tokens} is more than max_num_batched_tokens "
                    f"{self.max_num_batched_tokens}"
                )
                bad("num_tokens", msg, "a kernel call takes at most max_num_batched_tokens")
            if self.head_dim > 1024:
                bad(
                    "head_dim",
                    f"{self.head_dim} is beyond any attention kernel's range",
                    "check hidden_size / num_attention_heads",
                )
        for name in ("q_dtype", "kv_dtype"):
            try:
                object.__setattr__(self, name, canonical_dtype(getattr(self, name)))
            except TuningError as e:
                bad(name, str(e.problems[0].message), "")
        if problems:
            raise TuningError(problems)

    @property
    def tokens(self) -> int:
        """Tokens of the kernel call being tuned for (``num_tokens``, else the most)."""
        return self.num_tokens if self.num_tokens is not None else self.max_num_batched_tokens

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    # Per-device view under tensor parallelism. KV heads are replicated when there are
    # fewer of them than devices, as vLLM does. MLA runs data-parallel attention in
    # tpu-inference (tokens are split, every device has every head).
    @property
    def q_heads_per_device(self) -> int:
        return self.num_q_heads if self.is_mla else self.num_q_heads // self.tensor_parallel

    @property
    def kv_heads_per_device(self) -> int:
        return 1 if self.is_mla else max(1, self.num_kv_heads // self.tensor_parallel)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "workload") -> Workload:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TuningError(
                [
                    Problem(
                        where,
                        None,
                        k,
                        "unknown workload field",
                        f"known: {', '.join(sorted(names))}",
                    )
                    for k in unknown
                ]
            )
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise TuningError(
                [Problem(where, None, "", str(e), "give num_q_heads, num_kv_heads and head_dim")]
            ) from None

    @classmethod
    def from_hf_config(
        cls, path: os.PathLike | str, *, notes: list[str] | None = None, **limits: Any
    ) -> Workload:
        """Attention shape from a Hugging Face ``config.json``; serving limits (and any shape
        field) from ``limits``, which win over the file. Without ``max_model_len`` the model's
        ``max_position_embeddings`` is used, capped at 8192, else the default 2048; each
        choice the file did not state is appended to ``notes`` when given."""
        p = Path(path)
        try:
            cfg = json.loads(read_capped(p, MAX_HF_CONFIG_BYTES).decode("utf-8"))
        except FileRefused as e:
            raise TuningError([Problem(str(p), None, "", e.message, e.hint)]) from None
        except UnicodeDecodeError as e:
            msg = f"not valid UTF-8 (byte 0x{e.object[e.start]:02x})"
            raise TuningError(
                [Problem(str(p), None, "", msg, "pass the model's config.json")]
            ) from None
        except json.JSONDecodeError as e:
            raise TuningError(
                [
                    Problem(
                        str(p),
                        e.lineno,
                        "",
                        f"not valid JSON: {e.msg}",
                        "pass the model's config.json",
                    )
                ]
            ) from None
        if not isinstance(cfg, dict):
            raise TuningError(
                [Problem(str(p), None, "", "is not a JSON object", "pass the model's config.json")]
            )
        if "num_attention_heads" not in cfg and cfg.get("text_config") is not None:
            cfg = cfg["text_config"]  # multimodal configs keep the language model's here
            if not isinstance(cfg, dict):
                hint = "pass the language model's config.json"
                raise TuningError(
                    [Problem(str(p), None, "text_config", "is not a JSON object", hint)]
                )
        heads = cfg.get("num_attention_heads")
        if not isinstance(heads, int):
            raise TuningError(
                [
                    Problem(
                        str(p),
                        None,
                        "num_attention_heads",
                        "missing or not a number",
                        "is this a transformer config.json?",
                    )
                ]
            )
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim")
        mla: dict[str, Any] = {}
        if cfg.get("kv_lora_rank") is not None:  # DeepSeek V2/V3, Kimi: the cache holds a latent
            mla = {k: cfg.get(k) for k in ("kv_lora_rank", "qk_rope_head_dim")}
            for k, v in mla.items():
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise TuningError(
                        [
                            Problem(
                                str(p),
                                None,
                                k,
                                f"must be a positive whole number for MLA, got {v!r}",
                                "check the model's config.json",
                            )
                        ]
                    )
            kv, head_dim = 1, mla["kv_lora_rank"] + mla["qk_rope_head_dim"]
        if not head_dim:
            hidden = cfg.get("hidden_size")
            if not isinstance(hidden, int):
                raise TuningError(
                    [
                        Problem(
                            str(p),
                            None,
                            "head_dim",
                            "neither head_dim nor hidden_size is given",
                            "add head_dim",
                        )
                    ]
                )
            head_dim = hidden // heads
        values: dict[str, Any] = {"num_q_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}
        values.update(mla)
        if cfg.get("model_type") in SINK_MODEL_TYPES:
            values["attention_sinks"] = True
        window = cfg.get("sliding_window")
        if (
            isinstance(window, int)
            and window > 0
            and cfg.get("use_sliding_window", True) is not False
        ):
            values["sliding_window"] = window
        said = notes if notes is not None else []
        positions = cfg.get("max_position_embeddings")
        if limits.get("max_model_len") is None:
            if isinstance(positions, int) and not isinstance(positions, bool):
                values["max_model_len"] = min(positions, HF_MAX_MODEL_LEN_CAP)
                if positions > HF_MAX_MODEL_LEN_CAP:
                    said.append(
                        f"max_model_len {HF_MAX_MODEL_LEN_CAP}: the model's "
                        f"max_position_embeddings {positions} capped at {HF_MAX_MODEL_LEN_CAP} "
                        "(give --max-model-len to choose)"
                    )
            else:
                default = cls.__dataclass_fields__["max_model_len"].default
                said.append(
                    f"max_model_len {default}: the default, the config has no "
                    "max_position_embeddings (give --max-model-len to choose)"
                )
        for k, v in limits.items():
            if v is not None and k in values and values[k] != v:
                said.append(f"{k} {v} given explicitly, over {values[k]} from {p}")
        values.update({k: v for k, v in limits.items() if v is not None})
        return cls.from_dict(values, where=str(p))
