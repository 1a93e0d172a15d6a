"""Configuration of LLN decoders: a Llama configuration plus the attention kernel and its knobs."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from lln_core.ops.far import FAR_POSITIONS

ATTENTION_KERNELS = ("softmax", "lln", "lln_diag", "ea")
FEATURE_MAPS = ("scale", "linear")
SPARSE_SELECTIONS = ("surprise",)
KV_CACHE_DTYPES = ("auto", "bfloat16")


@strict
class LLNConfig(LlamaConfig):
    """Llama family (RoPE, GQA, RMSNorm, SwiGLU, optional q/k/v bias) with a choice of attention.

    attention_kernel: "softmax" (reference, KV cache), "lln", "lln_diag" (LLN + local softmax),
    "ea" (expressive attention). For lln_diag: local_kind "window" | "block", local_size (window
    or block length), num_sinks (first tokens kept), combine "joint" | "average". chunk_size:
    prefill chunk of the LLN kernels. feature_map (lln, lln_diag): "scale" (the paper:
    exp(alpha q), exp(beta k)) or "linear" (a learned per-head D x D map before the scale:
    exp(alpha W_q q), exp(beta W_k k), W at identity until distilled). alpha/beta (and the mix,
    the maps) are per-layer, per-head parameters stored in the checkpoint, not config fields.
    sparse_cache_size (lln_diag, joint): G exact key/value pairs kept beyond the window, chosen
    by sparse_select ("surprise": the model's own next-token loss, the largest within
    sparse_span tokens either side; `models/selection.py`); 0 turns the tier off.
    kv_cache_dtype (lln_diag): storage of the window's and the sparse cache's keys and values,
    "auto" (the state's float32, float64 for float64 weights) or "bfloat16" (half the bytes:
    keys and values are rounded to it once, as they are made, so prefill and decode agree).
    far_positions (lln_diag, joint): the rotary positions of the far tier (the sinks once the
    window has passed them, the sparse cache, the LLN state): "original" (each key where it was
    written: distances grow with the context, past the trained range) or "fixed" (every far key
    at far_distance from the query, the sinks at far_sink_distance minus their position;
    `lln_core/ops/far.py`) or "grouped" (as "fixed", but the sparse cache's pairs at grouped
    distances that keep their order: far_group text tokens a position, the group doubling as
    the context grows so that no pair is read past far_max_distance). far_sink_distance None:
    far_distance.
    """

    model_type = "lln_llama"

    attention_kernel: str = "lln_diag"
    local_kind: str = "window"
    local_size: int = 64
    num_sinks: int = 4
    combine: str = "joint"
    feature_map: str = "scale"
    chunk_size: int = 64
    ea_eps: float = 1e-6
    sparse_cache_size: int = 0
    sparse_span: int = 8
    sparse_select: str = "surprise"
    kv_cache_dtype: str = "auto"
    far_positions: str = "original"
    far_distance: int = 1024
    far_sink_distance: int | None = None
    far_group: int = 8
    far_max_distance: int = 4096
    # Qwen2 has biases on q/k/v but not on o; None means "as attention_bias" (Llama).
    o_proj_bias: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention_kernel must be one of {ATTENTION_KERNELS}, "
                f"got {self.attention_kernel!r}"
            )
        if self.local_kind not in ("window", "block"):
            raise ValueError(f"local_kind must be 'window' or 'block', got {self.local_kind!r}")
        if self.combine not in ("joint", "average"):
            raise ValueError(f"combine must be 'joint' or 'average', got {self.combine!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.combine == "joint" and self.local_kind != "window":
            raise ValueError("combine='joint' needs local_kind='window'")
        if self.local_size < 1 or self.num_sinks < 0 or self.chunk_size < 1:
            raise ValueError("local_size and chunk_size must be >= 1, num_sinks >= 0")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        self._check_sparse()
        self._check_far()

    @property
    def uses_far_positions(self) -> bool:
        """Whether the far tier reads fixed rotary distances (LLN+Diag, joint, "fixed")."""
        return (
            self.far_positions in ("fixed", "grouped")
            and self.attention_kernel == "lln_diag"
            and self.combine == "joint"
        )

    def _check_far(self) -> None:
        if self.far_positions not in FAR_POSITIONS:
            raise ValueError(
                f"far_positions must be one of {FAR_POSITIONS}, got {self.far_positions!r}"
            )
        sink_distance = self.far_sink_distance
        if self.far_distance < 0 or (sink_distance is not None and sink_distance < 0):
            raise ValueError("far_distance and far_sink_distance must be >= 0")
        if self.far_group < 1 or self.far_max_distance < self.local_size:
            raise ValueError("far_group must be >= 1 and far_max_distance >= local_size")

    @property
    def uses_sparse_cache(self) -> bool:
        """The sparse tier is part of LLN+Diag; other kernels (the softmax teacher run on the
        same checkpoint) ignore its settings."""
        return bool(self.sparse_cache_size) and self.attention_kernel == "lln_diag"

    def _check_sparse(self) -> None:
        if self.sparse_cache_size < 0 or self.sparse_span < 0:
            raise ValueError("sparse_cache_size and sparse_span must be >= 0")
        if not self.sparse_cache_size:
            return
        if self.attention_kernel == "lln_diag" and self.combine != "joint":
            raise ValueError("a sparse cache needs combine='joint' (one normalisation)")
        if self.sparse_select not in SPARSE_SELECTIONS:
            raise ValueError(
                f"sparse_select must be one of {SPARSE_SELECTIONS}, got {self.sparse_select!r}"
            )
        if self.sparse_span >= self.local_size:
            raise ValueError("sparse_span must be smaller than the window (local_size)")
