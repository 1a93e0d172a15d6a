"""The VNNI int8 GEMV and the AMX int8 GEMM (`models/csrc/int8_gemv.cpp`) against a float64
reference of the same arithmetic: activations quantized to int8 in groups of 16 (float32
scales), exact integer dot products, one float32 scale per output channel."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import int8_kernel
from models.quantize import MIN_AMX_ROWS, Int8Linear

pytestmark = pytest.mark.skipif(
    not int8_kernel.available(), reason="the CPU has no AVX-512 VNNI (or no C++ compiler)"
)
GROUP = int8_kernel.GROUP


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 y = scale * (x~ @ w.T); x~ quantized per group as the kernel does (in float32)."""
    m, k = x.shape
    blocks = F.pad(x.float(), (0, -k % GROUP)).view(m, -1, GROUP)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round(blocks / step)  # rounds half to even, as nearbyint
    assert q.abs().max() <= 127
    dequantized = (q.double() * step.double()).view(m, -1)[:, :k]
    return (dequantized @ w.double().T) * scale.double()


def random_case(rows: int, k: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-2, 1, k)  # uneven magnitudes
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01
    return x, w, scale


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("k, n", [(64, 8), (576, 960), (37, 5), (130, 17), (1536, 35), (200, 1)])
def test_int8_gemv_equals_the_float64_reference(rows, k, n):
    """Every row count of a pass (1-4) and several passes (7 = 4 + 3, 16 = 4 x 4), K not a
    multiple of 64 or 4, N not a multiple of the kernel's 8 rows (the prefetching loop, the
    8-row tail and the 1-row tail all run at N = 960, 35, 17)."""
    x, w, scale = random_case(rows, k, n, seed=rows * 1000 + k + n)
    got = torch.ops.lln.int8_gemv(x, w, scale)
    expected = reference(x, w, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-9
    # and on evenly spread activations the block quantization stays close to the exact product
    # (its error measured against the products' magnitudes: a dot product may cancel to ~0)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    got = torch.ops.lln.int8_gemv(x, w, scale)
    exact = (x.double() @ w.double().T) * scale.double()
    magnitude = (x.double().abs() @ w.double().abs().T) * scale.double()
    assert (got.double() - exact).norm() <= 0.01 * magnitude.norm()


def test_int8_gemv_zero_rows_and_blocks():
    """An all-zero block (scale 1 by convention) and an all-zero input give exact zeros."""
    x, w, scale = random_case(2, 130, 9, seed=5)
    x[0] = 0.0
    x[1, :64] = 0.0
    got = torch.ops.lln.int8_gemv(x, w, scale)
    assert torch.equal(got[0], torch.zeros(9))
    expected = reference(x, w, scale)
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_int8_gemv_rejects_what_it_cannot_compute():
    x, w, scale = random_case(5, 64, 8, seed=1)
    with pytest.raises(RuntimeError, match="at least one row"):
        torch.ops.lln.int8_gemv(x[:0], w, scale)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.lln.int8_gemv(x[:2], w[:, :32], scale)
    with pytest.raises(RuntimeError, match="int8 weights"):
        torch.ops.lln.int8_gemv(x[:2], w.float(), scale)


@pytest.mark.parametrize("rows", [3, pytest.param(8, marks=pytest.mark.skipif(
    not int8_kernel.amx_available(), reason="the CPU has no AMX-INT8"))])  # fmt: skip
def test_int8_linear_decode_rows_run_the_kernel_eager_and_compiled(rows):
    """Int8Linear sends decode rows to the kernel (VNNI up to 4 rows, AMX from 5 where the CPU
    has it), also from inside torch.compile (the op is called from the compiled graph, not
    traced through), with identical results."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 192, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(192, 576, generator=gen) * 0.05)
    layer = Int8Linear(linear, vnni=True)
    assert "scale_f32" not in layer.state_dict() and "VNNI" in repr(layer)
    assert "weight_amx" not in layer.state_dict()
    x = torch.randn(1, rows, 576, generator=gen)
    expected = reference(x.view(rows, 576), layer.weight_int8, layer.scale_f32)
    expected = expected + linear.bias.double()
    compiled = torch.compile(layer, dynamic=False)
    with torch.no_grad():
        compiled(x)  # compiles
        with torch.profiler.profile() as prof:
            eager = layer(x)
            got = compiled(x)
    assert torch.equal(got, eager)
    assert (eager.view(rows, 192).double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    op = "lln::int8_gemv" if rows < MIN_AMX_ROWS else "lln::int8_gemm_amx"
    calls = [e.name for e in prof.events() if e.name.startswith("lln::")]
    assert calls == [op, op], calls


@pytest.mark.parametrize("k, n", [(576, 200), (130, 37)])
def test_int8_gemv_rows_do_not_depend_on_their_batch(k, n):
    """A row's output is bit-identical alone and among any number of rows, at any place among
    them (a sequence decodes the same in any decode batch), N a multiple of 8 or not."""
    x, w, scale = random_case(40, k, n, seed=8)
    alone = torch.cat([torch.ops.lln.int8_gemv(x[i : i + 1], w, scale) for i in range(40)])
    for rows in (2, 3, 4, 5, 7, 16, 17, 40):
        assert torch.equal(torch.ops.lln.int8_gemv(x[:rows], w, scale), alone[:rows]), rows
        shifted = torch.ops.lln.int8_gemv(x[40 - rows :], w, scale)
        assert torch.equal(shifted, alone[40 - rows :]), rows


needs_amx = pytest.mark.skipif(not int8_kernel.amx_available(), reason="the CPU has no AMX-INT8")


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("k, n", [(64, 16), (576, 960), (37, 5), (130, 17), (1536, 35)])
def test_int8_gemm_amx_equals_the_float64_reference(rows, k, n):
    """The AMX kernel computes what the VNNI one does: one tile of rows (1-16) and several
    (17 = 16 + 1, 40), K not a multiple of 64 or of a group, N not a multiple of 16 (the masked
    last channel group)."""
    x, w, scale = random_case(rows, k, n, seed=rows * 1000 + k + n)
    got = torch.ops.lln.int8_gemm_amx(x, int8_kernel.pack_amx(w), scale)
    expected = reference(x, w, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-9
    vnni = torch.ops.lln.int8_gemv(x, w, scale)  # the same arithmetic but for the float sums' order
    assert (got - vnni).abs().max() <= 1e-5 * vnni.abs().max()


@needs_amx
def test_int8_gemm_amx_rows_do_not_depend_on_their_batch():
    """Alone, among 16 or among 40 rows (three tiles), AMX gives a row the same bits."""
    x, w, scale = random_case(40, 576, 200, seed=9)
    packed = int8_kernel.pack_amx(w)
    together = torch.ops.lln.int8_gemm_amx(x, packed, scale)
    first16 = torch.ops.lln.int8_gemm_amx(x[:16], packed, scale)
    assert torch.equal(first16, together[:16])
    for i in (0, 7, 15, 16, 39):
        alone = torch.ops.lln.int8_gemm_amx(x[i : i + 1], packed, scale)
        assert torch.equal(together[i : i + 1], alone)


@needs_amx
def test_int8_gemm_amx_rejects_what_it_cannot_compute():
    x, w, scale = random_case(5, 64, 16, seed=1)
    packed = int8_kernel.pack_amx(w)
    with pytest.raises(RuntimeError, match="at least one row"):
        torch.ops.lln.int8_gemm_amx(x[:0], packed, scale)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.lln.int8_gemm_amx(torch.ones(5, 128), packed, scale)  # K in another block
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.lln.int8_gemm_amx(x, packed, torch.ones(40))
    with pytest.raises(RuntimeError, match="int8 weights"):
        torch.ops.lln.int8_gemm_amx(x, packed.float(), scale)


def test_pack_amx_puts_each_channels_four_weights_in_a_tile_row():
    w = torch.arange(20 * 70, dtype=torch.int32).remainder(251).sub(125).to(torch.int8).view(20, 70)
    packed = int8_kernel.pack_amx(w)
    assert packed.shape == (2, 128 // GROUP, GROUP // 4, 16, 4)
    for n, k in [(0, 0), (5, 17), (19, 69), (16, 64)]:
        assert packed[n // 16, k // GROUP, (k % GROUP) // 4, n % 16, k % 4] == w[n, k]
    assert packed[1, :, :, 4:].abs().sum() == 0 and packed[:, 70 // GROUP + 1 :].abs().sum() == 0
