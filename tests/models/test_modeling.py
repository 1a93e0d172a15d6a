"""The LLN decoder on tiny random configs: every kernel, every way of running it."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from models import LLNCache, LLNConfig, LLNForCausalLM
from tests.conftest import rel_err
from tests.models.conftest import KERNELS, tiny_model


def incremental_logits(model, ids, splits):
    """Prefill in pieces at `splits`, then one token at a time."""
    outputs, states = [], None
    bounds = (0, *splits)
    for start, end in zip(bounds, (*splits, None), strict=True):
        piece = ids[:, start:end] if end is not None else None
        if piece is None:
            break
        logits, states = model.forward_states(piece, states)
        outputs.append(logits)
    for t in range(splits[-1], ids.shape[1]):
        logits, states = model.forward_states(ids[:, t : t + 1], states)
        outputs.append(logits)
    return torch.cat(outputs, dim=1), states


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("splits", [(1,), (7, 19), (13, 14, 30)])
def test_full_equals_prefill_then_steps_float64(kernel, splits):
    model = tiny_model(kernel)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        stepped, _ = incremental_logits(model, ids, splits)
    assert (full - stepped).abs().max() < 1e-8


@pytest.mark.parametrize("kernel", KERNELS)
def test_full_equals_prefill_then_steps_float32(kernel):
    model = tiny_model(kernel, dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        stepped, _ = incremental_logits(model, ids, (21,))
    assert (full - stepped).abs().max() < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_different_lengths_equal_each_alone(kernel):
    """Right-padded rows at different positions (the server's batch) = each row alone."""
    assert_batched_equals_alone(tiny_model(kernel), tol=1e-8)


def assert_batched_equals_alone(model, tol: float) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=gen) for n in (9, 17, 4)]
    nexts = [torch.randint(0, 64, (n,), generator=gen) for n in (6, 1, 11)]
    with torch.no_grad():
        # batch: each row prefills its prompt (padded), then its next chunk (padded)
        states = None
        for pieces in (prompts, nexts):
            lengths = torch.tensor([len(p) for p in pieces])
            batch = torch.zeros(3, int(lengths.max()), dtype=torch.long)
            for row, piece in enumerate(pieces):
                batch[row, : len(piece)] = piece
            logits, states = model.forward_states(batch, states, lengths=lengths)
        for row in range(3):
            alone = torch.cat([prompts[row], nexts[row]])[None]
            expected = model(alone).logits[0, -len(nexts[row]) :]
            assert (logits[row, : len(nexts[row])] - expected).abs().max() < tol


@pytest.mark.parametrize("kernel", ["lln", "lln_diag", "ea"])
def test_cache_bytes_do_not_grow(kernel):
    model = tiny_model(kernel, dtype=torch.float32, chunk_size=256)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 10), generator=gen))
        small = out.past_key_values.nbytes
        out = model(torch.randint(0, 64, (1, 10_000), generator=gen))
    assert out.past_key_values.get_seq_length() == 10_000
    assert out.past_key_values.nbytes == small


def test_softmax_cache_grows():
    model = tiny_model("softmax", dtype=torch.float32)
    with torch.no_grad():
        small = model(torch.zeros(1, 10, dtype=torch.long)).past_key_values.nbytes
        large = model(torch.zeros(1, 100, dtype=torch.long)).past_key_values.nbytes
    assert large > 5 * small


@pytest.mark.parametrize("kernel", KERNELS)
def test_generate_greedy_matches_manual_loop(kernel):
    assert_generate_matches_manual_loop(tiny_model(kernel), new_tokens=8)


def assert_generate_matches_manual_loop(model, new_tokens: int) -> None:
    prompt = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_generate_sampling_is_seeded():
    model = tiny_model("lln_diag", dtype=torch.float32)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(6))
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5, pad_token_id=0)
    torch.manual_seed(0)
    first = model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    again = model.generate(prompt, **kwargs)
    assert torch.equal(first, again) and first.shape == (1, 15)


def test_cropping_is_refused_with_a_clear_error():
    cache = LLNCache(2)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)


def test_left_padding_is_refused():
    model = tiny_model("lln")
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask)


def test_save_and_load_with_auto_classes(tmp_path):
    model = tiny_model("lln_diag", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "lln_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, LLNForCausalLM)
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 1e-6


def test_checkpoint_without_count_power_loads_with_power_zero(tmp_path):
    """Checkpoints saved before count_power existed: it starts at 0 (no length term) and the
    saved alpha/beta/mix are kept, not reset by weight initialisation."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("lln_diag", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old = {name: w for name, w in weights.items() if not name.endswith("count_power")}
    assert len(old) < len(weights)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = LLNForCausalLM.from_pretrained(tmp_path)
    for layer, ours in zip(loaded.model.layers, model.model.layers, strict=True):
        assert torch.equal(layer.self_attn.count_power, torch.zeros(4))
        for name in ("alpha", "beta", "mix"):
            assert torch.equal(getattr(layer.self_attn, name), getattr(ours.self_attn, name))


@pytest.mark.parametrize("kernel", ["lln", "lln_diag"])
def test_linear_feature_maps_full_equals_prefill_then_steps(kernel):
    model = tiny_model(kernel, feature_map="linear")
    assert model.model.layers[0].self_attn.q_map.shape == (4, 8, 8)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        stepped, _ = incremental_logits(model, ids, (7, 19))
    assert (full - stepped).abs().max() < 1e-8


def test_switching_to_linear_feature_maps_keeps_the_model(tmp_path):
    """A checkpoint with scalar features loaded with feature_map="linear": the maps start at
    identity (same logits, alpha/beta kept); trained maps survive save and load."""
    model = tiny_model("lln_diag", dtype=torch.float32)
    model.save_pretrained(tmp_path / "scale")
    mapped = LLNForCausalLM.from_pretrained(tmp_path / "scale", feature_map="linear")
    attn, ours = mapped.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert torch.equal(attn.k_map, torch.eye(8).expand(2, 8, 8))
    assert torch.equal(attn.alpha, ours.alpha) and torch.equal(attn.mix, ours.mix)
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(mapped(ids).logits, model(ids).logits) < 1e-6
        attn.q_map.add_(0.5 * torch.randn_like(attn.q_map))
        changed = mapped(ids).logits
        assert rel_err(changed, model(ids).logits) > 1e-4
    mapped.save_pretrained(tmp_path / "linear")
    loaded = LLNForCausalLM.from_pretrained(tmp_path / "linear")
    assert loaded.config.feature_map == "linear"
    assert torch.equal(loaded.model.layers[1].self_attn.q_map, attn.q_map)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, changed) < 1e-6


def test_config_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="attention_kernel"):
        LLNConfig(attention_kernel="flash")
    with pytest.raises(ValueError, match="joint"):
        LLNConfig(attention_kernel="lln_diag", local_kind="block", combine="joint")
    with pytest.raises(ValueError, match="feature_map"):
        LLNConfig(attention_kernel="lln_diag", feature_map="mlp")


@pytest.mark.parametrize(
    ("kernel", "overrides"),
    [("lln", {}), ("lln_diag", {}), ("ea", {}), ("lln_diag", {"feature_map": "linear"})],
    ids=["lln", "lln_diag", "ea", "lln_diag-linear-features"],
)
def test_compiled_decode_equals_eager(kernel, overrides):
    """Compiled decode steps = eager ones, batch 1 then a batch of 3 at different positions
    (the second batch size recompiles with a dynamic batch dimension)."""
    eager = tiny_model(kernel, dtype=torch.float32, **overrides)
    compiled = tiny_model(kernel, dtype=torch.float32, **overrides)
    assert compiled.compile_decode()
    gen = torch.Generator().manual_seed(4)
    for batch, prompt_len in ((1, 9), (3, 12)):
        ids = torch.randint(0, 64, (batch, prompt_len + 8), generator=gen)
        lengths = torch.tensor([prompt_len - 3 * row for row in range(batch)])
        with torch.no_grad():
            _, states = eager.forward_states(ids[:, :prompt_len], lengths=lengths)
            expected_states, actual_states = states, states
            for t in range(prompt_len, prompt_len + 8):
                expected, expected_states = eager.forward_states(ids[:, t : t + 1], expected_states)
                actual, actual_states = compiled.forward_states(ids[:, t : t + 1], actual_states)
                assert (actual - expected).abs().max() < 1e-4
        for want, got in zip(expected_states, actual_states, strict=True):
            assert type(got) is type(want)
            for a, b in zip(want.flat(), got.flat(), strict=True):
                assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_in_place_decode_equals_copying_decode(compiled, device):
    """in_place=True (the slot pool's decode) gives the same logits and states as the default
    copy, rows at different positions (inside the sinks, in the ring, wrapped); the given
    windows are written, the copying step leaves its input alone."""
    model = tiny_model("lln_diag", dtype=torch.float32, local_size=4, num_sinks=2).to(device)
    if compiled:
        assert model.compile_decode()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (3, 20), generator=gen).to(device)
    with torch.no_grad():
        lengths = torch.tensor([1, 5, 9], device=device)
        _, states = model.forward_states(ids[:, :9], lengths=lengths)
        copying = states
        in_place = [s.clone() for s in states]
        for t in range(9, 17):
            inputs, before = copying, [s.clone() for s in copying]
            expected, copying = model.forward_states(ids[:, t : t + 1], inputs)
            for old, kept in zip(before, inputs, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(old.flat(), kept.flat(), strict=True))
            given = in_place
            actual, in_place = model.forward_states(ids[:, t : t + 1], in_place, in_place=True)
            assert (actual - expected).abs().max() < 1e-5
            assert in_place[0].local.k.data_ptr() == given[0].local.k.data_ptr()  # written
            for want, got in zip(copying, in_place, strict=True):
                for a, b in zip(want.flat(), got.flat(), strict=True):
                    assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5)


def test_softmax_decode_is_not_compiled():
    assert not tiny_model("softmax", dtype=torch.float32).compile_decode()


def test_compiled_decode_keeps_each_models_graphs_apart():
    """Two models whose layers differ only in a constant the graph bakes in (EA's eps; states
    and parameters alike in shape): each model's compiled steps follow its own eager steps,
    although the compiled step drops dynamo's guards on the layers' structure."""
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 64, (1, 14), generator=gen)
    for eps in (1e-6, 3.0):
        eager = tiny_model("ea", dtype=torch.float32, ea_eps=eps)
        compiled = tiny_model("ea", dtype=torch.float32, ea_eps=eps)
        assert compiled.compile_decode()
        with torch.no_grad():
            _, expected_states = eager.forward_states(ids[:, :8])
            actual_states = expected_states
            for t in range(8, 14):
                token = ids[:, t : t + 1]
                expected, expected_states = eager.forward_states(token, expected_states)
                actual, actual_states = compiled.forward_states(token, actual_states)
                assert (actual - expected).abs().max() < 1e-4
