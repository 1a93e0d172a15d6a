"""Distillation of a converted model from its own softmax weights (the teacher).

Every weight of the teacher stays frozen; only the parameters the LLN kernel adds (alpha, beta,
the feature maps q_map/k_map where the config has feature_map "linear" and, for lln_diag, the
mix and count_power) are trained.
- Stage 1, attention transfer (`distill`): layer by layer, the LLN attention's output is fitted
  to the softmax attention's output on the same inputs (relative MSE on the teacher's hidden
  states). A checkpoint is written after each layer, so a run resumes where it stopped.
- Layer selection (`select_layers`): the LLN part of each layer is kept only where it brings
  the student's next-token distribution closer to the teacher's (KL on long training
  sequences); elsewhere it is switched off (mix = -inf: that layer keeps sinks + window only).
  A layer-wise fit does not guarantee that every layer's LLN part helps the model as a whole.
- Stage 2, logit distillation (`distill_logits`): all layers at once, the student's next-token
  distribution is fitted to the teacher's (KL) at the positions where the two can differ.
  Checkpoints every few steps hold the parameters, the optimizer and the sampling state, so a
  resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.calibrate import softmax_twin
from models.modeling_lln import LLN_PARAMETERS as TRAINABLE
from models.modeling_lln import LLNAttention, LLNForCausalLM


def default_training_text() -> str:
    """English prose with code: the Python language reference topics that ship with CPython
    (`pydoc_data.topics`, about 465 KB). Evaluation uses a different source (GPL-3 text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@dataclass
class DistillConfig:
    steps_per_layer: int = 60
    learning_rate: float = 0.05
    seq_len: int = 4096
    seed: int = 0
    layers: list[int] | None = None  # default: all


@dataclass
class LayerResult:
    layer: int
    loss_before: float
    loss_after: float
    seconds: float


@dataclass
class DistillReport:
    config: DistillConfig
    num_tokens: int
    layers: list[LayerResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LayerData:
    """The teacher's view of one layer: attention inputs, position embeddings, outputs."""

    inputs: list[Tensor]  # per sequence [1, T, hidden] (after input_layernorm)
    rope: list[tuple[Tensor, Tensor]]
    targets: list[Tensor]  # per sequence [1, T, hidden] (after o_proj)


@torch.no_grad()
def collect_teacher(model: LLNForCausalLM, token_ids: Tensor, seq_len: int) -> list[LayerData]:
    """Run the softmax twin over the text (sequences of seq_len) and keep, per layer, what its
    attention saw and returned."""
    teacher = softmax_twin(model)
    data = [LayerData([], [], []) for _ in teacher.model.layers]

    def hook(index: int):
        def save(module, args, output) -> None:
            data[index].inputs.append(args[0].detach())
            data[index].rope.append(tuple(t.detach() for t in args[1]))
            data[index].targets.append(output[0].detach())

        return save

    handles = [
        layer.self_attn.register_forward_hook(hook(i))
        for i, layer in enumerate(teacher.model.layers)
    ]
    try:
        for start in range(0, token_ids.numel() - seq_len + 1, seq_len):
            ids = token_ids[start : start + seq_len][None].to(model.device)
            teacher.forward_states(ids, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    if not data[0].inputs:
        raise ValueError(f"need at least {seq_len} tokens of training text")
    return data


def layer_loss(attn: LLNAttention, data: LayerData, index: int) -> Tensor:
    """Relative MSE of the LLN attention against the teacher on sequence `index`."""
    out, _ = attn(data.inputs[index], data.rope[index], None)
    target = data.targets[index]
    return (out - target).square().mean() / target.square().mean()


def train_layer(attn: LLNAttention, data: LayerData, config: DistillConfig) -> tuple[float, float]:
    """Adam on the layer's LLN parameters; returns the mean loss before and after."""
    params = [getattr(attn, name) for name in TRAINABLE if hasattr(attn, name)]
    if not params:
        raise ValueError(f"kernel {attn.kernel!r} has no parameters to distill")
    frozen = [p for p in attn.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed + attn.layer_idx)
    count = len(data.inputs)
    before = _mean_loss(attn, data)
    for _ in range(config.steps_per_layer):
        index = int(torch.randint(count, (1,), generator=generator))
        loss = layer_loss(attn, data, index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _keep_feature_scales_positive(attn)
    return before, _mean_loss(attn, data)


@torch.no_grad()
def _mean_loss(attn: LLNAttention, data: LayerData) -> float:
    return sum(layer_loss(attn, data, i).item() for i in range(len(data.inputs))) / len(data.inputs)


def distill(
    model: LLNForCausalLM,
    token_ids: Tensor,
    config: DistillConfig,
    *,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> DistillReport:
    """Stage 1 over the chosen layers; resumes from `checkpoint` (a directory) if it exists."""
    torch.manual_seed(config.seed)
    report = DistillReport(config, num_tokens=int(token_ids.numel()))
    done = _load_checkpoint(model, checkpoint, report)
    layers = config.layers if config.layers is not None else range(len(model.model.layers))
    todo = [i for i in layers if i not in done]
    if not todo:
        return report
    data = collect_teacher(model, token_ids, config.seq_len)
    bar = tqdm(todo, desc="attention transfer", disable=not progress)
    for index in bar:
        start = time.perf_counter()
        attn = model.model.layers[index].self_attn
        with torch.enable_grad():
            before, after = train_layer(attn, data[index], config)
        result = LayerResult(index, before, after, time.perf_counter() - start)
        report.layers.append(result)
        bar.set_postfix(layer=index, loss=f"{before:.3f}->{after:.3f}")
        _save_checkpoint(model, checkpoint, report)
    return report


def lln_parameters(model: LLNForCausalLM) -> dict[str, Tensor]:
    """What distillation changes: the LLN parameters of every layer (small)."""
    return {
        name: p.detach().cpu().clone()
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] in TRAINABLE
    }


def _save_checkpoint(model: LLNForCausalLM, checkpoint: Path | None, report: DistillReport):
    if checkpoint is None:
        return
    checkpoint.mkdir(parents=True, exist_ok=True)
    partial = checkpoint / "lln_params.pt.partial"
    torch.save(lln_parameters(model), partial)
    partial.rename(checkpoint / "lln_params.pt")  # atomic: a crash never leaves half a file
    (checkpoint / "report.json").write_text(json.dumps(report.to_json(), indent=1))


def _load_checkpoint(
    model: LLNForCausalLM, checkpoint: Path | None, report: DistillReport
) -> set[int]:
    if checkpoint is None or not (checkpoint / "lln_params.pt").is_file():
        return set()
    params = torch.load(checkpoint / "lln_params.pt", map_location="cpu")
    model.load_state_dict(params, strict=False)
    saved = json.loads((checkpoint / "report.json").read_text())
    report.layers = [LayerResult(**layer) for layer in saved["layers"]]
    return {layer.layer for layer in report.layers}


# Layer selection


@dataclass
class SelectReport:
    num_tokens: int
    kl_local: float  # every layer's LLN part off: sinks + window alone
    kl_all: float  # every layer's LLN part on
    kl_without: list[float]  # layer i's LLN part off, the others on
    disabled: list[int]
    kl_selected: float
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def select_layers(
    model: LLNForCausalLM, token_ids: Tensor, *, seq_len: int = 4096, progress: bool = True
) -> SelectReport:
    """Switch off the LLN part of every layer whose removal lowers the mean KL to the teacher
    over sequences of seq_len cut from token_ids (one pass, each layer judged with all the
    others on). Only lln_diag in one normalisation (the mix is a log-weight)."""
    config = model.config
    if config.attention_kernel != "lln_diag" or config.combine != "joint":
        raise ValueError("layer selection needs lln_diag with combine='joint'")
    first = first_differing_position(config)
    sequences = _training_sequences(token_ids, seq_len, first)
    start = time.perf_counter()
    targets = teacher_log_probs(model, sequences, first)
    mixes = [layer.self_attn.mix for layer in model.model.layers]
    saved = [m.clone() for m in mixes]

    def kl_with_off(off: set[int]) -> float:
        for i, (mix, value) in enumerate(zip(mixes, saved, strict=True)):
            mix.copy_(torch.full_like(value, float("-inf")) if i in off else value)
        return _mean_kl(model, sequences, targets)

    layers = range(len(mixes))
    kl_local, kl_all = kl_with_off(set(layers)), kl_with_off(set())
    kl_without = [
        kl_with_off({i}) for i in tqdm(layers, desc="layer selection", disable=not progress)
    ]
    disabled = [i for i in layers if kl_without[i] < kl_all]
    kl_selected = kl_with_off(set(disabled))  # leaves the model in the selected state
    return SelectReport(int(sequences.numel()), kl_local, kl_all, kl_without, disabled,
                        kl_selected, time.perf_counter() - start)  # fmt: skip


# Stage 2: logit distillation


@dataclass
class LogitConfig:
    steps: int = 40
    learning_rate: float = 0.01
    seq_len: int = 2048
    seed: int = 0
    checkpoint_every: int = 5
    max_seconds: float | None = None  # a wall-time budget: stop early once it is spent


@dataclass
class LogitReport:
    config: LogitConfig
    num_tokens: int
    first_position: int  # the first position scored: before it, student == teacher
    kl_before: float | None = None
    kl_after: float | None = None
    losses: list[float] = field(default_factory=list)  # per step
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def first_differing_position(config) -> int:
    """Queries before this position see every key through the local softmax branch, so the
    student equals the teacher there (LLN+Diag in one normalisation); 0 for other kernels."""
    if config.attention_kernel == "lln_diag" and config.combine == "joint":
        return config.local_size + config.num_sinks
    return 0


@torch.no_grad()
def teacher_log_probs(model: LLNForCausalLM, sequences: Tensor, first: int) -> Tensor:
    """The softmax twin's next-token log-probabilities at positions first.. of each sequence,
    [N, T - first, V] in bfloat16 (half the memory; the KL needs no more precision)."""
    teacher = softmax_twin(model)
    keep = sequences.shape[1] - first
    out = []
    for row in sequences:
        logits, _ = teacher.forward_states(row[None].to(model.device), logits_to_keep=keep)
        out.append(torch.log_softmax(logits[0].float(), dim=-1).to(torch.bfloat16).cpu())
    return torch.stack(out)


def kl_loss(model: LLNForCausalLM, ids: Tensor, target: Tensor) -> Tensor:
    """Mean KL(teacher || student) per position; ids [T], target [T', V] teacher log-probs of
    the last T' positions."""
    logits, _ = model.forward_states(ids[None].to(model.device), logits_to_keep=target.shape[0])
    log_p = torch.log_softmax(logits[0].float(), dim=-1)
    log_t = target.to(log_p.device).float()
    return (log_t.exp() * (log_t - log_p)).sum(-1).mean()


def distill_logits(
    model: LLNForCausalLM,
    token_ids: Tensor,
    config: LogitConfig,
    *,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> LogitReport:
    """Stage 2 over sequences of config.seq_len cut from token_ids; resumes from `checkpoint`."""
    first = first_differing_position(model.config)
    sequences = _training_sequences(token_ids, config.seq_len, first)
    count = len(sequences)
    params = _trainable(model)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    report = LogitReport(config, int(sequences.numel()), first)
    step = _load_logit_checkpoint(model, optimizer, generator, checkpoint, report)
    if step >= config.steps:
        return report
    targets = teacher_log_probs(model, sequences, first)
    if report.kl_before is None:
        report.kl_before = _mean_kl(model, sequences, targets)
    start = time.perf_counter() - report.seconds
    bar = tqdm(range(step, config.steps), desc="logit distillation", disable=not progress)
    for step in bar:
        index = int(torch.randint(count, (1,), generator=generator))
        with torch.enable_grad():
            loss = kl_loss(model, sequences[index], targets[index])
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        _keep_feature_scales_positive(model)
        report.losses.append(loss.item())
        report.seconds = time.perf_counter() - start
        bar.set_postfix(kl=f"{loss.item():.4f}")
        last = step + 1 == config.steps or _out_of_time(config, report.seconds)
        if (step + 1) % config.checkpoint_every == 0 or last:
            if last:
                report.kl_after = _mean_kl(model, sequences, targets)
            _save_logit_checkpoint(model, optimizer, generator, checkpoint, report)
        if last:
            break
    return report


def _out_of_time(config: LogitConfig, seconds: float) -> bool:
    return config.max_seconds is not None and seconds >= config.max_seconds


def _trainable(model: LLNForCausalLM) -> list[Tensor]:
    names = set(lln_parameters(model))
    if not names:
        raise ValueError(f"kernel {model.config.attention_kernel!r} has no parameters to distill")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    return params


def _training_sequences(token_ids: Tensor, seq_len: int, first: int) -> Tensor:
    """token_ids cut into [N, seq_len]; each must reach past `first` (the local window)."""
    count = token_ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"need at least {seq_len} tokens of training text")
    if first >= seq_len - 1:
        raise ValueError(f"seq_len {seq_len} leaves no position past the local window")
    return token_ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def _keep_feature_scales_positive(module: torch.nn.Module) -> None:
    """alpha/beta of every LLN attention in `module` stay positive (they scale exponents)."""
    for attn in module.modules():
        if isinstance(attn, LLNAttention) and hasattr(attn, "alpha"):
            attn.alpha.clamp_(min=1e-3)
            attn.beta.clamp_(min=1e-3)


@torch.no_grad()
def _mean_kl(model: LLNForCausalLM, sequences: Tensor, targets: Tensor) -> float:
    total = sum(kl_loss(model, ids, t).item() for ids, t in zip(sequences, targets, strict=True))
    return total / len(sequences)


def _save_logit_checkpoint(model, optimizer, generator, checkpoint: Path | None, report) -> None:
    if checkpoint is None:
        return
    checkpoint.mkdir(parents=True, exist_ok=True)
    state = {
        "params": lln_parameters(model),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "report": report.to_json(),
    }
    partial = checkpoint / "stage2.pt.partial"
    torch.save(state, partial)
    partial.rename(checkpoint / "stage2.pt")  # atomic: a crash never leaves half a file
    (checkpoint / "stage2.json").write_text(json.dumps(report.to_json(), indent=1))


def _load_logit_checkpoint(model, optimizer, generator, checkpoint: Path | None, report) -> int:
    """Restores a saved run into model/optimizer/generator/report; returns the steps done."""
    if checkpoint is None or not (checkpoint / "stage2.pt").is_file():
        return 0
    state = torch.load(checkpoint / "stage2.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["params"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    saved = state["report"]
    report.kl_before, report.kl_after = saved["kl_before"], saved["kl_after"]
    report.losses, report.seconds = list(saved["losses"]), saved["seconds"]
    return len(report.losses)
