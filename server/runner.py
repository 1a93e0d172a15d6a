"""ScheduledBatch -> tensors -> model forward with slot states -> logits.

Decodes and prefill chunks run as two forwards: decode rows are one token each, through the
static in-place step (`server/decode_graph.py`; CUDA graphs on a GPU, compiled layers when
enabled), prefill rows are chunks right-padded to the longest. Putting decodes in
the padded prefill batch would compute every decode row at the chunk's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.modeling_lln import LLNForCausalLM
from server.decode_graph import StaticDecoder
from server.scheduler import PrefillChunk, ScheduledBatch
from server.state_pool import StatePool


@dataclass
class RunnerOutput:
    """logits [R, V] (float32) for batch.sampling_requests, in that order; prompt_logits maps a
    prefill chunk's request id to its logits at every chunk position [n, V] (only requests
    that asked for prompt logprobs)."""

    logits: Tensor
    prompt_logits: dict[str, Tensor] = field(default_factory=dict)


class ModelRunner:
    """use_graphs: decode batches replay CUDA graphs (`StaticDecoder`); else the same static
    step runs eagerly. chunk_alone: each prefill chunk runs in a forward of its own, so that
    its matmuls see the same rows whatever else the step prefills (GEMM libraries pick their
    blocking, and so their sums' order, by the row count)."""

    def __init__(
        self,
        model: LLNForCausalLM,
        pool: StatePool,
        *,
        use_graphs: bool = False,
        chunk_alone: bool = False,
    ) -> None:
        self.model = model
        self.pool = pool
        self.chunk_alone = chunk_alone
        self.device = model.lm_head.weight.device
        self.decoder = StaticDecoder(model, pool, pool.num_slots, use_graphs=use_graphs)

    @torch.no_grad()
    def run(self, batch: ScheduledBatch) -> RunnerOutput:
        rows: list[Tensor] = []
        if batch.decodes:
            decoded = self._decode(batch)  # a view the decoder's next run overwrites
            rows.append(decoded.clone() if batch.prefills else decoded)
        prompt_logits: dict[str, Tensor] = {}
        if batch.prefills:
            groups = [[c] for c in batch.prefills] if self.chunk_alone else [batch.prefills]
            for chunks in groups:
                last, logits = self._prefill(chunks)
                prompt_logits.update(logits)
                finishing = [i for i, c in enumerate(chunks) if c.is_last]
                if finishing:
                    rows.append(last[finishing])
        vocab = self.model.config.vocab_size
        if not rows:
            logits = torch.empty(0, vocab, device=self.device)
        else:  # one part: no [n, V] copy
            logits = rows[0] if len(rows) == 1 else torch.cat(rows)
        return RunnerOutput(logits.float(), prompt_logits)

    def _decode(self, batch: ScheduledBatch) -> Tensor:
        requests = batch.decodes
        return self.decoder.run([r.last_token_id for r in requests], [r.slot for r in requests])

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[Tensor, dict[str, Tensor]]:
        """Last-position logits of every chunk [C, V], and full logits where asked."""
        slots = [c.request.slot for c in chunks]
        if all(c.num_tokens == 1 and not _wants_prompt_logits(c) for c in chunks):
            # one token is a decode step: the decode graph warmed up at start, where the
            # prefill's copying forward would compile a graph of its own (~40 s on 2 cores)
            return self.decoder.run([c.token_ids[0] for c in chunks], slots).clone(), {}
        lengths = torch.tensor([c.num_tokens for c in chunks], device=self.device)
        ids = torch.zeros(len(chunks), int(lengths.max()), dtype=torch.long, device=self.device)
        for row, chunk in enumerate(chunks):
            ids[row, : chunk.num_tokens] = torch.tensor(chunk.token_ids, device=self.device)
        padded = None if bool((lengths == ids.shape[1]).all()) else lengths
        hidden, states, last = self.model.forward_hidden(ids, self.pool.gather(slots), padded)
        self.pool.scatter(slots, states)
        if last is None:
            rows = torch.arange(len(chunks), device=self.device)
            last = self.model.lm_head(hidden[rows, lengths - 1])
        prompt_logits = {
            c.request.request_id: self.model.lm_head(hidden[row, : c.num_tokens]).float()
            for row, c in enumerate(chunks)
            if _wants_prompt_logits(c)
        }
        return last, prompt_logits


def _wants_prompt_logits(chunk: PrefillChunk) -> bool:
    return chunk.request.sampling_params.prompt_logprobs is not None
