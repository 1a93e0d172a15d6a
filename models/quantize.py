"""CPU weight formats: weight-only 8-bit linear layers (`--dtype int8`), and float32 layers whose
many-row GEMMs run in bfloat16 (`--gemm-dtype bfloat16`).

A batch-1 decode step reads every weight once, so its cost is the bytes of the weights: int8
per output channel reads a quarter of float32's. For decode rows (up to 16: a decode batch of 16
sequences) the kernels are lln-serve's (`models/int8_kernel.py`: activations quantized to int8
in groups of 16): the VNNI GEMV where the CPU has AVX-512 VNNI, 2x faster than PyTorch's at one
row, and from 5 rows the AMX GEMM where it also has AMX-INT8 (a second int8 copy of the
weights, in tile layout); else PyTorch's `_weight_int8pack_mm` (bfloat16 activations) up to 4.
For more rows (prefill) they fall behind the bfloat16 GEMM of oneDNN (AMX where the CPU has it),
so each layer also keeps its dequantized weights in bfloat16 (as `weight`) and picks the kernel
by the number of rows. All paths compute with the same int8 weights; outputs come back in the
input's dtype. A row's output does not depend on the other rows of its kernel's call, but the
kernels sum in different orders (the VNNI and AMX kernels their groups; PyTorch's int8 kernel
and the bfloat16 GEMM otherwise): `set_batch_invariant` sends decode rows through one kernel
whatever their number (the engine's `--deterministic`). Norms, LLN
features, window keys/values and states stay float32. Measured on a 2-core AVX-512 CPU over the
default model's 211 layers (`benchmarks/bench_int8_kernels.py`): VNNI 7.9 / 9.9 / 10.9 / 26.2 ms
at 1 / 4 / 5 / 16 rows, AMX 9.0 / 10.1 / 10.5 / 14.3, the bfloat16 GEMM 29-32 ms (ahead of VNNI
from 24 rows); PyTorch's int8 kernel ahead of the bfloat16 GEMM up to 4 rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import int8_kernel

# rows (tokens x sequences) up to which a GEMV kernel runs before the bfloat16 GEMM takes over:
# lln-serve's int8 kernels up to 16 (VNNI 26.2, AMX 14.3, the bfloat16 GEMM 31.7 ms at 16 rows
# over the model's layers, bench_int8_kernels.py); PyTorch's int8 or float32 one up to 4
# (1536 x 576 and the 49,152 x 576 LM head: ahead up to 4 rows, the bfloat16 GEMM ahead from 8
# and 2-4x faster from 16)
MAX_VNNI_ROWS = 16
MAX_GEMV_ROWS = 4
# rows from which the AMX kernel takes over from the VNNI one where the CPU has AMX-INT8 (up to
# MAX_VNNI_ROWS): over the model's 211 layers VNNI 9.9 / 10.9 / 26.2 ms at 4 / 5 / 16 rows, AMX
# 10.1 / 10.5 / 14.3 (bench_int8_kernels.py; at one row 7.9 against 9.0)
MIN_AMX_ROWS = 5
# float32 models: rows from which matmuls run in bfloat16 (Bf16GemmLinear): prefill chunks, not
# decode batches, so that a sequence's decode is float32 whatever the batch
MIN_BF16_ROWS = 64
# PyTorch's float32 GEMM (MKL) sums a row in one order at 1 row (a GEMV), another at 2-3 rows,
# and in a third in whole blocks of 4 rows, where the 1-3 rows left over take the others
# (measured on the CI CPU, AVX2, at the default model's shapes, with and without bias): a
# batch-invariant float32 layer pads every call to a multiple of this many rows
ROW_TILE = 4


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> int8 [N, K] and float32 scales [N]: symmetric, round to nearest, the
    largest magnitude of each row maps to 127 (a zero row gets scale 1)."""
    weight = weight.detach().to(torch.float32)
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class QuantizedLinear(nn.Module):
    """A weight-only quantized nn.Linear (Int8Linear, `models.int4.Int4Linear`): its
    `batch_invariant` flag (`set_batch_invariant`) and its rows dequantized to float32 (for a
    tied input embedding, `QuantizedEmbedding`)."""

    batch_invariant: bool

    def dequantized_rows(self, ids: Tensor) -> Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """nn.Linear with int8 weights per output channel; see the module docstring. `vnni`: decode
    rows through `torch.ops.lln.int8_gemv` (default: where it is available)."""

    def __init__(self, linear: nn.Linear, vnni: bool | None = None):
        super().__init__()
        q, scale_f32 = quantize_per_channel(linear.weight)
        scale = scale_f32.to(torch.bfloat16)  # _weight_int8pack_mm takes the activations' dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.vnni = int8_kernel.available() if vnni is None else vnni
        if self.vnni and not int8_kernel.available():
            raise RuntimeError("the int8 VNNI kernel is not available on this machine")
        self.amx = self.vnni and int8_kernel.amx_available()
        if self.vnni:
            self.register_buffer("scale_f32", scale_f32, persistent=False)
        if self.amx:  # a second int8 copy, in tile layout
            self.register_buffer("weight_amx", int8_kernel.pack_amx(q), persistent=False)
        # `weight`, as nn.Linear names it: the dequantized weights, for the many-row GEMM
        self.register_buffer("weight", (q.to(torch.float32) * scale[:, None].float()).bfloat16())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
        self.register_buffer("bias", bias)
        self.batch_invariant = False  # `set_batch_invariant`

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.batch_invariant and is_decode_input(x):
            y = self._decode_rows(rows)
        else:
            y = self._rows(rows)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _rows(self, rows: Tensor) -> Tensor:
        """The fastest kernel for this many rows."""
        if MIN_AMX_ROWS <= rows.shape[0] <= MAX_VNNI_ROWS and self.amx and rows.is_cpu:
            return torch.ops.lln.int8_gemm_amx(rows, self.weight_amx, self.scale_f32)
        if rows.shape[0] <= MAX_VNNI_ROWS and self.vnni and rows.is_cpu:
            return torch.ops.lln.int8_gemv(rows, self.weight_int8, self.scale_f32)
        if rows.shape[0] <= MAX_GEMV_ROWS:
            return torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, self.scale)
        return rows.to(torch.bfloat16) @ self.weight.T

    def _decode_rows(self, rows: Tensor) -> Tensor:
        """One decode token per row, each row the same bits whatever their number: the VNNI
        GEMV at any count (not the AMX GEMM from 5 rows, which sums the groups in another
        order), else PyTorch's int8 kernel at any count (where the bfloat16 GEMM would take
        over from 5 rows with other roundings)."""
        if self.vnni and rows.is_cpu:
            return torch.ops.lln.int8_gemv(rows, self.weight_int8, self.scale_f32)
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, self.scale)

    def dequantized_rows(self, ids: Tensor) -> Tensor:
        rows = self.weight_int8[ids].to(torch.float32)
        return rows * self.scale[ids, None].to(torch.float32)

    def extra_repr(self) -> str:
        kernel = "VNNI GEMV" if self.vnni else "int8pack GEMV"
        kernel += ", AMX GEMM" if self.amx else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {kernel}"


class QuantizedEmbedding(nn.Module):
    """The input embedding read from a QuantizedLinear's weights (a tied LM head): rows
    dequantized on lookup, so the table is held once, quantized."""

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        self.head = head
        self.dtype = dtype

    @property
    def weight(self) -> Tensor:
        return self.head.weight  # bfloat16, dequantized

    def forward(self, ids: Tensor) -> Tensor:
        return self.head.dequantized_rows(ids).to(self.dtype)


def quantize_int8(model: nn.Module, vnni: bool | None = None) -> nn.Module:
    """Every nn.Linear of `model` (the LM head included) becomes an Int8Linear (`vnni`: as
    there), in place; a tied input embedding reads the LM head's int8 weights. Returns the
    model."""
    return replace_linears(model, lambda linear: Int8Linear(linear, vnni))


def replace_linears(
    model: nn.Module, quantized: Callable[[nn.Linear], QuantizedLinear]
) -> nn.Module:
    """Every nn.Linear of `model` (the LM head included) becomes `quantized(linear)`, in place;
    a tied input embedding becomes a QuantizedEmbedding of the new LM head. Returns the model."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and embed.weight is head.weight
    dtype = embed.weight.dtype if embed is not None else torch.float32
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, quantized(child))
    if tied:
        model.set_input_embeddings(QuantizedEmbedding(model.get_output_embeddings(), dtype))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


class Bf16GemmLinear(nn.Module):
    """A float32 nn.Linear whose eager inputs of MIN_BF16_ROWS rows or more (prefill chunks) go
    through a bfloat16 copy of its weights: oneDNN's bfloat16 GEMM (AMX, float32 accumulation,
    output rounded to bfloat16) is 2-4x faster than the float32 GEMM on CPUs with bfloat16
    units. Decode (fewer rows, or a compiled step) stays float32 and exact at any batch size.
    `weight` is the float32 Parameter itself, so a tied embedding stays tied."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight_bf16", linear.weight.detach().bfloat16(), persistent=False)
        self.batch_invariant = False  # `set_batch_invariant`

    def forward(self, x: Tensor) -> Tensor:
        y = self._bf16_gemm(x)
        if y is None:
            return float_linear(x, self.weight, self.bias, self.batch_invariant)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def narrow_forward(self, x: Tensor) -> Tensor:
        """`forward` without widening a bfloat16 GEMM's output (bias-free layers): for callers
        that only reduce it, such as the surprise scores over the vocabulary."""
        y = self._bf16_gemm(x) if self.bias is None else None
        return self(x) if y is None else y

    def _bf16_gemm(self, x: Tensor) -> Tensor | None:
        """x through the bfloat16 weights (bfloat16 output, no bias), or None where the float32
        GEMM runs: few rows, training, or a compiled (decode) step, where the bfloat16 GEMM made
        16 sequences no faster (51.8 vs 55.8 tok/s, bench_engine --dtypes)."""
        rows = x.reshape(-1, self.in_features)
        training = torch.is_grad_enabled() and self.weight.requires_grad
        if rows.shape[0] < MIN_BF16_ROWS or training or torch.compiler.is_compiling():
            return None
        if self.batch_invariant and is_decode_input(x):  # float32 at any decode batch
            return None
        y = F.linear(rows.to(torch.bfloat16), self.weight_bf16)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 GEMM"


class PaddedLinear(nn.Module):
    """A float nn.Linear (the same Parameters, so a tied embedding stays tied) whose calls are
    padded to a multiple of ROW_TILE rows: each row then gets the same bits in a call of any
    size (`set_batch_invariant`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.batch_invariant = True

    def forward(self, x: Tensor) -> Tensor:
        return float_linear(x, self.weight, self.bias, self.batch_invariant)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, padded rows"


def is_decode_input(x: Tensor) -> bool:
    """x [B, 1, K]: one token of each of B sequences (a decode step). A batch-invariant engine
    runs every prefill chunk in a forward of its own ([1, T, K]), so only a decode step's row
    count depends on the other requests."""
    return x.dim() == 3 and x.shape[1] == 1


def float_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pad: bool) -> Tensor:
    """F.linear; pad: computed with zero rows added up to a multiple of ROW_TILE, so that a
    row's bits do not depend on how many rows came with it."""
    rows = x.reshape(-1, x.shape[-1])
    if not pad or rows.shape[0] % ROW_TILE == 0:
        return F.linear(x, weight, bias)
    padded = F.pad(rows, (0, 0, 0, -rows.shape[0] % ROW_TILE))
    y = F.linear(padded, weight, bias)[: rows.shape[0]]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def set_batch_invariant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every linear layer of `model` give a row the same bits whatever the other rows of
    its call (enabled) or pick the fastest kernel by row count (not): int8 and int4 decode rows
    through one kernel, float32 calls padded to a multiple of ROW_TILE rows (plain float32 nn.Linear
    layers become PaddedLinear). In place; call before compiling the decode step (its graphs do
    not re-check the layers). Returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (QuantizedLinear, Bf16GemmLinear, PaddedLinear)):
                child.batch_invariant = enabled
            elif enabled and type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PaddedLinear(child))
    return model


def batch_invariance_is_free(model: nn.Module) -> bool:
    """Whether `set_batch_invariant` costs nothing measured on this machine: int8 weights on a
    CPU without AMX (PyTorch's int8 kernel or the VNNI GEMV at every decode row count; on an
    AVX2 CPU 30.6 / 82.9 tok/s at 1 / 16 sequences against 29.3 / 45.0 without it,
    benchmarks/results/bench_engine_dtypes.md). Not float32 (padding 1 row to 4: 10.7 against
    14.4 tok/s at 1 sequence), nor AMX (the GEMV in its place from 5 rows), nor CUDA. int4
    weights (`models.int4`) count as int8's: their kernel at every decode row count in place of
    the bfloat16 GEMM from 5 rows, as PyTorch's int8 kernel (not yet measured in the engine)."""
    weight = model.get_output_embeddings().weight
    return is_quantized(model) and weight.is_cpu and not int8_kernel.amx_available()


def use_bf16_gemms(model: nn.Module) -> nn.Module:
    """Every float32 nn.Linear of `model` (the LM head included) becomes a Bf16GemmLinear, in
    place. Returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
                setattr(parent, name, Bf16GemmLinear(child))
    return model


def resolve_gemm_dtype(choice: str, weight_dtype: str, device: str) -> torch.dtype | None:
    """`--gemm-dtype` resolved: "auto" is bfloat16 for float32 weights on a CPU with bfloat16
    units; None keeps the weights' dtype."""
    if choice == "auto":
        fast = device == "cpu" and bf16_gemm_is_fast()
        return torch.bfloat16 if fast and weight_dtype == "float32" else None
    return torch.bfloat16 if choice == "bfloat16" else None


def bf16_gemm_is_fast() -> bool:
    """Whether this CPU has bfloat16 units (AVX-512 BF16 or AMX) that oneDNN uses."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
