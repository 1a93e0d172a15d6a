"""Incremental detokenization: UTF-8 safe deltas and stop strings that are never streamed.

Text is decoded in a window of tokens [prefix_offset, len) and compared with the decode of
[prefix_offset, read_offset) (vLLM's offsets): decoding with the previous tokens as context keeps
spaces that a decoder strips from a sequence's first token (SentencePiece's "▁"), and a delta is
emitted only when the window does not end in U+FFFD, i.e. no multi-byte character is cut.
Both offsets only ever land where the decoded text ended cleanly, so the deltas concatenate to
the full decode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from server.request import SamplingParams

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas, stopping at stop strings.

    Feed tokens with `add_tokens` (returns (new_text, stopped)); when the sequence ends for
    another reason (EOS, length, abort) call `flush` for the text still held back.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # decoded text so far (truncated at a stop string once stopped)
        self.num_emitted = 0  # characters of `text` already returned
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

    @classmethod
    def from_params(
        cls, tokenizer: PreTrainedTokenizerBase, params: SamplingParams
    ) -> IncrementalDetokenizer:
        return cls(
            tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
        )

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return self.text[: self.num_emitted]

    def add_tokens(self, token_ids: int | Iterable[int]) -> tuple[str, bool]:
        """Append output tokens; returns the text now safe to emit and whether a stop string
        ended the sequence (then the text stops before it, or after it with
        include_stop_str_in_output, and later calls return ("", True)).
        """
        if self.stopped:
            return "", True
        self.token_ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        return self._advance(self._decode_delta(final=False))

    def flush(self) -> str:
        """Everything still held back (an incomplete character, a possible stop-string start):
        call it once when the sequence finishes without a stop string."""
        if self.stopped:
            return ""
        text, _ = self._advance(self._decode_delta(final=True), final=True)
        return text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(
            self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens
        )

    def _decode_delta(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _advance(self, delta: str, final: bool = False) -> tuple[str, bool]:
        search_from = max(len(self.text) - self._max_stop_len + 1, self.num_emitted)
        self.text += delta
        end = self._stop_end(search_from)
        if end is not None:
            self.stopped = True
            self.text = self.text[:end]
            return self._emit(end), True
        return self._emit(len(self.text) - (0 if final else self._held_back())), False

    def _emit(self, end: int) -> str:
        text = self.text[self.num_emitted : end]
        self.num_emitted = max(end, self.num_emitted)
        return text

    def _stop_end(self, search_from: int) -> int | None:
        """Where the text ends after the first stop string to complete, or None.

        First to complete = smallest end; at equal ends, the earliest start (the longest).
        """
        best: tuple[int, int] | None = None
        for stop in self.stop:
            start = self.text.find(stop, max(search_from, 0))
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is None:
            return None
        match_end, start = best
        return match_end if self.include_stop_str_in_output else start

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still start a stop string."""
        tail = self.text[-self._max_stop_len :] if self._max_stop_len else ""
        for length in range(min(len(tail), self._max_stop_len - 1), 0, -1):
            if any(s.startswith(tail[-length:]) for s in self.stop):
                return length
        return 0
