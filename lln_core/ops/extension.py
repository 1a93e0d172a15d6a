"""Build and load a C++ op library of this package with `torch.utils.cpp_extension`.

Compiled on first use (about 20 s, then cached under $TORCH_EXTENSIONS_DIR) by the same compiler
torch.compile needs on a CPU; each caller keeps a PyTorch fallback for where that fails.
"""

from __future__ import annotations

from pathlib import Path


def build(name: str, source: Path) -> None:
    """Compile `source` (which registers its ops under torch.ops.lln) and load it."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp"]  # at::parallel_for's OpenMP pragma, as torch.compile's kernels
    load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         is_python_module=False)  # fmt: skip
