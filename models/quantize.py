"""Weight-only 8-bit linear layers for CPU decode (`--dtype int8`).

A batch-1 decode step reads every weight once, so its cost is the bytes of the weights: int8
per output channel reads a quarter of float32's. PyTorch's `_weight_int8pack_mm` (bfloat16
activations, int8 weights, one scale per output channel) is the fast kernel for a few rows;
for many rows (prefill) it falls behind the bfloat16 GEMM of oneDNN (AMX where the CPU has it),
so each layer also keeps its dequantized weights in bfloat16 (as `weight`) and picks the kernel
by the number of rows. Both paths compute with the same weights (int8 * scale, exact in bfloat16 to
a rounding) and bfloat16 activations; outputs come back in the input's dtype. Norms, LLN
features, window keys/values and states stay float32 (measured crossover on a 2-core AVX-512
CPU: int8 ahead up to 4 rows, bfloat16 from 8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# rows (tokens x sequences) up to which the int8 kernel runs; above it the bfloat16 GEMM
MAX_INT8_ROWS = 4


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> int8 [N, K] and float32 scales [N]: symmetric, round to nearest, the
    largest magnitude of each row maps to 127 (a zero row gets scale 1)."""
    weight = weight.detach().to(torch.float32)
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights per output channel; see the module docstring."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight)
        scale = scale.to(torch.bfloat16)  # the int8 kernel takes scales in the activations' dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        # `weight`, as nn.Linear names it: the dequantized weights, for the many-row GEMM
        self.register_buffer("weight", (q.to(torch.float32) * scale[:, None].float()).bfloat16())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= MAX_INT8_ROWS:
            y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        else:
            y = rows @ self.weight.T
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """The input embedding read from an Int8Linear's weights (a tied LM head): rows
    dequantized on lookup, so the table is held once, in int8."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head = head
        self.dtype = dtype

    @property
    def weight(self) -> Tensor:
        return self.head.weight  # bfloat16, dequantized

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.head.weight_int8[ids].to(torch.float32)
        return (rows * self.head.scale[ids, None].to(torch.float32)).to(self.dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear of `model` (the LM head included) becomes an Int8Linear, in place; a
    tied input embedding reads the LM head's int8 weights. Returns the model."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and embed.weight is head.weight
    dtype = embed.weight.dtype if embed is not None else torch.float32
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    if tied:
        model.set_input_embeddings(Int8Embedding(model.get_output_embeddings(), dtype))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
