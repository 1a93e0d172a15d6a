"""Conversion of softmax checkpoints: weight mapping, calibration, errors, CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models import LLNForCausalLM
from models.convert import convert
from models.errors import ConversionError

TEXT = "the quick brown fox jumps over the lazy dog and keeps running far away " * 40
SHAPE = dict(
    vocab_size=29,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def save_source(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path, char_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)).eval()
    return save_source(tmp_path / "llama", model, char_tokenizer), model


@pytest.fixture
def qwen2_dir(tmp_path, char_tokenizer):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()
    with torch.no_grad():  # random q/k/v biases, so that a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return save_source(tmp_path / "qwen2", model, char_tokenizer), model


@pytest.mark.parametrize("source", ["llama_dir", "qwen2_dir"])
def test_softmax_kernel_reproduces_the_source_logits(source, request, tmp_path):
    path, original = request.getfixturevalue(source)
    out = convert(str(path), tmp_path / "out", kernel="softmax", progress=False)
    converted = LLNForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 29, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (converted(ids).logits - original(ids).logits).abs().max()
    assert diff < 1e-4


def test_calibrated_alpha_beta_follow_the_measured_sigmas(llama_dir, tmp_path):
    path, _ = llama_dir
    out = convert(str(path), tmp_path / "out", kernel="lln", calib_text=TEXT, progress=False)
    info = json.loads((out / "lln_conversion.json").read_text())["calibration"]
    sigma_q, sigma_k = torch.tensor(info["sigma_q"]), torch.tensor(info["sigma_k"])
    model = LLNForCausalLM.from_pretrained(out)
    alpha = torch.stack([layer.self_attn.alpha.detach() for layer in model.model.layers])
    beta = torch.stack([layer.self_attn.beta.detach() for layer in model.model.layers])
    assert alpha.shape == (2, 2) and torch.isfinite(alpha).all() and (alpha > 0).all()
    assert torch.isfinite(beta).all() and (beta > 0).all()
    # moment matching: alpha sigma_q = beta sigma_k (both equal sigma~), per layer and KV head
    assert torch.allclose(alpha * sigma_q, beta * sigma_k, rtol=1e-5)
    assert torch.allclose(alpha, torch.tensor(info["alpha"]))
    assert info["num_tokens"] > 100


def test_conversion_with_linear_feature_maps_starts_them_at_identity(llama_dir, tmp_path):
    """feature_map="linear": the same calibrated model (equal logits), maps at identity."""
    path, _ = llama_dir
    scale = convert(str(path), tmp_path / "scale", calib_text=TEXT, progress=False)
    linear = convert(
        str(path), tmp_path / "linear", calib_text=TEXT, progress=False, feature_map="linear"
    )
    model_scale = LLNForCausalLM.from_pretrained(scale).eval()
    model_linear = LLNForCausalLM.from_pretrained(linear).eval()
    assert model_linear.config.feature_map == "linear"
    assert torch.equal(model_linear.model.layers[0].self_attn.q_map, torch.eye(8).expand(4, 8, 8))
    ids = torch.randint(0, 29, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model_linear(ids).logits - model_scale(ids).logits).abs().max()
    assert diff < 1e-4


def test_unsupported_architecture_names_what_is_supported(tmp_path, char_tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=29))
    path = save_source(tmp_path / "gpt2", gpt2, char_tokenizer)
    with pytest.raises(ConversionError, match=r"unsupported architecture 'gpt2'.*llama"):
        convert(str(path), tmp_path / "out", progress=False)


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="hub"):
        convert("someone/not-a-local-model", tmp_path / "out", progress=False)


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="GGUF file not found"):
        convert(str(tmp_path / "model.gguf"), tmp_path / "out", progress=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)


def test_cli_convert(llama_dir, tmp_path):
    path, _ = llama_dir
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    result = run_cli(
        "convert", str(path), str(out), "--kernel", "lln_diag", "--calib-text", str(text)
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["attention_kernel"] == "lln_diag" and config["num_sinks"] == 4
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_cli_convert_with_a_sparse_cache(llama_dir, tmp_path):
    path, _ = llama_dir
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    result = run_cli(
        "convert", str(path), str(out), "--local-size", "16", "--sparse-cache", "24",
        "--sparse-span", "2", "--kv-cache-dtype", "bfloat16", "--calib-text", str(text),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = LLNForCausalLM.from_pretrained(out).eval()
    assert model.config.sparse_cache_size == 24 and model.config.sparse_span == 2
    assert model.empty_states(1)[0].sparse.size == 24
    assert model.empty_states(1)[0].local.k.dtype == torch.bfloat16
    # usable past the trained length at once: far keys at one rotary distance by default
    assert model.config.far_positions == "fixed" and model.config.far_distance == 1024
    assert model.config.uses_far_positions
    # the LLN part starts off (it swamps the window until distilled); outputs stay finite
    assert all(bool(torch.isneginf(layer.self_attn.mix).all()) for layer in model.model.layers)
    with torch.no_grad():
        logits = model(torch.randint(0, 29, (1, 60), generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(logits.logits).all()
    bad = run_cli("convert", str(path), str(tmp_path / "o"), "--sparse-cache", "8",
                  "--local-size", "4", "--sparse-span", "8")  # fmt: skip
    assert bad.returncode == 2 and "--sparse-span" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_errors_are_messages_not_tracebacks(llama_dir, tmp_path):
    path, _ = llama_dir
    cases = [
        ("convert", str(path), str(tmp_path / "o"), "--calib-text", str(tmp_path / "missing.txt")),
        ("convert", str(tmp_path / "nowhere"), str(tmp_path / "o")),
        ("convert", str(path), str(tmp_path / "o"), "--kernel", "flash"),
        ("convert", str(path), str(tmp_path / "o"), "--far-positions", "near"),
        ("convert", str(path), str(tmp_path / "o"), "--far-distance", "-1"),
        (
            "convert",
            str(path),
            str(tmp_path / "o"),
            "--far-positions",
            "grouped",
            "--far-max-distance",
            "8",
        ),  # below the window
        ("generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "0"),
    ]
    for args in cases:
        result = run_cli(*args)
        assert result.returncode in (1, 2), args
        assert "Traceback" not in result.stderr and "error" in result.stderr, result.stderr


def test_cli_generate_streams_text(llama_dir, tmp_path):
    path, _ = llama_dir
    out = tmp_path / "out"
    assert run_cli("convert", str(path), str(out), "--kernel", "lln").returncode == 0
    greedy = run_cli("generate", "--model", str(out), "--prompt", "the fox", "--max-tokens", "5")
    assert greedy.returncode == 0, greedy.stderr
    assert len(greedy.stdout.strip()) > 0
    again = run_cli("generate", "--model", str(out), "--prompt", "the fox", "--max-tokens", "5")
    assert again.stdout == greedy.stdout  # greedy is deterministic
    sampled = run_cli(
        "generate", "--model", str(out), "--prompt", "the fox", "--temperature", "1.0",
        "--seed", "3", "--kernel", "softmax",
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    int8 = run_cli("generate", "--model", str(out), "--prompt", "the fox", "--max-tokens", "5",
                   "--dtype", "int8")  # fmt: skip
    assert int8.returncode == 0 and len(int8.stdout.strip()) > 0, int8.stderr
    int4 = run_cli("generate", "--model", str(out), "--prompt", "the fox", "--max-tokens", "5",
                   "--dtype", "int4")  # fmt: skip
    assert int4.returncode == 0 and len(int4.stdout.strip()) > 0, int4.stderr
    bad = run_cli("generate", "--model", str(out), "--prompt", "x", "--dtype", "int3")
    assert bad.returncode != 0 and "int3" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_distill(llama_dir, tmp_path):
    path, _ = llama_dir
    converted, distilled = tmp_path / "lln", tmp_path / "distilled"
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    assert run_cli("convert", str(path), str(converted), "--calib-text", str(text)).returncode == 0
    result = run_cli(
        "distill", "--model", str(converted), "--out", str(distilled), "--text", str(text),
        "--seq-len", "64", "--steps-per-layer", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "layer  1: loss" in result.stdout
    assert (distilled / "model.safetensors").is_file()
    assert (distilled / "checkpoint" / "report.json").is_file()
    mapped = tmp_path / "mapped"
    result = run_cli(
        "distill", "--model", str(converted), "--out", str(mapped), "--text", str(text),
        "--seq-len", "64", "--steps-per-layer", "3", "--feature-map", "linear",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((mapped / "config.json").read_text())["feature_map"] == "linear"
    shipped = load_file(mapped / "lln_params.safetensors")
    assert shipped["model.layers.0.self_attn.q_map"].shape == (4, 8, 8)
    selected = tmp_path / "selected"
    result = run_cli(
        "distill", "--stage", "select", "--model", str(distilled), "--out", str(selected),
        "--text", str(text), "--seq-len", "96",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "LLN part switched off in layers" in result.stdout
    assert (selected / "lln_params.safetensors").is_file()
    assert (selected / "checkpoint" / "select.json").is_file()
    stage2 = tmp_path / "stage2"
    result = run_cli(
        "distill", "--stage", "2", "--model", str(distilled), "--out", str(stage2),
        "--text", str(text), "--seq-len", "96", "--steps", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "KL to the teacher:" in result.stdout
    assert (stage2 / "checkpoint" / "stage2.json").is_file()
    too_short = run_cli(
        "distill", "--stage", "2", "--model", str(distilled), "--out", str(tmp_path / "x"),
        "--text", str(text), "--seq-len", "4", "--steps", "1",
    )  # fmt: skip
    assert too_short.returncode != 0 and "past the local window" in too_short.stderr
    assert "Traceback" not in too_short.stderr
    bad_budget = run_cli(
        "distill", "--stage", "2", "--model", str(distilled), "--out", str(tmp_path / "y"),
        "--max-minutes", "0",
    )  # fmt: skip
    assert bad_budget.returncode == 2 and "--max-minutes must be positive" in bad_budget.stderr
    for device in ("foo", "cuda:x", "mps"):
        bad_device = run_cli(
            "distill", "--model", str(distilled), "--out", str(tmp_path / "w"), "--device", device
        )
        assert bad_device.returncode == 2 and "--device" in bad_device.stderr, device
        assert "Traceback" not in bad_device.stderr
    if not torch.cuda.is_available():
        no_gpu = run_cli(
            "distill", "--model", str(distilled), "--out", str(tmp_path / "z"), "--device", "cuda"
        )
        assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr


@pytest.fixture
def no_tokenizer_dir(tmp_path):
    path = tmp_path / "weights-only"
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path)
    return path


@pytest.fixture
def gpt2_dir(tmp_path, char_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=29, n_embd=16, n_layer=1, n_head=2))
    return save_source(tmp_path / "gpt2", model, char_tokenizer)


def test_every_verb_answers_bad_input_with_one_line(llama_dir, no_tokenizer_dir, gpt2_dir,
                                                    tmp_path, capsys):  # fmt: skip
    """In process (fast): exit 1 (bad input found while working) or 2 (bad flags), one line
    on stderr that names the problem, never a traceback."""
    from server.cli import main

    path, missing, out = str(llama_dir[0]), str(tmp_path / "missing"), str(tmp_path / "o")
    cases = [
        (["convert", str(no_tokenizer_dir), out], "no tokenizer"),
        (["convert", str(gpt2_dir), out], "gpt2"),
        (["convert", missing, out], "cannot load"),
        (["convert", path, out, "--local-size", "0"], "must be >= 1"),
        (["generate", "--model", missing, "--prompt", "hi"], "cannot load"),
        (["generate", "--model", path, "--prompt", "hi", "--top-p", "2"], "top-p"),
        (["distill", "--model", missing, "--out", out], "cannot load"),
        (["distill", "--model", path, "--out", out, "--text", missing], "not found"),
        (["distill", "--model", path, "--out", out, "--steps-per-layer", "0"], "must be >= 1"),
        (["analyze", "--model", missing, "--out", out], "cannot load"),
        (["analyze", "--model", path, "--out", out, "--text", missing], "not found"),
        (["serve", "--port", "70000"], "port"),
        (["serve", "--max-model-len", "100", "--default-max-tokens", "500"], "max_model_len"),
        (["serve", "--dtype", "float8"], "dtype"),
    ]
    for args, expected in cases:
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code in (1, 2), (args, code, err)
        last = err.strip().splitlines()[-1]  # after argparse's usage, if any
        assert "Traceback" not in err and expected.lower() in last.lower(), (args, err)
        assert last.startswith("lln-serve") and "error" in last, (args, err)
