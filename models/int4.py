"""CPU weight-only 4-bit linear layers (`--dtype int4`): Q4_1's format, groups of 32 weights
along the input dimension, each q * d + m with q in 0..15 (asymmetric).

The default model comes from a Q4_1 GGUF file, so its 210 layers' weights already lie on such a
grid: `quantize_groups` recovers it bitwise (dequantized, they are the float32 weights again),
and a batch-1 decode step reads half a byte per weight instead of int8's one. Its tied LM head
and embedding are Q8_0 in the file, not on a 4-bit grid: `quantize_int4` keeps the LM head int8
unless asked (perplexity on 4,096 tokens of the GPL-3, windows of 1024: float32 21.27, int8
21.41, int4 with the head int8 21.30, int4 with the head too 22.41). Decode rows (up to
MAX_INT4_ROWS, or any number with `batch_invariant`) go through PyTorch's
`_weight_int4pack_mm_for_cpu`, which computes x (bfloat16) times (q - 8) * scale + zero with
scale = d and zero = m + 8 d rounded to bfloat16 (the kernel takes them in the activations'
dtype: bfloat16 activations are the fast ones; float16 and float32 were 28x and ~20x slower
at one row); more rows (prefill) take the bfloat16 GEMM of the dequantized weights, kept as
`weight` as Int8Linear keeps them. Measured at 1 thread on a shared 2-core AMD EPYC (AVX-512
VNNI, no AMX; PyTorch 2.13) over the default model's 211 matmuls, weights streamed from memory
(`benchmarks/bench_int8_kernels.py`), ms for int4 / lln-serve's VNNI int8 GEMV / PyTorch's
int8 kernel / the bfloat16 GEMM: 9.2 / 13.9 / 18.1 / 34.0 at 1 row, 15.1 / 16.0 / 26.7 / 37.8
at 4, 23.1 / 18.9 / 35.9 / 39.0 at 5, 53.7 / 55.4 / 76.4 / 52.0 at 16; at one row the 210
layers without the LM head 7.7 ms in int4, the head 1.6 in int4, 2.8 in VNNI int8.

The kernel needs K a multiple of 32 and N of 16: `quantize_int4` keeps any other layer as an
Int8Linear (`Int4Linear` itself raises ValueError). CPU only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.quantize import Int8Linear, QuantizedLinear, is_decode_input, replace_linears

GROUP = 32  # weights per (d, m) pair, along K
LEVELS = 15  # q in 0..LEVELS
N_BLOCK = 16  # the kernel packs output channels in blocks of 16
# rows up to which the 4-bit kernel runs before the bfloat16 GEMM: over the model's matmuls
# ahead up to 12 rows (41 against 49 ms), even at 16 (54 against 55; module docstring)
MAX_INT4_ROWS = 16


def quantize_groups(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """weight [N, K] (K a multiple of GROUP) -> q uint8 [N, K] in 0..15 and float32 d, m
    [N, K / GROUP]: per group m = min, d = (max - min) / 15, q = round((w - m) / d) (a constant
    group: d = 0, q = 0). A Q4_1 group (q * d + m in float32, from float16 d and m, with its
    minimum at q = 0 and its maximum at q = 15, as llama.cpp quantizes) comes back bitwise."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"4-bit groups need in_features a multiple of {GROUP}, got {k}")
    groups = weight.detach().to(torch.float32).reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    d = (high - low) / LEVELS
    step = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, LEVELS)
    return q.to(torch.uint8).reshape(n, k), d, low


def dequantize_groups(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """q [..., K] and d, m [..., K / GROUP] -> float32 weights q * d + m [..., K]."""
    groups = q.to(torch.float32).unflatten(-1, (-1, GROUP))
    return (groups * d[..., None] + m[..., None]).flatten(-2)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [..., K] in 0..15 -> [..., K / 2], two weights a byte (the even one low)."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def int4_supported(linear: nn.Linear) -> bool:
    """Whether the 4-bit kernel takes this layer's shape."""
    return linear.in_features % GROUP == 0 and linear.out_features % N_BLOCK == 0


class Int4Linear(QuantizedLinear):
    """nn.Linear with 4-bit weights in groups of 32 along K; see the module docstring. The bias
    stays float32. Raises ValueError for a shape the kernel does not take (`int4_supported`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not int4_supported(linear):
            raise ValueError(
                f"the 4-bit kernel needs in_features a multiple of {GROUP} and out_features of "
                f"{N_BLOCK}, got {linear.in_features} -> {linear.out_features}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, d, m = quantize_groups(linear.weight)
        self.register_buffer("weight_int4", pack_nibbles(q))  # for dequantized rows
        self.register_buffer("group_scale", d)
        self.register_buffer("group_min", m)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        self.register_buffer("weight_packed", packed, persistent=False)
        # the kernel's w = (q - 8) * scale + zero, [K / GROUP, N, 2]
        scales_and_zeros = torch.stack((d, m + 8 * d), dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.bfloat16(), persistent=False)
        # `weight`, as nn.Linear names it: the dequantized weights, for the many-row GEMM
        self.register_buffer("weight", dequantize_groups(q, d, m).bfloat16())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
        self.register_buffer("bias", bias)
        self.batch_invariant = False  # `set_batch_invariant`

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        decode_row = self.batch_invariant and is_decode_input(x)
        if decode_row or rows.shape[0] <= MAX_INT4_ROWS:  # one kernel at any decode count
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.weight_packed, GROUP, self.scales_and_zeros
            )
        else:
            y = rows.to(torch.bfloat16) @ self.weight.T
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized_rows(self, ids: Tensor) -> Tensor:
        q = unpack_nibbles(self.weight_int4[ids])
        return dequantize_groups(q, self.group_scale[ids], self.group_min[ids])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"


def quantize_int4(model: nn.Module, vnni: bool | None = None, int4_head: bool = False) -> nn.Module:
    """Every nn.Linear of `model` becomes an Int4Linear, in place, except the LM head (unless
    `int4_head`) and layers whose shape the 4-bit kernel does not take: those become Int8Linear
    (`vnni`: as there). A tied input embedding reads the LM head's quantized weights. CPU only.
    Returns the model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def quantized(linear: nn.Linear) -> QuantizedLinear:
        if (linear is head and not int4_head) or not int4_supported(linear):
            return Int8Linear(linear, vnni)
        return Int4Linear(linear)

    return replace_linears(model, quantized)
