"""Perplexity on held-out text, the measure of a converted model's quality."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.modeling_lln import LLNForCausalLM

# English prose that ships with every Debian system (package base-files); calibration uses
# other texts (models.convert.CALIBRATION_FILES).
EVALUATION_FILE = "/usr/share/common-licenses/GPL-3"


def evaluation_text() -> str:
    return Path(EVALUATION_FILE).read_text()


@torch.no_grad()
def perplexity(
    model: LLNForCausalLM,
    token_ids: Tensor,
    *,
    window: int = 1024,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens.

    token_ids: [N]. Each window is scored on its own from an empty state (as a fresh request
    would be); a trailing part shorter than a window is dropped.
    """
    num_windows = token_ids.numel() // window
    if num_windows == 0:
        raise ValueError(f"need at least {window} tokens, got {token_ids.numel()}")
    total_nll, count = 0.0, 0
    for i in tqdm(range(num_windows), desc="perplexity", disable=not progress):
        ids = token_ids[i * window : (i + 1) * window][None].to(model.device)
        logits, _ = model.forward_states(ids)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        count += window - 1
    return math.exp(total_nll / count)
