"""A transformers Cache whose memory does not grow with the sequence: one state per layer."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from lln_core.state import BatchedState


class LLNCache(Cache):
    """Per-layer recurrent states (LLNState, EAState; KVState for the softmax baseline).

    Constant size for the LLN kernels, so nothing can be cropped: assisted decoding and anything
    else that rolls the cache back is refused with a clear error.
    """

    is_compileable = False

    def __init__(self, num_layers: int, states: list[BatchedState | None] | None = None):
        super().__init__(layers=[])
        self.states: list[BatchedState | None] = states or [None] * num_layers

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return f"LLNCache(layers={len(self.states)}, tokens={self.get_seq_length()})"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states if s is not None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        state = self.states[layer_idx] if self.states else None
        return 0 if state is None else int(state.num_tokens.max())

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no sequence dimension

    def has_previous_state(
        self, layer_idx: int | None = None, state_idx: int | None = None
    ) -> bool:
        return self.get_seq_length() > 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "an LLN state cannot be cropped (tokens are folded into a constant-size state): "
            "assisted/speculative decoding and cache rollback are not supported"
        )

    def activate_past_recording(self):
        self.crop(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = [None if s is None else s.index_select(indices) for s in self.states]

    def batch_repeat_interleave(self, repeats: int) -> None:
        present = [s for s in self.states if s is not None]
        if present:
            index = torch.arange(present[0].batch_size).repeat_interleave(repeats)
            self.batch_select_indices(index.to(present[0].num_tokens.device))

    def reset(self) -> None:
        self.states = [None] * len(self.states)
