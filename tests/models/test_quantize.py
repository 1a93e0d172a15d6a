"""CPU weight formats: weight-only int8 (`--dtype int8`) and float32 with bfloat16 GEMMs
(`--gemm-dtype bfloat16`): the kernels against a float64 reference, the models."""

import pytest
import torch
from torch import nn

from models import int8_kernel
from models.quantize import (
    MAX_GEMV_ROWS,
    MAX_VNNI_ROWS,
    MIN_BF16_ROWS,
    Bf16GemmLinear,
    Int8Linear,
    QuantizedEmbedding,
    is_quantized,
    quantize_int8,
    quantize_per_channel,
    use_bf16_gemms,
)
from models.registry import load_model
from tests.models.conftest import tiny_model
from tests.models.test_int8_kernel import reference as vnni_reference

needs_vnni = pytest.mark.skipif(not int8_kernel.available(), reason="no AVX-512 VNNI kernel here")


def test_per_channel_rounding_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=gen) * torch.logspace(-3, 1, 40)[:, None]
    weight[7] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.all((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-12)
    assert torch.all(q[7] == 0) and scale[7] == 1.0


@pytest.mark.parametrize("rows", [1, MAX_GEMV_ROWS, MAX_GEMV_ROWS + 1, MAX_VNNI_ROWS, 37])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vnni", [False, pytest.param(True, marks=needs_vnni)])
def test_int8_linear_equals_a_float64_reference(rows, bias, vnni):
    """The kernels (VNNI up to 16 rows, int8pack up to 4, bfloat16 GEMM for more) compute x times
    q * scale: x in bfloat16, to the bfloat16 rounding of the output, except VNNI's, which is
    the float64 reference of its own arithmetic (x in int8 blocks, float32 scales)."""
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(80, generator=gen))
    layer = Int8Linear(linear, vnni=vnni)
    x = torch.randn(rows, 96, generator=gen)
    weight = layer.weight_int8.double() * layer.scale.double()[:, None]
    if vnni and rows <= MAX_VNNI_ROWS:
        expected = vnni_reference(x, layer.weight_int8, layer.scale_f32)
        tolerance = 1e-5 * expected.abs().max()
    else:
        expected = x.bfloat16().double() @ weight.T
        tolerance = 2**-7 * expected.abs().max() + 1e-3
    if bias:
        expected = expected + linear.bias.double()
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 80)
    assert (got.double() - expected).abs().max() <= tolerance
    # and the weights are the float ones to half a step of each channel
    assert torch.all((weight - linear.weight.double()).abs() <= layer.scale.double()[:, None])


def test_quantized_model_is_close_to_float32_and_decodes_compiled():
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=64, tie_word_embeddings=True,
                       sparse_cache_size=3, sparse_span=1, kv_cache_dtype="bfloat16")  # fmt: skip
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, _ = model.forward_states(ids)
        quantize_int8(model)
        assert is_quantized(model)
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
        logits, states = model.forward_states(ids)
        assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
        assert_compiled_step_equals_eager(model, logits, states)


@torch.no_grad()
def assert_compiled_step_equals_eager(model, logits, states) -> None:
    """The next greedy token's compiled in-place decode step (as the server runs it on a CPU)
    gives the eager step's logits."""
    token = logits[:, -1:].argmax(-1)
    clones = [s.clone() for s in states]
    eager, _ = model.forward_states(token, states)
    model.compile_decode(cpp_wrapper=True)
    compiled, _ = model.forward_states(token, clones, in_place=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


def test_load_model_int8_from_a_checkpoint(tmp_path, char_tokenizer):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29)
    model.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype=torch.int8)
    assert is_quantized(loaded)
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
        expected, _ = model.forward_states(ids)
        got, _ = loaded.forward_states(ids)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("rows", [1, MIN_BF16_ROWS // 2 - 1, MIN_BF16_ROWS // 2, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_gemm_linear_equals_a_float64_reference(rows, bias):
    """Below MIN_BF16_ROWS rows (2 x rows here) the float32 weights, exactly as nn.Linear; from
    it, x and W in bfloat16 with the output to bfloat16's rounding; with autograd on, always
    float32."""
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen) * 0.1)
    layer = Bf16GemmLinear(linear)
    assert layer.weight is linear.weight and "weight_bf16" not in layer.state_dict()
    x = torch.randn(2, rows, 96, generator=gen)
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (2, rows, 80)
    exact = linear(x)
    if 2 * rows < MIN_BF16_ROWS:
        assert torch.equal(got, exact)
    else:
        expected = x.bfloat16().double() @ linear.weight.bfloat16().double().T
        if bias:
            expected = expected + linear.bias.double()
        tolerance = 2**-7 * expected.abs().max() + 1e-3
        assert (got.double() - expected).abs().max() <= tolerance
        assert not torch.equal(got, exact)  # the bfloat16 path did run
    assert torch.equal(layer(x), exact)  # grad enabled, trainable weights: float32


@pytest.mark.parametrize("rows", [MIN_BF16_ROWS // 2 - 1, MIN_BF16_ROWS // 2])
def test_bf16_gemm_narrow_forward_keeps_the_gemms_bfloat16(rows):
    """narrow_forward: on the bfloat16 path the GEMM's own bfloat16 output, the same numbers
    forward widens; below the row threshold (and with a bias) forward itself."""
    gen = torch.Generator().manual_seed(rows)
    layer = Bf16GemmLinear(nn.Linear(96, 80, bias=False))
    x = torch.randn(2, rows, 96, generator=gen)
    with torch.no_grad():
        narrow, wide = layer.narrow_forward(x), layer(x)
        with_bias = Bf16GemmLinear(nn.Linear(96, 80, bias=True))
        assert torch.equal(with_bias.narrow_forward(x), with_bias(x))
    assert narrow.shape == wide.shape == (2, rows, 80)
    assert narrow.dtype == (torch.bfloat16 if 2 * rows >= MIN_BF16_ROWS else torch.float32)
    assert torch.equal(narrow.float(), wide)


def test_bf16_gemm_model_keeps_decode_exact_and_prefill_close():
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=64, tie_word_embeddings=True)
    ids = torch.randint(0, 64, (2, MIN_BF16_ROWS // 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, ref_states = model.forward_states(ids)
        token = reference[:, -1:].argmax(-1)
        ref_step, _ = model.forward_states(token, ref_states)
        use_bf16_gemms(model)
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
        logits, _ = model.forward_states(ids)
        step, _ = model.forward_states(token, ref_states)  # 2 rows: float32, as before
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert not torch.equal(logits, reference)
    assert torch.equal(step, ref_step)


def test_load_model_with_bf16_gemms(tmp_path, char_tokenizer):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29)
    model.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), gemm_dtype=torch.bfloat16)
    assert any(isinstance(m, Bf16GemmLinear) for m in loaded.modules())
    plain, _ = load_model(str(tmp_path))
    assert not any(isinstance(m, Bf16GemmLinear) for m in plain.modules())


def test_int8_falls_back_to_pytorch_where_the_vnni_kernel_cannot_be_built(monkeypatch, caplog):
    """No compiler, a failed build or the switch LLN_SERVE_INT8_KERNEL=0: `available()` says
    False (with a warning for a failed build) and int8 layers take `_weight_int8pack_mm`."""

    def failed_build():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(int8_kernel, "_build", failed_build)
    with caplog.at_level("WARNING", logger="models.int8_kernel"):
        assert int8_kernel.available.__wrapped__() is False
    assert "no C++ compiler" in caplog.text
    monkeypatch.setenv("LLN_SERVE_INT8_KERNEL", "0")
    assert int8_kernel.available.__wrapped__() is False
    monkeypatch.setattr(int8_kernel, "available", lambda: False)
    linear = nn.Linear(96, 80)
    layer = Int8Linear(linear)
    assert not layer.vnni and "scale_f32" not in dict(layer.named_buffers())
    x = torch.randn(2, 96)
    weight = layer.weight_int8.double() * layer.scale.double()[:, None]
    expected = x.bfloat16().double() @ weight.T + linear.bias.double()
    assert (layer(x).double() - expected).abs().max() <= 2**-7 * expected.abs().max() + 1e-3
    with pytest.raises(RuntimeError, match="not available"):
        Int8Linear(linear, vnni=True)
