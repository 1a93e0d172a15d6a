"""The int8 decode kernels side by side over the default model's linear layers (30 layers of 7
matmuls and the 49,152 x 576 LM head, random int8 weights streamed from memory): lln-serve's VNNI
GEMV, its AMX GEMM, PyTorch's `_weight_int8pack_mm` and the bfloat16 GEMM on dequantized weights,
at the row counts of a decode batch; and PyTorch's 4-bit kernel `_weight_int4pack_mm_for_cpu`
(`--dtype int4`, `models/int4.py`: random 4-bit weights in groups of 32).

    .venv/bin/python benchmarks/bench_int8_kernels.py [--rows 1 2 4 5 8 16] [--rounds 7]

Rounds alternate the kernels; each cell is the fastest round's ms for all 211 matmuls.
Writes benchmarks/results/bench_int8_kernels.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models import int8_kernel
from models.int4 import GROUP

HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN),
                (HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]  # fmt: skip


def model_weights() -> list[dict]:
    """(K, N) of every matmul of a decode step, with its weights in each kernel's format."""
    gen = torch.Generator().manual_seed(0)
    weights = []
    for k, n in LAYER_SHAPES * LAYERS + [(HIDDEN, VOCAB)]:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) * 0.01
        entry = {"k": k, "q": q, "scale": scale, "scale_bf16": scale.bfloat16()}
        entry["bf16"] = (q.float() * scale[:, None]).bfloat16()
        q4 = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        entry["int4"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
        entry["int4_scales_and_zeros"] = (
            torch.rand(k // GROUP, n, 2, generator=gen) * 0.01
        ).bfloat16()
        if int8_kernel.amx_available():
            entry["packed"] = int8_kernel.pack_amx(q)
        weights.append(entry)
    return weights


def kernels() -> dict[str, Callable[[torch.Tensor, dict], torch.Tensor]]:
    table = {
        "PyTorch _weight_int8pack_mm": lambda x, w: torch._weight_int8pack_mm(
            x.bfloat16(), w["q"], w["scale_bf16"]
        ),
        "bfloat16 GEMM": lambda x, w: x.bfloat16() @ w["bf16"].T,
        "PyTorch _weight_int4pack_mm_for_cpu (int4)": lambda x, w: (
            torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.bfloat16(), w["int4"], GROUP, w["int4_scales_and_zeros"]
            )
        ),
    }
    if int8_kernel.available():
        table["VNNI GEMV"] = lambda x, w: torch.ops.lln.int8_gemv(x, w["q"], w["scale"])
    if int8_kernel.amx_available():
        table["AMX GEMM"] = lambda x, w: torch.ops.lln.int8_gemm_amx(x, w["packed"], w["scale"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    weights, table = model_weights(), kernels()
    results = {name: {} for name in table}
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
        times = {name: [] for name in table}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, kernel in table.items():
                    began = time.perf_counter()
                    for w in weights:
                        kernel(inputs[w["k"]], w)
                    times[name].append(time.perf_counter() - began)
        for name in table:
            results[name][rows] = min(times[name]) * 1e3
        print(rows, {name: f"{results[name][rows]:.2f}" for name in table}, flush=True)
    lines = [
        f"# int8 and int4 decode kernels over the default model's {len(weights)} matmuls, "
        f"{torch.get_num_threads()} threads",
        "",
        f"`.venv/bin/python benchmarks/bench_int8_kernels.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; ms for all the matmuls of one "
        f"decode step (fastest of {args.rounds} alternating rounds).",
        "",
        "| kernel | " + " | ".join(f"{r} rows" for r in args.rows) + " |",
        "|---|" + "---|" * len(args.rows),
        *(f"| {name} | " + " | ".join(f"{results[name][r]:.2f}" for r in args.rows) + " |"
          for name in table),
    ]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_int8_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
