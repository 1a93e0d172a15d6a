"""CPU weight-only 4-bit layers (`--dtype int4`, `models/int4.py`): the grid recovered bitwise,
the kernel against a float64 reference, the tied embedding, the models (compiled decode, batch
invariance, loading)."""

import pytest
import torch
from torch import Tensor, nn

from models.int4 import (
    GROUP,
    MAX_INT4_ROWS,
    Int4Linear,
    dequantize_groups,
    pack_nibbles,
    quantize_groups,
    quantize_int4,
    unpack_nibbles,
)
from models.quantize import (
    Int8Linear,
    QuantizedEmbedding,
    is_quantized,
    set_batch_invariant,
)
from models.registry import load_model
from tests.models.conftest import tiny_model
from tests.models.test_batch_invariance import BATCHES, states_rows
from tests.models.test_quantize import assert_compiled_step_equals_eager


def q4_1_weight(n: int, k: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w, q, d, m): w = q * d + m in float32 from float16 d and m, as a Q4_1 GGUF holds them,
    each group with its minimum at q = 0 and its maximum at q = 15 (llama.cpp's rounding)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    q = q[..., torch.randperm(GROUP, generator=gen)].reshape(n, k).to(torch.uint8)
    d = (torch.rand(n, k // GROUP, generator=gen) * 0.01 + 1e-4).half().float()
    m = (-8 * d * (1 + 0.2 * torch.randn(n, k // GROUP, generator=gen))).half().float()
    w = (q.float().unflatten(-1, (-1, GROUP)) * d[..., None] + m[..., None]).flatten(-2)
    return w, q, d, m


def linear_of(weight: Tensor, bias: bool = False) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias:
            linear.bias.copy_(torch.randn(weight.shape[0], generator=torch.Generator()))
    return linear


def test_a_q4_1_grid_comes_back_bitwise():
    w, q, d, m = q4_1_weight(48, 576)
    got_q, got_d, got_m = quantize_groups(w)
    assert torch.equal(got_q, q) and torch.equal(got_d, d) and torch.equal(got_m, m)
    assert torch.equal(dequantize_groups(got_q, got_d, got_m), w)
    layer = Int4Linear(linear_of(w))
    assert torch.equal(layer.dequantized_rows(torch.arange(48)), w)
    assert torch.equal(layer.weight, w.bfloat16())


def test_off_grid_weights_round_to_within_half_a_step_and_a_constant_group_is_exact():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 96, generator=gen) * torch.logspace(-3, 1, 16)[:, None]
    weight[3, 32:64] = 0.25  # a constant group: d = 0
    q, d, m = quantize_groups(weight)
    assert q.dtype == torch.uint8 and int(q.max()) == 15 and int(q.min()) == 0
    assert d[3, 1] == 0 and torch.all(q[3, 32:64] == 0)
    back = dequantize_groups(q, d, m)
    step = d.repeat_interleave(GROUP, dim=1)
    assert torch.all((back - weight).abs() <= step / 2 + 1e-6 * weight.abs())
    assert torch.equal(back[3, 32:64], weight[3, 32:64])
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


@pytest.mark.parametrize("rows", [1, 2, 4, 5, MAX_INT4_ROWS, MAX_INT4_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_equals_a_float64_reference(rows, bias):
    """Up to MAX_INT4_ROWS the 4-bit kernel, then the bfloat16 GEMM: both compute x in
    bfloat16 times the 4-bit weights (the kernel's scale and zero rounded to bfloat16, 2^-9 of
    a weight's magnitude; the GEMM's weights to bfloat16, the same) to the bfloat16 rounding of
    the output (2^-9), float32 sums: within 2^-7 of the largest output."""
    w, _, _, _ = q4_1_weight(80, 96, seed=rows)
    linear = linear_of(w, bias)
    layer = Int4Linear(linear)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    expected = x.bfloat16().double() @ w.double().T
    tolerance = 2**-7 * expected.abs().max() + 1e-4
    if bias:
        expected = expected + linear.bias.double()
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 80)
    assert (got.double() - expected).abs().max() <= tolerance
    # the kernel (not the GEMM) up to MAX_INT4_ROWS: its roundings differ from the GEMM's
    gemm = (x.bfloat16() @ layer.weight.T).float() + (linear.bias if bias else 0)
    assert torch.equal(got, gemm) == (rows > MAX_INT4_ROWS)


def test_shapes_the_kernel_does_not_take_stay_int8():
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear(nn.Linear(48, 32))
    with pytest.raises(ValueError, match="out_features of 16"):
        Int4Linear(nn.Linear(64, 29))
    model = quantize_int4(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 29), nn.Linear(29, 16)))
    assert [type(m) for m in model] == [Int4Linear, Int8Linear, Int8Linear]


def test_tied_embedding_reads_the_heads_dequantized_rows():
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=64, tie_word_embeddings=True)
    quantize_int4(model, int4_head=True)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, Int4Linear) and isinstance(embed, QuantizedEmbedding)
    assert embed.head is head and embed.weight is head.weight
    ids = torch.tensor([[0, 5, 63, 5]])
    rows = dequantize_groups(unpack_nibbles(head.weight_int4), head.group_scale, head.group_min)
    got = embed(ids)
    assert got.dtype == torch.float32 and torch.equal(got, rows[ids])


def test_int4_model_is_close_to_float32_and_decodes_compiled():
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=64, tie_word_embeddings=True,
                       sparse_cache_size=3, sparse_span=1, kv_cache_dtype="bfloat16")  # fmt: skip
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, _ = model.forward_states(ids)
        quantize_int4(model)  # the LM head int8 (the default model's is Q8_0), the rest int4
        assert is_quantized(model) and not any(type(m) is nn.Linear for m in model.modules())
        assert isinstance(model.lm_head, Int8Linear)
        assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14
        logits, states = model.forward_states(ids)
        assert (logits - reference).abs().max() < 0.1 * reference.abs().max()
        assert_compiled_step_equals_eager(model, logits, states)


def test_a_decode_row_has_the_same_bits_in_any_batch():
    w, _, _, _ = q4_1_weight(1536, 576)
    model = set_batch_invariant(nn.Sequential(Int4Linear(linear_of(w, bias=True))))
    x = torch.randn(40, 1, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1]) for i in range(40)])
        for batch in BATCHES:
            assert torch.equal(model(x[:batch]), alone[:batch]), batch
            assert torch.equal(model(x[40 - batch :]), alone[40 - batch :]), batch
        set_batch_invariant(model, enabled=False)  # the GEMM beyond MAX_INT4_ROWS: other bits
        rows = MAX_INT4_ROWS + 1
        assert not torch.equal(model(x[:rows]), alone[:rows])


def test_an_int4_model_decodes_alike_in_any_batch():
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=64, hidden_size=64,
                       intermediate_size=192, tie_word_embeddings=True)  # fmt: skip
    set_batch_invariant(quantize_int4(model, int4_head=True))
    ids = torch.randint(1, 64, (20, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, states = model.forward_states(ids)
        token = ids[:, :1]
        alone, _ = model.forward_states(token[:1], states_rows(states, 1))
        for batch in (2, 5, MAX_INT4_ROWS + 1, 20):
            logits, _ = model.forward_states(token[:batch], states_rows(states, batch))
            assert torch.equal(logits[:1], alone), batch


def test_load_model_int4_from_a_checkpoint(tmp_path, char_tokenizer):
    """vocab 29: the LM head is not a multiple of 16 rows, so it (and the tied embedding) stay
    int8, the other layers int4."""
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29)
    model.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype=torch.int4)
    assert isinstance(loaded.get_output_embeddings(), Int8Linear)
    assert sum(isinstance(m, Int4Linear) for m in loaded.modules()) == 14
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
        expected, _ = model.forward_states(ids)
        got, _ = loaded.forward_states(ids)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    with pytest.raises(ValueError, match="CPU only"):
        load_model(str(tmp_path), dtype=torch.int4, device="cuda")
