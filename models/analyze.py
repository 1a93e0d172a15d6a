"""The paper's instruments on a real model, layer by layer (`lln-serve analyze`).

For one window of text, the softmax teacher's q and k (after RoPE) of every layer give
bidirectional attention matrices per head for: softmax; LLN with the model's alpha/beta
(moment-matched or distilled) and with alpha = beta = 1 (no matching); the paper's LLN+Diag
(average of LLN and block-diagonal softmax); expressive attention ((q.k)^2); and a plain linear
attention with elu(x) + 1 features. Per layer, averaged over heads: variance of log attention,
entropy, spectral gap and effective temperature.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import torch
from torch import Tensor

from lln_core.instruments import (
    attention_entropy,
    attention_matrices,
    effective_temperature,
    log_attention_variance,
    spectral_gap,
)
from models.calibrate import softmax_twin
from models.modeling_lln import LLNForCausalLM

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VARIANTS = ("softmax", "lln", "lln_unmatched", "lln_diag", "ea", "elu")


@torch.no_grad()
def capture_qk(model: LLNForCausalLM, token_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the softmax teacher's (q [Hq, N, D], k [Hq, N, D]) after RoPE, float64,
    with each KV head repeated for its query heads."""
    teacher = softmax_twin(model)
    captured: list[tuple[Tensor, Tensor]] = []
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def observe(layer: int, q: Tensor, k: Tensor) -> None:
        captured.append((q[0].double(), k[0].repeat_interleave(group, dim=0).double()))

    for layer in teacher.model.layers:
        layer.self_attn.observer = observe
    teacher.forward_states(token_ids[None].to(model.device), logits_to_keep=1)
    return captured


def layer_matrices(
    q: Tensor,
    k: Tensor,
    alpha: Tensor,
    beta: Tensor,
    block: int,
    eps: float = 1e-6,
    maps: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Bidirectional attention matrices [H, N, N] of every variant for one layer.

    maps: the model's learned feature maps per query head (W_q, W_k [H, D, D]), applied to q
    and k before alpha/beta in the LLN matrix (feature_map "linear")."""
    p_sa, p_lln = attention_matrices(q, k, alpha, beta)
    if maps is not None:
        mapped_q, mapped_k = q @ maps[0].transpose(-1, -2), k @ maps[1].transpose(-1, -2)
        p_lln = attention_matrices(mapped_q, mapped_k, alpha, beta)[1]
    _, p_unmatched = attention_matrices(q, k, 1.0, 1.0)
    n = q.shape[1]
    blocks = torch.arange(n) // block
    same_block = blocks[:, None] == blocks[None, :]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~same_block, -math.inf)
    p_diag = 0.5 * p_lln + 0.5 * torch.softmax(logits, dim=-1)
    squared = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).square()
    p_ea = squared / (eps + squared.sum(-1, keepdim=True))  # as the EA kernel: rows sum to <= 1
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    linear = phi_q @ phi_k.transpose(-1, -2)
    p_elu = linear / linear.sum(-1, keepdim=True)
    return {
        "softmax": p_sa,
        "lln": p_lln,
        "lln_unmatched": p_unmatched,
        "lln_diag": p_diag,
        "ea": p_ea,
        "elu": p_elu,
    }


def analyze(model: LLNForCausalLM, token_ids: Tensor, out: Path) -> list[dict]:
    """Write analysis.md and analysis.png to `out`; return one row of metrics per layer."""
    config = model.config
    rows = []
    for index, (q, k) in enumerate(capture_qk(model, token_ids)):
        attn = model.model.layers[index].self_attn
        alpha, beta = _per_query_head(attn, "alpha", config), _per_query_head(attn, "beta", config)
        matrices = layer_matrices(q, k, alpha, beta, block=config.head_dim, maps=_maps(attn))
        row = {"layer": index}
        for name, p in matrices.items():
            row[f"entropy_{name}"] = attention_entropy(p).mean().item()
            row[f"gap_{name}"] = spectral_gap(p).mean().item()
        for name in ("softmax", "lln", "lln_unmatched"):
            row[f"logvar_{name}"] = log_attention_variance(matrices[name]).mean().item()
            row[f"temperature_{name}"] = effective_temperature(matrices[name]).mean().item()
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.md").write_text(_table(rows, token_ids.numel()))
    _plot(rows, out / "analysis.png")
    return rows


def _per_query_head(attn, name: str, config) -> Tensor:
    """alpha or beta per query head [Hq]; 1.0 for kernels without them."""
    group = config.num_attention_heads // config.num_key_value_heads
    if not hasattr(attn, name):
        return torch.ones(config.num_attention_heads, dtype=torch.float64)
    return getattr(attn, name).detach().double().repeat_interleave(group)


def _maps(attn) -> tuple[Tensor, Tensor] | None:
    """The learned feature maps per query head ([Hq, D, D] each), or None."""
    if not hasattr(attn, "q_map"):
        return None
    group = attn.num_heads // attn.num_kv_heads
    return attn.q_map.detach().double(), attn.k_map.detach().double().repeat_interleave(group, 0)


def _table(rows: list[dict], num_tokens: int) -> str:
    columns = [c for c in rows[0] if c != "layer"]
    lines = [
        f"# Attention instruments per layer ({num_tokens} tokens, bidirectional, mean over heads)",
        "",
        "| layer | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row in rows:
        lines.append(f"| {row['layer']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    layers = [row["layer"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in ("softmax", "lln", "lln_unmatched"):
        axes[0].plot(layers, [r[f"logvar_{name}"] for r in rows], "o-", label=name)
    for name in VARIANTS:
        axes[1].plot(layers, [r[f"entropy_{name}"] for r in rows], "o-", label=name)
        axes[2].plot(layers, [r[f"gap_{name}"] for r in rows], "o-", label=name)
    titles = ("variance of log attention", "attention entropy", "spectral gap 1 - |lambda_2|")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
