"""Distillation, stage 1: attention transfer.

The teacher is the model's own weights run with softmax attention. Every weight stays frozen;
for each layer, only the parameters the LLN kernel adds (alpha, beta and, for lln_diag, the mix)
are trained so that the LLN attention's output matches the softmax attention's output on the
same inputs (relative MSE, layer by layer, on the teacher's hidden states). Layers are trained
one at a time and written to a checkpoint after each, so a run resumes where it stopped.
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
from models.modeling_lln import LLNAttention, LLNForCausalLM

TRAINABLE = ("alpha", "beta", "mix")


def default_training_text() -> str:
    """English prose with code: the Python language reference topics that ship with CPython
    (`pydoc_data.topics`, about 465 KB). Evaluation uses a different source (GPL-3 text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@dataclass
class DistillConfig:
    steps_per_layer: int = 60
    learning_rate: float = 0.05
    seq_len: int = 1024
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
        with torch.no_grad():  # feature scales must stay positive
            for name in ("alpha", "beta"):
                getattr(attn, name).clamp_(min=1e-3)
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
        name: p.detach().clone()
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
