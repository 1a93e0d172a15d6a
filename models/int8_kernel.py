"""The int8 GEMV of a decode step on AVX-512 VNNI CPUs (`csrc/int8_gemv.cpp`), as the op
`torch.ops.lln.int8_gemv(x, w, scale)`.

The C++ source is compiled with `torch.utils.cpp_extension` on first use (about 20 s, then cached
under $TORCH_EXTENSIONS_DIR) by the same compiler torch.compile needs on a CPU. Where it cannot be
built or the CPU lacks VNNI, `available()` is False and int8 layers keep PyTorch's
`_weight_int8pack_mm`. `LLN_SERVE_INT8_KERNEL=0` turns it off.

Semantics: y = scale * (x~ @ w.T), where x~ is x quantized to int8 in groups of GROUP values
along K, one float32 scale (max |x| / 127) per group, rounding to nearest even; the products
are exact (int32), the sums of the groups float32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

from lln_core.ops.extension import build, usable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_gemv.cpp"
GROUP = 4


@functools.cache
def available() -> bool:
    """Whether `torch.ops.lln.int8_gemv` runs here (builds and loads it on the first call)."""
    return usable("LLN_SERVE_INT8_KERNEL", lambda: _build(),
                  lambda: torch.ops.lln.int8_gemv_supported(), log,
                  "int8 decode uses _weight_int8pack_mm")  # fmt: skip


def _build() -> None:
    build("lln_int8_gemv", SOURCE)
    torch.library.register_fake("lln::int8_gemv")(_fake_int8_gemv)


def _fake_int8_gemv(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)
