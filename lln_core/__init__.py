"""LLN attention math: kernels, typed states, moment matching and the paper's instruments."""

from lln_core.instruments import (
    attention_entropy,
    attention_matrices,
    effective_temperature,
    log_attention_variance,
    spectral_gap,
)
from lln_core.moments import head_std, lln_constants, moment_match
from lln_core.ops.common import enable_flush_denormal
from lln_core.ops.ea import ea_attention, ea_features, ea_step, naive_ea_attention
from lln_core.ops.lln import lln_attention, lln_step, naive_lln_attention
from lln_core.ops.lln_diag import (
    empty_lln_diag_state,
    lln_diag_attention,
    lln_diag_step,
    naive_lln_diag_attention,
)
from lln_core.ops.softmax import LocalSpec, softmax_attention, softmax_kv_attention
from lln_core.ops.sparse import SparsePlan, leaving_plan
from lln_core.state import EAState, KVState, LLNState, LocalKV, SparseKV, kv_cache_bytes

__all__ = [
    "EAState",
    "KVState",
    "LLNState",
    "LocalKV",
    "LocalSpec",
    "SparseKV",
    "SparsePlan",
    "attention_entropy",
    "attention_matrices",
    "ea_attention",
    "ea_features",
    "ea_step",
    "effective_temperature",
    "empty_lln_diag_state",
    "enable_flush_denormal",
    "head_std",
    "kv_cache_bytes",
    "leaving_plan",
    "lln_attention",
    "lln_constants",
    "lln_diag_attention",
    "lln_diag_step",
    "lln_step",
    "log_attention_variance",
    "moment_match",
    "naive_ea_attention",
    "naive_lln_attention",
    "naive_lln_diag_attention",
    "softmax_attention",
    "softmax_kv_attention",
    "spectral_gap",
]
