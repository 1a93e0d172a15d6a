"""Softmax of decode queries over stored slots, in parts that merge under a shared max.

The parts over many slots come from an AVX-512 kernel (`csrc/slot_softmax.cpp`),
as the op `torch.ops.lln.slot_softmax(q, k, v, bias) -> (num, den, top)`.

`slot_softmax` runs it where it can (float32 queries on a CPU, keys and values each float32 or
bfloat16, head dims multiples of 16, no gradient) and the same computation in PyTorch
elsewhere. `LLN_SERVE_SLOT_KERNEL=0` turns the kernel off.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

from lln_core.ops.common import slot_logits, slot_values
from lln_core.ops.extension import build, usable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "slot_softmax.cpp"
MAX_GROUP, MAX_DIM = 16, 256
_ready = False  # `available()`'s last answer: what a torch.compile trace reads (it cannot build)


@functools.cache
def available() -> bool:
    """Whether `torch.ops.lln.slot_softmax` runs here (builds and loads it on the first call).
    Call it before compiling code that uses `slot_softmax` (a trace does not build it)."""
    global _ready
    _ready = usable("LLN_SERVE_SLOT_KERNEL", lambda: _build(),
                    lambda: torch.ops.lln.slot_softmax_supported(), log,
                    "decode attention stays in PyTorch")  # fmt: skip
    return _ready


def _build() -> None:
    build("lln_slot_softmax", SOURCE)
    torch.library.register_fake("lln::slot_softmax")(_fake_slot_softmax)


def _fake_slot_softmax(q: Tensor, k: Tensor, v: Tensor, bias: Tensor):
    batch, heads, group, _ = q.shape
    return (q.new_empty(batch, heads, group, v.shape[-1]), q.new_empty(batch, heads, group),
            q.new_empty(batch, heads, group))  # fmt: skip


def kernel_fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `slot_softmax` runs these through the kernel."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k.dtype in (torch.float32, torch.bfloat16)
        and v.dtype in (torch.float32, torch.bfloat16)
        and q.shape[2] <= MAX_GROUP
        and all(d % 16 == 0 and 0 < d <= MAX_DIM for d in (q.shape[-1], v.shape[-1]))
        and not grad
        and (_ready if torch.compiler.is_compiling() else available())
    )


def slot_softmax(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised softmax of decode queries q [B, H, G, D] (scaled) over stored slots k [B, H,
    N, D], v [B, H, N, Dv] with an additive bias [B, N] (0 seen, -inf not): num [B, H, G, Dv] =
    sum exp(l - top) v, den [B, H, G] = sum exp(l - top), top [B, H, G] = max l (-inf, with
    den = 0 and num = 0, where no slot is seen). Keys and values as stored (bfloat16 is read
    as it is)."""
    if kernel_fits(q, k, v):
        return torch.ops.lln.slot_softmax(q, k, v, bias.to(torch.float32))
    logits = slot_logits(q, k) + bias[:, None, None, :].to(q.dtype)
    top = logits.amax(dim=-1)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    weights = torch.exp(logits - shift[..., None])
    return slot_values(weights, v), weights.sum(dim=-1), top


Parts = tuple[Tensor, Tensor, Tensor]  # (num, den, top) as `slot_softmax` returns them


def one_slot(logit: Tensor, value: Tensor) -> Parts:
    """The parts of a single slot: logit [B, H, G, 1], value [B, H, 1, Dv]."""
    top = logit[..., 0]
    return value.to(logit.dtype).expand(*top.shape, -1), torch.ones_like(top), top


def softmax_of_parts(parts: list[Parts]) -> Tensor:
    """The softmax-weighted values over the union of the parts' slots, [B, H, G, Dv]: each part
    rescaled to the largest top (a part with top = -inf weighs nothing)."""
    top = parts[0][2]
    for _, _, part_top in parts[1:]:
        top = torch.maximum(top, part_top)
    top = torch.where(torch.isfinite(top), top, 0.0)
    num = den = None
    for part_num, part_den, part_top in parts:
        weight = torch.exp(part_top - top)
        num = weight[..., None] * part_num if num is None else num + weight[..., None] * part_num
        den = weight * part_den if den is None else den + weight * part_den
    return num / den[..., None]
