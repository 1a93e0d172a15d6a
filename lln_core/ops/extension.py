"""Build and load a C++ op library of this package with `torch.utils.cpp_extension`.

Compiled on first use (about 20 s, then cached under $TORCH_EXTENSIONS_DIR) by the same compiler
torch.compile needs on a CPU; each caller keeps a PyTorch fallback for where that fails.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path


def build(name: str, source: Path) -> None:
    """Compile `source` (which registers its ops under torch.ops.lln) and load it."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp"]  # at::parallel_for's OpenMP pragma, as torch.compile's kernels
    load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         is_python_module=False)  # fmt: skip


def usable(
    switch: str, build_it: Callable[[], None], supported: Callable[[], bool],
    log: logging.Logger, fallback: str,
) -> bool:  # fmt: skip
    """Whether a kernel runs here: not where the environment variable `switch` is "0" or off
    x86-64; else `build_it()` (a failure is logged with what runs instead, `fallback`) and the
    kernel's own CPU check, `supported()`."""
    if os.environ.get(switch, "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        build_it()
    except Exception as error:  # no compiler, no ninja, a failed build: the fallback still works
        log.warning("kernel not built (%s); %s", error, fallback)
        return False
    return bool(supported())
