"""LLN decoder: a Llama-family causal LM whose attention kernel is a config field.

Weights are named as in transformers' Llama, so softmax checkpoints map 1:1. Norms, MLP and RoPE
are transformers' own Llama modules (identical numerics to the teacher); the attention module
adds per-KV-head alpha/beta (with feature_map "linear", per-head D x D maps q_map/k_map before
them; for lln_diag, a per-head mix and, when the window and LLN share one normalisation, a
per-head count_power) and keeps a recurrent state.

Two ways in:
- `forward()` (transformers API): `from_pretrained`, `generate()`, with `LLNCache`;
- `forward_states(input_ids, states, lengths)`: the server's hot path, batch of per-sequence
  states in, logits and new states out, no generation machinery.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from lln_core.ops import slot_softmax
from lln_core.ops.common import enable_flush_denormal, round_to, valid_tokens
from lln_core.ops.ea import ea_attention, ea_step
from lln_core.ops.far import FarRotary, FarTier, rotary_cos_sin, rotation_table
from lln_core.ops.lln import lln_attention, lln_step
from lln_core.ops.lln_diag import (
    empty_lln_diag_state,
    lln_diag_attention,
    lln_diag_step,
)
from lln_core.ops.softmax import (
    LocalSpec,
    LocalStepPlan,
    local_step_plan,
    softmax_kv_attention,
)
from lln_core.ops.sparse import SparsePlan, leaving_plan
from lln_core.state import BatchedState, EAState, KVState, LLNState, SparseKV
from models.cache import LLNCache
from models.configuration_lln import LLNConfig
from models.selection import (
    SurpriseState,
    add_first_surprise,
    evict_scores,
    max_piece,
    record_surprise,
    score_ring,
)

States = list[BatchedState | None]
# What the LLN kernels add to a softmax checkpoint (the parameters distillation trains).
LLN_PARAMETERS = ("alpha", "beta", "mix", "count_power", "q_map", "k_map")


class LLNAttention(nn.Module):
    def __init__(self, config: LLNConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.kernel = config.attention_kernel
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        o_bias = bias if config.o_proj_bias is None else config.o_proj_bias
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.observer: Callable[[int, Tensor, Tensor], None] | None = None  # calibration hook
        if self.kernel in ("lln", "lln_diag"):
            self.alpha = nn.Parameter(torch.ones(self.num_kv_heads))
            self.beta = nn.Parameter(torch.ones(self.num_kv_heads))
            if config.feature_map == "linear":
                eye = torch.eye(self.head_dim)
                self.q_map = nn.Parameter(eye.repeat(self.num_heads, 1, 1))
                self.k_map = nn.Parameter(eye.repeat(self.num_kv_heads, 1, 1))
        if self.kernel == "lln_diag":
            # joint: sinks past the window belong to the far tier, read at its own positions
            far_sinks = config.combine == "joint"
            self.local = LocalSpec(
                config.local_kind, config.local_size, config.num_sinks, far_sinks=far_sinks
            )
            self.mix = nn.Parameter(torch.full((self.num_heads,), self.default_mix))
            if config.combine == "joint":
                self.count_power = nn.Parameter(torch.zeros(self.num_heads))

    @property
    def default_mix(self) -> float:
        """LLN weight: 0.5 when averaged (the paper), log-weight 0 in the joint normalisation."""
        return 0.5 if self.config.combine == "average" else 0.0

    def feature_scales(self) -> tuple[Tensor, Tensor]:
        """What the kernels take as alpha/beta: per-KV-head scales, or with linear feature maps
        alpha W_q [Hq, D, D] and beta W_k [Hkv, D, D]."""
        if not hasattr(self, "q_map"):
            return self.alpha, self.beta
        group = self.num_heads // self.num_kv_heads
        alpha = self.alpha.repeat_interleave(group)[:, None, None] * self.q_map
        return alpha, self.beta[:, None, None] * self.k_map

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """Storage dtype of LLN+Diag's exact keys/values when it is not the state's own."""
        if self.kernel != "lln_diag" or self.config.kv_cache_dtype == "auto":
            return None
        return getattr(torch, self.config.kv_cache_dtype)

    def empty_state(self, batch: int, device: torch.device | str) -> BatchedState:
        """Float32 recurrent states whatever the weights' dtype (float64 for float64 weights)."""
        shape = (batch, self.num_kv_heads, self.head_dim)
        weight_dtype = self.q_proj.weight.dtype
        dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
        if self.kernel == "lln":
            return LLNState.empty(*shape, dtype=dtype, device=device)
        if self.kernel == "lln_diag":
            return empty_lln_diag_state(
                *shape, self.local, dtype=dtype, device=device,
                sparse_size=self.config.sparse_cache_size, kv_dtype=self.kv_dtype,
            )  # fmt: skip
        if self.kernel == "ea":
            return EAState.empty(*shape, dtype=dtype, device=device)
        return KVState.empty(*shape, dtype=weight_dtype, device=device)

    def forward(
        self,
        hidden: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        state: BatchedState | None,
        lengths: Tensor | None = None,
        plan: LocalStepPlan | None = None,
        sparse_plan: SparsePlan | None = None,
        far_rotary: FarRotary | None = None,
    ) -> tuple[Tensor, BatchedState]:
        """hidden [B, T, hidden] -> output [B, T, hidden] and the state after the T tokens.

        plan: a decode step's local-slot bookkeeping, shared by all layers (`step_plan`);
        sparse_plan: the sparse cache's decisions, shared too (`LLNForCausalLM`); far_rotary:
        the far tier's rotations, shared too (`LLNModel.far_rotary`)."""
        batch, seq_len, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        far = None if far_rotary is None else far_rotary.tier(q)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if self.kv_dtype is not None:  # stored rounded: every path computes with those numbers
            k, v = round_to(k, self.kv_dtype), round_to(v, self.kv_dtype)
        if self.observer is not None:
            self.observer(self.layer_idx, q, k)
        if state is None:
            state = self.empty_state(batch, hidden.device)
        y, state = self.attend(q, k, v, state, lengths, plan, sparse_plan, far)
        y = y.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(y.to(hidden.dtype)), state

    def step_plan(
        self,
        state: BatchedState | None,
        seq_len: int,
        lengths: Tensor | None,
        in_place: bool = False,
    ) -> LocalStepPlan | None:
        """For a decode step of LLN+Diag, the slot bookkeeping that every layer shares."""
        if self.kernel != "lln_diag" or state is None or seq_len != 1 or lengths is not None:
            return None
        return local_step_plan(state.local, state.num_tokens, self.local, in_place=in_place)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: BatchedState,
        lengths: Tensor | None,
        plan: LocalStepPlan | None = None,
        sparse_plan: SparsePlan | None = None,
        far: FarTier | None = None,
    ) -> tuple[Tensor, BatchedState]:
        """The kernel: q [B, Hq, T, D], k, v [B, Hkv, T, D] after RoPE; far: the far tier's
        queries and key rotation (LLN+Diag with fixed far positions)."""
        decode = q.shape[2] == 1 and lengths is None
        chunk = self.config.chunk_size
        if self.kernel in ("lln", "lln_diag"):
            alpha, beta = self.feature_scales()
        if self.kernel == "lln":
            if decode:
                return lln_step(q, k, v, alpha, beta, state)
            return lln_attention(
                q, k, v, alpha, beta, state=state, chunk_size=chunk, lengths=lengths
            )
        if self.kernel == "lln_diag":
            kwargs = dict(local=self.local, combine=self.config.combine, far=far)
            if hasattr(self, "count_power"):
                kwargs["count_power"] = self.count_power
            if self.config.uses_sparse_cache:
                kwargs["sparse_plan"] = sparse_plan
            if decode:
                return lln_diag_step(q, k, v, alpha, beta, self.mix, state, plan=plan, **kwargs)
            return lln_diag_attention(
                q, k, v, alpha, beta, self.mix,
                state=state, chunk_size=chunk, lengths=lengths, **kwargs,
            )  # fmt: skip
        if self.kernel == "ea":
            eps = self.config.ea_eps
            if decode:
                return ea_step(q, k, v, state, eps=eps)
            return ea_attention(q, k, v, eps=eps, state=state, chunk_size=chunk, lengths=lengths)
        return softmax_kv_attention(q, k, v, state, lengths=lengths)


class LLNDecoderLayer(nn.Module):
    def __init__(self, config: LLNConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LLNAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        state: BatchedState | None,
        lengths: Tensor | None = None,
        plan: LocalStepPlan | None = None,
        sparse_plan: SparsePlan | None = None,
        far_rotary: FarRotary | None = None,
    ) -> tuple[Tensor, BatchedState]:
        attn, state = self.self_attn(
            self.input_layernorm(hidden), position_embeddings, state, lengths, plan, sparse_plan,
            far_rotary,
        )  # fmt: skip
        hidden = hidden + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, state


class LLNPreTrainedModel(PreTrainedModel):
    config_class = LLNConfig
    config: LLNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LLNDecoderLayer"]

    def __init__(self, config: LLNConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        enable_flush_denormal()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if not isinstance(module, LLNAttention):
            return
        defaults = {"alpha": 1.0, "beta": 1.0, "mix": module.default_mix, "count_power": 0.0}
        for name, value in defaults.items():
            if hasattr(module, name):  # parameters loaded from a checkpoint are left alone
                init.constant_(getattr(module, name), value)
        for name in ("q_map", "k_map"):
            if hasattr(module, name):
                param = getattr(module, name)
                init.copy_(param, torch.eye(param.shape[-1]).expand_as(param))


class LLNModel(LLNPreTrainedModel):
    def __init__(self, config: LLNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            LLNDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.compiled_decode_layers: Callable | None = None
        self._far_tables: dict = {}  # `_far_table`
        self.post_init()

    def compile_decode(self, enabled: bool = True, cpp_wrapper: bool = False) -> bool:
        """Run decode steps through torch.compile'd layers (see `compile_decode_layers`).

        Softmax keeps a growing KV cache (new shapes every step): it stays eager. Returns
        whether decode steps are now compiled. The compiled step does not re-check the layers'
        structure: call this again after changing the model (dtype, quantization, config).
        cpp_wrapper: the step's host code (kernel calls, buffers) in C++ rather than Python, as
        the server runs it on a CPU: an int8 step of the default model 7% faster, for about a
        minute of compilation on first use instead of ~30 s (cached on disk after)."""
        if not enabled or self.config.attention_kernel == "softmax":
            self.compiled_decode_layers = None
        else:
            template = self.layers[0].self_attn.empty_state(1, self.embed_tokens.weight.device)
            self.compiled_decode_layers = compile_decode_layers(template, cpp_wrapper)
        return self.compiled_decode_layers is not None

    def forward(
        self,
        input_ids: Tensor | None = None,
        states: States | None = None,
        lengths: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        in_place: bool = False,
        sparse_plan: SparsePlan | None = None,
    ) -> tuple[Tensor, States]:
        """input_ids [B, T] -> last hidden states [B, T, hidden] and the new per-layer states.

        Positions default to each row's tokens seen so far plus 0..T-1. in_place: a decode
        step (T = 1) of LLN+Diag writes the new token into the given states' windows instead
        of copies (the caller gives those states up; the server's slot pool does).
        sparse_plan: the sparse cache's decisions for these tokens (`LLNForCausalLM` makes
        them from its scores); without one each layer's cache keeps the newest keys.
        """
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        states = list(states) if states is not None else [None] * len(self.layers)
        if position_ids is None:
            position_ids = _positions(states[0], hidden.shape[0], hidden.shape[1], hidden.device)
        position_embeddings = self.position_embeddings(hidden, position_ids)
        far_rotary = self.far_rotary(position_ids, hidden.dtype)
        plan = self.layers[0].self_attn.step_plan(states[0], hidden.shape[1], lengths, in_place)
        if self._use_compiled(states, hidden.shape[1], lengths):
            plan_tensors = None if plan is None else plan.flat()
            sparse_tensors = None if sparse_plan is None else sparse_plan.flat()
            far_tensors = None if far_rotary is None else far_rotary.flat()
            size = decode_group_size(len(self.layers))
            for start in range(0, len(self.layers), size):
                group = range(start, start + size)
                hidden, flats = self.compiled_decode_layers(
                    tuple(self.layers[i] for i in group), hidden, *position_embeddings,
                    tuple(states[i].flat() for i in group), plan_tensors, in_place, sparse_tensors,
                    far_tensors,
                )  # fmt: skip
                for i, flat in zip(group, flats, strict=True):
                    states[i] = states[i].unflat(flat)
            return self.norm(hidden), states
        for i, layer in enumerate(self.layers):
            hidden, states[i] = layer(
                hidden, position_embeddings, states[i], lengths, plan, sparse_plan, far_rotary
            )
        return self.norm(hidden), states

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin at position_ids [B, T], with angles exact at any position
        (`rotary_cos_sin`) where the frequencies are fixed; rope types that change them with
        the length (dynamic, longrope) go through transformers' module."""
        rope = self.rotary_emb
        if "dynamic" in rope.rope_type or rope.rope_type == "longrope":
            return rope(hidden, position_ids=position_ids)
        return rotary_cos_sin(rope.inv_freq, position_ids, rope.attention_scaling, hidden.dtype)

    def far_rotary(self, position_ids: Tensor, dtype: torch.dtype) -> FarRotary | None:
        """The far tier's rotations for queries at position_ids [B, T] (fixed far positions),
        in the kernels' compute dtype for weights of `dtype`."""
        config = self.config
        if not config.uses_far_positions:
            return None
        sink_distance = config.far_sink_distance
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        grouped = config.far_positions == "grouped"
        return FarRotary.make(
            self.rotary_emb.inv_freq, position_ids, window=config.local_size,
            distance=config.far_distance,
            sink_distance=config.far_distance if sink_distance is None else sink_distance,
            scaling=self.rotary_emb.attention_scaling, dtype=dtype,
            group=config.far_group if grouped else 0, max_distance=config.far_max_distance,
            table=self._far_table(dtype) if grouped else None,
        )  # fmt: skip

    def _far_table(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The grouped keys' rotations (`rotation_table`), made once per dtype and device."""
        inv_freq = self.rotary_emb.inv_freq
        key = (dtype, inv_freq.device)
        if key not in self._far_tables:
            size = self.config.far_max_distance + 1
            self._far_tables[key] = rotation_table(inv_freq, size, dtype)
        return self._far_tables[key]

    def _use_compiled(self, states: States, seq_len: int, lengths: Tensor | None) -> bool:
        return (
            self.compiled_decode_layers is not None
            and seq_len == 1
            and lengths is None
            and all(state is not None for state in states)
            and not torch.is_grad_enabled()
        )


# Layers per compiled call of a decode step: each call costs a fixed ~0.2 ms on CPU (Dynamo's
# guard checks, the wrappers) whatever its size; more layers per call cost compile time.
DECODE_GROUP = 6


def decode_group_size(num_layers: int) -> int:
    """Layers per compiled decode call: the largest divisor of num_layers up to DECODE_GROUP,
    so that every call has the same structure and they all share one compilation."""
    return max(d for d in range(1, DECODE_GROUP + 1) if num_layers % d == 0)


def compile_decode_layers(template: BatchedState, cpp_wrapper: bool = False) -> Callable:
    """One decode step of a group of decoder layers, compiled; states go in and out as flat
    tensors.

    Eager, a batch-1 decode step is dozens of small ops per layer whose dispatch costs more than
    their arithmetic (attention step: 417 us eager, 149 us compiled); compiled, the elementwise
    work fuses into a few kernels around the matrix products (measured on SmolLM2-135M, CPU:
    30 layers 71 -> 52 ms). The groups share one compilation (parameters are graph inputs); a
    second batch size adds one with a dynamic batch dimension. `template` gives the state's
    structure (its tensors are not used).
    """

    def run(
        layers, hidden, cos, sin, group_states, plan_tensors, in_place, sparse_tensors, far_tensors
    ):
        plan = None if plan_tensors is None else LocalStepPlan(*plan_tensors, in_place=in_place)
        sparse_plan = None if sparse_tensors is None else SparsePlan(*sparse_tensors)
        far_rotary = None if far_tensors is None else FarRotary.unflat(far_tensors)
        flats = []
        for layer, state_tensors in zip(layers, group_states, strict=True):
            state = template.unflat(state_tensors)
            hidden, state = layer(hidden, (cos, sin), state, None, plan, sparse_plan, far_rotary)
            flats.append(state.flat())
        return hidden, tuple(flats)

    slot_softmax.available()  # built now: a trace cannot build it
    # dynamo keeps compilations on the function's code object: a copy per model keeps one
    # model's graphs from ever serving another's layers, and so the ~1,800 guards on the
    # layers' structure (hooks, config constants, parameters' metadata; 0.25 ms per call, 5% of
    # an int8 step) can go. Those on the states and the step's other inputs stay; a model
    # changed after `compile_decode` (dtype, layers, config) must call it again.
    run = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__,
                             run.__defaults__, run.__closure__)  # fmt: skip
    # the sparse cache's compiled planning is one function for every model: a process with
    # several (benchmarks, tests) would pass dynamo's default 8 recompilations and fall back to
    # eager with no more than a warning
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options = {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        # the step writes its one new slot per cache after every read of the cache; inductor's
        # reordering for locality would hoist the write above the reads, and a write with
        # later reads cannot be done in place: it copied each window and sparse cache twice
        "reorder_for_locality": False,
        "cpp_wrapper": cpp_wrapper,
    }
    return torch.compile(run, dynamic=None, options=options)


def plan_piece(
    tracker: SurpriseState,
    ids: Tensor,
    num_tokens: Tensor,
    cache: SparseKV,
    lm_head: nn.Module,
    valid: Tensor | None,
    *,
    window: int,
    num_sinks: int,
    span: int,
) -> tuple[SurpriseState, SparsePlan]:
    """Before a piece ids [B, T] from positions num_tokens [B]: the surprise of each row's
    first token (from the carried hidden state), then the sparse cache's plan for the keys
    leaving the window during the piece (`models/selection.py`)."""
    tracker = add_first_surprise(tracker, ids[:, 0], num_tokens, lm_head)
    plan = leaving_plan(
        cache, num_tokens, ids.shape[1], window=window, num_sinks=num_sinks, valid=valid,
        evict_score=evict_scores(tracker, num_tokens, ids.shape[1], window, span),
    )  # fmt: skip
    return tracker, plan


@torch.compile(dynamic=None)
def _compiled_plan_flat(tracker, ids, num_tokens, cache, lm_head, window, num_sinks, span):
    tracker, plan = plan_piece(
        tracker, ids, num_tokens, cache, lm_head, None,
        window=window, num_sinks=num_sinks, span=span,
    )  # fmt: skip
    return tracker.flat(), plan.flat()


def compiled_plan_step(
    tracker: SurpriseState,
    ids: Tensor,
    num_tokens: Tensor,
    cache: SparseKV,
    lm_head: nn.Module,
    *,
    window: int,
    num_sinks: int,
    span: int,
) -> tuple[SurpriseState, SparsePlan]:
    """`plan_piece` for a decode step (T = 1, no padding), compiled: eager, its dozens of small
    ops on [B, G] tensors cost more in dispatch than in arithmetic (368 vs 138 us per step)."""
    tracker_flat, plan_flat = _compiled_plan_flat(
        tracker, ids, num_tokens, cache, lm_head, window, num_sinks, span
    )
    return tracker.unflat(tracker_flat), SparsePlan(*plan_flat)


class LLNForCausalLM(LLNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LLNConfig):
        super().__init__(config)
        self.model = LLNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() builds its own LLNCache

    def compile_decode(self, enabled: bool = True, cpp_wrapper: bool = False) -> bool:
        """Decode steps through compiled layers (`LLNModel.compile_decode`)."""
        return self.model.compile_decode(enabled, cpp_wrapper)

    def empty_states(self, batch: int) -> States:
        """One state per layer; with a sparse cache, then the scores' state (`SurpriseState`)."""
        device = self.lm_head.weight.device
        states = [layer.self_attn.empty_state(batch, device) for layer in self.model.layers]
        if self.config.uses_sparse_cache:
            ring = score_ring(self.config.local_size, self.config.sparse_span)
            dtype = torch.promote_types(self.lm_head.weight.dtype, torch.float32)
            hidden = self.config.hidden_size
            states.append(SurpriseState.empty(batch, ring, hidden, device, dtype))
        return states

    def forward_hidden(
        self,
        input_ids: Tensor,
        states: States | None = None,
        lengths: Tensor | None = None,
        in_place: bool = False,
    ) -> tuple[Tensor, States, Tensor | None]:
        """Final hidden states [B, T, hidden] and new states, as `LLNModel.forward`. With a
        sparse cache the input goes through in pieces short enough that the scores of the keys
        leaving the window are known (`models/selection.py`), and the logits at each row's last
        valid token [B, V] come back too (the scores need them); else None."""
        if not self.config.uses_sparse_cache:
            return *self.model(input_ids, states, lengths, in_place=in_place), None
        num_layers = len(self.model.layers)
        if states is None or all(s is None for s in states):
            states = self.empty_states(input_ids.shape[0])
        layer_states, tracker = list(states[:num_layers]), states[num_layers]
        window, span = self.config.local_size, self.config.sparse_span
        piece = max_piece(window, span)
        hiddens, last_logits = [], None
        for start in range(0, input_ids.shape[1], piece):
            ids = input_ids[:, start : start + piece]
            piece_lengths = None if lengths is None else (lengths - start).clamp(0, ids.shape[1])
            num_tokens = layer_states[0].num_tokens
            valid = valid_tokens(piece_lengths, ids.shape[0], ids.shape[1], ids.device)
            inputs = (tracker, ids, num_tokens, layer_states[0].sparse, self.lm_head)
            sizes = {"window": window, "num_sinks": self.config.num_sinks, "span": span}
            if (
                ids.shape[1] == 1
                and valid is None
                and self.model.compiled_decode_layers is not None
            ):
                tracker, plan = compiled_plan_step(*inputs, **sizes)
            else:
                tracker, plan = plan_piece(*inputs, valid, **sizes)
            hidden, layer_states = self.model(
                ids, layer_states, piece_lengths, in_place=in_place, sparse_plan=plan
            )
            tracker, logits = record_surprise(
                tracker, hidden, ids, num_tokens, piece_lengths, self.lm_head
            )
            if piece_lengths is not None and last_logits is not None:
                logits = torch.where((piece_lengths > 0)[:, None], logits, last_logits)
            hiddens.append(hidden)
            last_logits = logits
        return torch.cat(hiddens, dim=1), [*layer_states, tracker], last_logits

    def forward_states(
        self,
        input_ids: Tensor,
        states: States | None = None,
        lengths: Tensor | None = None,
        logits_to_keep: int = 0,
        in_place: bool = False,
    ) -> tuple[Tensor, States]:
        """The server's batched step: input_ids [B, T] (right-padded to lengths [B] if given;
        T = 1 is a decode step) with each row's states -> logits [B, T', V] and new states.

        logits_to_keep = k > 0 keeps only the last k positions (with lengths, use 0 and pick).
        in_place: decode steps may write into the given states (`LLNModel.forward`).
        """
        hidden, states, last_logits = self.forward_hidden(input_ids, states, lengths, in_place)
        last_only = logits_to_keep == 1 or hidden.shape[1] == 1
        if last_only and last_logits is not None and lengths is None and not hidden.requires_grad:
            return last_logits[:, None].to(hidden.dtype), states
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden), states

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: LLNCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        lengths = _lengths_from_mask(attention_mask, past_key_values)
        if past_key_values is not None and not isinstance(past_key_values, LLNCache):
            if past_key_values.get_seq_length() > 0:
                raise ValueError("LLN models take an LLNCache (or none), not a KV cache")
            past_key_values = None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is None and use_cache:
            past_key_values = LLNCache(len(self.model.layers))
        states = past_key_values.states if past_key_values is not None else None
        if self.config.uses_sparse_cache:
            if input_ids is None:
                raise ValueError("a sparse cache scores tokens by the model's surprise: pass "
                                 "input_ids, not inputs_embeds")  # fmt: skip
            hidden, states, _ = self.forward_hidden(input_ids, states, lengths)
        else:
            hidden, states = self.model(input_ids, states, lengths, position_ids, inputs_embeds)
        if past_key_values is not None:
            past_key_values.states = states
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def _positions(state: BatchedState | None, batch: int, seq_len: int, device) -> Tensor:
    start = torch.zeros(batch, dtype=torch.long, device=device)
    if state is not None:
        start = state.num_tokens.to(device)
    return start[:, None] + torch.arange(seq_len, device=device)


def _lengths_from_mask(attention_mask: Tensor | None, cache: LLNCache | None) -> Tensor | None:
    """generate() passes a mask over the whole history; only right padding of the new tokens is
    representable (a state cannot skip a token in the middle)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    past = cache.get_seq_length() if isinstance(cache, LLNCache) else 0
    new = attention_mask[:, past:].long()
    lengths = new.sum(dim=1)
    is_prefix = torch.arange(new.shape[1], device=new.device)[None] < lengths[:, None]
    history_ok = not past or bool(attention_mask[:, :past].all())
    if not history_ok or not torch.equal(new.bool(), is_prefix):
        raise ValueError(
            "LLN models support right padding only (a state cannot skip tokens): "
            "generate one prompt at a time, or use the engine for batches of different lengths"
        )
    return lengths
