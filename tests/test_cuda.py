"""The same kernels, model and engine on a CUDA device, checked against float64 on the CPU
(the in-place decode runs on CUDA in tests/models/test_modeling.py).

Marked `gpu`: skipped (and reported as skipped) where no CUDA device is present, as in CI.
"""

import pytest
import torch

from lln_core.ops.ea.chunk import ea_attention
from lln_core.ops.ea.naive import naive_ea_attention
from lln_core.ops.lln import lln_attention, lln_step, naive_lln_attention
from lln_core.ops.lln_diag import empty_lln_diag_state, lln_diag_attention, naive_lln_diag_attention
from lln_core.ops.softmax import LocalSpec
from lln_core.state import LLNState
from tests.conftest import feature_maps, randn, rel_err
from tests.lln_core.test_lln_diag import mix_for, power_for, run_steps
from tests.models.conftest import tiny_model
from tests.server.test_engine import VOCAB, greedy, make_engine, prompts, run_all

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def qkv(gen, batch=2, heads=(6, 2), seq_len=300, dim=16):
    q = randn(gen, batch, heads[0], seq_len, dim)
    k = randn(gen, batch, heads[1], seq_len, dim)
    v = randn(gen, batch, heads[1], seq_len, dim)
    return q, k, v


def on_cuda(*tensors, dtype=torch.float32):
    return [t.to(CUDA, dtype) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lln_chunked_and_recurrent_on_cuda_match_cpu_float64(gen, dtype):
    q, k, v = qkv(gen)
    alpha = torch.tensor([1.3, 0.7], dtype=torch.float64)
    beta = torch.tensor([0.9, 1.6], dtype=torch.float64)
    y_ref, state_ref = naive_lln_attention(q, k, v, alpha, beta)
    y_chunk, state = lln_attention(*on_cuda(q, k, v, alpha, beta, dtype=dtype), chunk_size=64)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert y_chunk.device.type == CUDA
    assert rel_err(y_chunk.cpu(), y_ref) < tol
    step_state = LLNState.empty(2, 2, 16, 16, dtype=dtype, device=CUDA)
    qc, kc, vc, ac, bc = on_cuda(q, k, v, alpha, beta, dtype=dtype)
    outputs = []
    for t in range(40):
        y, step_state = lln_step(
            qc[:, :, t : t + 1], kc[:, :, t : t + 1], vc[:, :, t : t + 1], ac, bc, step_state
        )
        outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=2).cpu(), y_ref[:, :, :40]) < tol
    assert rel_err(state.S.cpu(), state_ref.S) < tol


@pytest.mark.parametrize("features", ["scale", "linear"])
@pytest.mark.parametrize("combine", ["joint", "average"])
def test_lln_diag_forms_on_cuda_match_cpu_float64(gen, combine, features):
    spec = LocalSpec("window", 64, num_sinks=4) if combine == "joint" else LocalSpec("block", 32)
    q, k, v = qkv(gen)
    alpha = torch.linspace(0.8, 1.5, 2, dtype=torch.float64)
    beta = torch.linspace(1.2, 0.6, 2, dtype=torch.float64)
    if features == "linear":
        alpha, beta = feature_maps(gen, 6, 2, head_dim=16)
    mix, power = mix_for(combine, 6), power_for(combine, 6)
    kwargs = dict(local=spec, combine=combine, count_power=power)
    y_ref = naive_lln_diag_attention(q, k, v, alpha, beta, mix, **kwargs)
    cuda_mix = mix.to(CUDA, torch.float32)
    cuda_power = power.to(CUDA, torch.float32) if torch.is_tensor(power) else power
    cuda_kwargs = dict(local=spec, combine=combine, count_power=cuda_power)
    qc, kc, vc, ac, bc = on_cuda(q, k, v, alpha, beta)
    y_chunk, _ = lln_diag_attention(qc, kc, vc, ac, bc, cuda_mix, chunk_size=64, **cuda_kwargs)
    assert rel_err(y_chunk.cpu(), y_ref) < 1e-4
    empty = empty_lln_diag_state(2, 2, 16, spec, dtype=torch.float32, device=CUDA)
    steps = [t[:, :, :90] for t in (qc, kc, vc)]
    y_rec, _ = run_steps(*steps, ac, bc, cuda_mix, spec, combine, empty, cuda_power)
    assert rel_err(y_rec.cpu(), y_ref[:, :, :90]) < 1e-4


def test_ea_on_cuda_matches_cpu_float64(gen):
    q, k, v = qkv(gen, heads=(4, 2), seq_len=200, dim=8)
    y_ref = naive_ea_attention(q, k, v)[0]
    y_cuda = ea_attention(*on_cuda(q, k, v), chunk_size=32)[0]
    assert rel_err(y_cuda.cpu(), y_ref) < 1e-4


@pytest.mark.parametrize("kernel", ["lln", "lln_diag", "ea", "softmax"])
def test_model_on_cuda_matches_cpu(kernel):
    model = tiny_model(kernel, dtype=torch.float64, local_size=6, num_sinks=2)
    ids = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model.forward_states(ids)
        got, states = model.to(CUDA).forward_states(ids.to(CUDA))
        step, _ = model.forward_states(ids[:, :1].to(CUDA), states)
    assert rel_err(got.cpu(), want) < 1e-6  # RoPE's frequencies are float32 on either device
    assert step.device.type == CUDA and torch.isfinite(step).all()


def test_engine_on_cuda_gives_the_cpu_tokens(char_tokenizer):
    cpu_model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4)
    cuda_model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4)
    cuda_model.to(CUDA)
    cases = prompts(5, seed=2)
    requests = {0: [(f"r{i}", p, greedy(6)) for i, p in enumerate(cases)]}
    want = run_all(make_engine(cpu_model, char_tokenizer), dict(requests))["tokens"]
    engine = make_engine(cuda_model, char_tokenizer, compile_decode=True)
    assert engine.runner.decoder.graphs  # decode replays CUDA graphs
    got = run_all(engine, dict(requests))["tokens"]
    assert got == want
    eager = make_engine(cuda_model, char_tokenizer, enforce_eager=True)
    assert not eager.runner.decoder.graphs
    assert run_all(eager, dict(requests))["tokens"] == want
    assert engine.pool.num_free == engine.pool.num_slots
