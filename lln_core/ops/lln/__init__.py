"""Causal LLN attention: naive reference, chunked prefill, recurrent decode step."""

from lln_core.ops.lln.chunk import LLNParts, lln_attention, lln_chunk_parts
from lln_core.ops.lln.naive import naive_lln_attention
from lln_core.ops.lln.recurrent import lln_step, lln_step_parts

__all__ = [
    "LLNParts",
    "lln_attention",
    "lln_chunk_parts",
    "lln_step",
    "lln_step_parts",
    "naive_lln_attention",
]
