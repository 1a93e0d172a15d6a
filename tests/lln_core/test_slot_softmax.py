"""Softmax parts of decode queries over stored slots: the AVX-512 kernel
(`lln_core/ops/csrc/slot_softmax.cpp`) and its PyTorch fallback against a float64 reference,
and the merge of parts against one softmax over all slots."""

import logging

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lln_core.ops import slot_softmax as ss

pytestmark = pytest.mark.skipif(
    not ss.available(), reason="the CPU has no AVX-512 (or no C++ compiler)"
)
NEG_INF = float("-inf")


def reference(q, k, v, bias):
    """float64 (num, den, top) from scratch."""
    q, k, v, bias = (x.double() for x in (q, k, v, bias))
    logits = q @ k.transpose(-1, -2) + bias[:, None, None, :]
    top = logits.amax(dim=-1) if logits.shape[-1] else logits.sum(-1) - float("inf")
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0)[..., None])
    return weights @ v, weights.sum(-1), top


def random_case(batch, heads, group, dim, slots, v_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, group, dim, generator=gen) * 0.5
    k = (torch.randn(batch, heads, slots, dim, generator=gen) * 2).to(dtype)
    v = torch.randn(batch, heads, slots, v_dim, generator=gen).to(dtype)
    bias = torch.randn(batch, slots, generator=gen)
    bias[torch.rand(batch, slots, generator=gen) < 0.3] = NEG_INF
    if batch > 1:
        bias[-1] = NEG_INF  # a row that sees no slot
    return q, k, v, bias


def assert_parts_close(got, expected, tol):
    (num, den, top), (ref_num, ref_den, ref_top) = got, expected
    assert num.dtype == den.dtype == top.dtype == torch.float32
    assert torch.equal(torch.isfinite(top), torch.isfinite(ref_top))
    assert torch.equal(top[~torch.isfinite(top)], ref_top[~torch.isfinite(ref_top)])
    seen = torch.isfinite(ref_top)
    assert torch.equal(den[~seen], torch.zeros_like(den[~seen]))
    assert torch.equal(num[~seen], torch.zeros_like(num[~seen]))
    if seen.any():
        assert (top[seen].double() - ref_top[seen]).abs().max() <= tol
    # relative to each query's total mass: den >= 1 (the max slot weighs 1)
    assert ((den.double() - ref_den).abs() / ref_den.clamp_min(1)).max() <= tol
    assert ((num.double() - ref_num).abs() / ref_den[..., None].clamp_min(1)).max() <= tol


CASES = [  # batch, heads, group, dim, slots, v_dim: compiled-in shapes and the generic path
    (1, 3, 3, 64, 912, 64),  # the default model's sparse cache
    (2, 3, 3, 64, 452, 64),  # its window, two rows
    (3, 2, 6, 64, 129, 64),  # one slot past a block
    (2, 1, 2, 128, 300, 128),
    (2, 2, 5, 128, 77, 128),  # G x D too many registers: generic
    (2, 2, 7, 32, 200, 16),  # generic: G, D, Dv
    (1, 1, 1, 16, 1, 16),
    (2, 1, 16, 64, 0, 64),  # no slots at all
]


@pytest.mark.parametrize(
    "dtype, v_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16),
     (torch.bfloat16, torch.float32)],
    ids=["float32", "bfloat16", "float32-keys-bfloat16-values", "bfloat16-keys-float32-values"],
)  # fmt: skip
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_float64_reference(case, dtype, v_dtype):
    """Keys and values each float32 or bfloat16 (grouped far positions read keys rotated in
    float32 beside the bfloat16 values they were stored with)."""
    q, k, v, bias = random_case(*case, dtype, seed=sum(case))
    v = v if v_dtype is None else v.to(v_dtype)
    assert ss.kernel_fits(q, k, v)
    got = torch.ops.lln.slot_softmax(q, k, v, bias)
    assert [t.shape for t in got] == [(*q.shape[:3], v.shape[-1]), q.shape[:3], q.shape[:3]]
    assert_parts_close(got, reference(q, k, v, bias), tol=2e-5)


def test_kernel_reads_strided_slots():
    """Keys and values as views into wider tensors (a slice of the slots, a slice of the heads)
    and a bias that is a column slice: read in place, the same result as contiguous copies."""
    q, k, v, bias = random_case(2, 4, 3, 64, 500, 64, torch.bfloat16, seed=3)
    wide_bias = torch.cat([bias, torch.zeros(2, 7)], dim=1)
    views = (q[:, 1:3], k[:, 1:3, 50:400], v[:, 1:3, 50:400], wide_bias[:, 50:400])
    copies = [t.contiguous() for t in views]
    got, expected = torch.ops.lln.slot_softmax(*views), torch.ops.lln.slot_softmax(*copies)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_fallback_is_exact_in_float64():
    """float64 queries take the PyTorch path: the reference's own arithmetic."""
    q, k, v, bias = random_case(2, 3, 3, 64, 300, 64, torch.float64, seed=4)
    q = q.double()
    assert not ss.kernel_fits(q, k, v)
    got = ss.slot_softmax(q, k, v, bias.double())
    for a, b in zip(got, reference(q, k, v, bias), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_parts_merge_into_one_softmax_over_every_slot():
    """Window, one new slot, cache and a pseudo-slot: the same output as one softmax over the
    concatenated logits, whichever part holds the max; a part that sees nothing weighs 0."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 3, 64, generator=gen, dtype=torch.float64)
    blocks = [torch.randn(2, 3, n, 64, generator=gen, dtype=torch.float64) for n in (40, 1, 25)]
    biases = [torch.zeros(2, 40), torch.zeros(2, 1), torch.full((2, 25), NEG_INF)]
    biases[0][0, :30] = NEG_INF
    parts = [ss.slot_softmax(q, kv, kv, b.double()) for kv, b in zip(blocks, biases, strict=True)]
    extra_logit = torch.randn(2, 3, 3, 1, generator=gen, dtype=torch.float64) * 10
    extra_value = torch.randn(2, 3, 1, 64, generator=gen, dtype=torch.float64)
    parts.append(ss.one_slot(extra_logit, extra_value))
    got = ss.softmax_of_parts(parts)

    keys = torch.cat([*blocks, extra_value], dim=2)
    slot_logits = q @ torch.cat(blocks, 2).transpose(-1, -2)
    slot_logits = slot_logits + torch.cat(biases, 1).double()[:, None, None]
    logits = torch.cat([slot_logits, extra_logit], dim=-1)
    expected = torch.softmax(logits, dim=-1) @ keys
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_compiled_code_calls_the_kernel():
    """Under torch.compile the op is called as it is (profiler), with the eager result."""
    q, k, v, bias = random_case(1, 3, 3, 64, 912, 64, torch.bfloat16, seed=6)

    def attend(q, k, v, bias):
        return ss.softmax_of_parts([ss.slot_softmax(q * 0.125, k, v, bias)])

    compiled = torch.compile(attend, fullgraph=True)
    with torch.no_grad():
        expected = attend(q, k, v, bias)
        compiled(q, k, v, bias)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = compiled(q, k, v, bias)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("lln::slot_softmax", 0) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "k": a["k"].half()}, "k and v are float32 or bfloat16"),
        (lambda a: {**a, "v": a["v"].double()}, "k and v are float32 or bfloat16"),
        (lambda a: {**a, "bias": a["bias"][:, :-1]}, "shapes do not match"),
        (lambda a: {**a, "q": a["q"].double()}, "q and bias are float32"),
        (lambda a: {**a, "q": a["q"][..., :40], "k": a["k"][..., :40]}, "multiples of 16"),
        (lambda a: {**a, "q": a["q"][0]}, r"q \[B, H, G, D\]"),
    ],
)
def test_kernel_rejects_bad_input(change, message):
    q, k, v, bias = random_case(1, 2, 2, 64, 10, 64, torch.bfloat16, seed=7)
    args = change({"q": q, "k": k, "v": v, "bias": bias})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lln.slot_softmax(args["q"], args["k"], args["v"], args["bias"])


def test_falls_back_to_pytorch_where_the_kernel_is_off(monkeypatch, caplog):
    """A failed build and the environment switch both leave the PyTorch path, which gives the
    kernel's result (to float32 rounding)."""
    q, k, v, bias = random_case(2, 3, 3, 64, 300, 64, torch.bfloat16, seed=8)
    expected = torch.ops.lln.slot_softmax(q, k, v, bias)

    def failed_build():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ss, "_build", failed_build)
    for env in ("1", "0"):
        monkeypatch.setenv("LLN_SERVE_SLOT_KERNEL", env)
        ss.available.cache_clear()
        with caplog.at_level(logging.WARNING):
            assert not ss.available() and not ss.kernel_fits(q, k, v)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = ss.slot_softmax(q, k, v, bias)
        assert "lln::slot_softmax" not in {e.key for e in prof.key_averages()}
        assert_parts_close(got, tuple(t.double() for t in expected), tol=2e-5)
    assert "no compiler" in caplog.text
    monkeypatch.undo()
    ss.available.cache_clear()
    assert ss.available()
