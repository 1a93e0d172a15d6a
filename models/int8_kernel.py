"""The int8 matmuls of a decode step (`csrc/int8_gemv.cpp`): on AVX-512 VNNI CPUs
`torch.ops.lln.int8_gemv(x, w, scale)` (weights [N, K] as stored, fastest for a few rows), and on
CPUs with AMX-INT8 `torch.ops.lln.int8_gemm_amx(x, packed, scale)` (weights in the tile layout
of `pack_amx`, fastest from 5 rows: a decode batch of many sequences).

The C++ source is compiled with `torch.utils.cpp_extension` on first use (about 20 s, then cached
under $TORCH_EXTENSIONS_DIR) by the same compiler torch.compile needs on a CPU. Where it cannot be
built or the CPU lacks VNNI, `available()` is False and int8 layers keep PyTorch's
`_weight_int8pack_mm`. `LLN_SERVE_INT8_KERNEL=0` turns both off, `LLN_SERVE_AMX=0` the AMX one.

Semantics (both ops): y = scale * (x~ @ w.T), where x~ is x quantized to int8 in groups of
GROUP values along K, one float32 scale (max |x| / 127) per group, rounding to nearest even;
each group's products sum exactly (int32), the scaled groups in float32.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from lln_core.ops.extension import build, usable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_gemv.cpp"
GROUP = 16
AMX_CHANNELS = 16  # output channels per tile


@functools.cache
def available() -> bool:
    """Whether `torch.ops.lln.int8_gemv` runs here (builds and loads it on the first call)."""
    return usable("LLN_SERVE_INT8_KERNEL", lambda: _build(),
                  lambda: torch.ops.lln.int8_gemv_supported(), log,
                  "int8 decode uses _weight_int8pack_mm")  # fmt: skip


@functools.cache
def amx_available() -> bool:
    """Whether `torch.ops.lln.int8_gemm_amx` runs here: the kernel builds and the CPU (and the
    kernel, which asks Linux for the tile state) has AMX-INT8."""
    if os.environ.get("LLN_SERVE_AMX", "1") == "0" or not available():
        return False
    return bool(torch.ops.lln.int8_gemm_amx_supported())


def pack_amx(weight: Tensor) -> Tensor:
    """int8 weights [N, K] -> the tile layout of int8_gemm_amx, [ceil(N / 16), Kp / GROUP,
    GROUP / 4, 16, 4] with Kp = K rounded up to 64, zero-padded: for 16 output channels and one
    group of K, row i of a tile holds each channel's 4 weights at K = 4i .. 4i + 3."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -k % 64, 0, -n % AMX_CHANNELS))
    groups, kp = padded.shape[0] // AMX_CHANNELS, padded.shape[1]
    tiles = padded.view(groups, AMX_CHANNELS, kp // GROUP, GROUP // 4, 4)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


def _build() -> None:
    build("lln_int8_gemv", SOURCE)
    torch.library.register_fake("lln::int8_gemv")(_fake_int8_gemv)
    torch.library.register_fake("lln::int8_gemm_amx")(_fake_int8_gemm_amx)


def _fake_int8_gemv(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def _fake_int8_gemm_amx(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], scale.shape[0]), dtype=torch.float32)
