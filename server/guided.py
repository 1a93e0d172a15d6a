"""Structured outputs: a JSON schema, any JSON object, a regex, a choice of strings or a Lark
grammar, compiled by llguidance into one matcher per sequence whose token mask is applied to
that sequence's logits before sampling.

llguidance (a backend of vLLM and llama.cpp) was chosen over xgrammar because it has no
dependencies (xgrammar pulls triton and a TVM runtime into a CPU server) and needs no
precompilation per tokenizer beyond building its tokenizer once; the masks of a JSON schema
cost 0.27 ms per decode step at 1 sequence and 2 ms at 16 (`bench_engine.py --guided`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import llguidance.hf
import torch
from torch import Tensor

from server.request import GuidedSpec

# Compact JSON: a small model given free whitespace may spend its tokens on it.
JSON_OPTIONS = {"whitespace_flexible": False}
GRAMMAR_CACHE = 64  # compiled grammars kept (clients repeat their schemas)


class GuidedDecoding:
    """Compiles specs for one tokenizer (checked: a bad schema or regex is a ValueError with
    llguidance's message) and masks logits batches for the matchers of their rows."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._grammars: OrderedDict[GuidedSpec, str] = OrderedDict()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about a second for a 49K vocabulary)."""
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, self.vocab_size)
        return self._tokenizer

    def compile(self, spec: GuidedSpec) -> str:
        """The validated llguidance grammar of `spec` (cached)."""
        if spec in self._grammars:
            self._grammars.move_to_end(spec)
            return self._grammars[spec]
        grammar = _grammar(spec)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"the {_NAMES[spec.kind]} cannot be used: {error.strip()}")
        self._grammars[spec] = grammar
        if len(self._grammars) > GRAMMAR_CACHE:
            self._grammars.popitem(last=False)
        return grammar

    def matcher(self, spec: GuidedSpec) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.compile(spec), log_level=0)

    def allowed(self, matchers: Sequence[llguidance.LLMatcher | None], device) -> Tensor | None:
        """[B, V] bool, the tokens each row's matcher allows (all for rows without one), or
        None when no row has one."""
        if all(m is None for m in matchers):
            return None
        words = (self.vocab_size + 31) // 32
        bits = torch.full((len(matchers), words), -1, dtype=torch.int32)
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                matcher.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
        shifts = torch.arange(32, dtype=torch.int32)
        mask = ((bits[:, :, None] >> shifts) & 1).bool().view(len(matchers), -1)
        return mask[:, : self.vocab_size].to(device)


_NAMES = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _grammar(spec: GuidedSpec) -> str:
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        alternatives = " | ".join(json.dumps(c) for c in json.loads(spec.value))
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return llguidance.LLMatcher.grammar_from_lark(spec.value)
