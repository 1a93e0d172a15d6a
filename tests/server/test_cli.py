import subprocess
import sys

import pytest


def test_serve_rejects_bad_settings_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--max-num-seqs", "0"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "max_num_seqs must be an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_exits_with_the_reason_when_the_model_cannot_be_loaded(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(missing), "--port", "0"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "lln-serve serve: error:" in result.stderr and "cannot load" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_flags_read_environment_variables():
    import os

    from server.cli import build_parser

    os.environ["LLN_SERVE_MAX_NUM_SEQS"] = "5"
    try:
        args = build_parser().parse_args(["serve"])
    finally:
        del os.environ["LLN_SERVE_MAX_NUM_SEQS"]
    assert args.max_num_seqs == 5 and args.port == 8000
    assert build_parser().parse_args(["serve", "--max-num-seqs", "7"]).max_num_seqs == 7


def test_unknown_command_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "fly"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_serve_rejects_a_bad_state_store_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--state-store", "mysql://x"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "state_store must be 'memory' or a Redis URL" in result.stderr
    assert "Traceback" not in result.stderr
    from server.config import EngineConfig

    with pytest.raises(ValueError, match="share_prefix_states needs a Redis state_store"):
        EngineConfig(share_prefix_states=True)
    with pytest.raises(ValueError, match="session_lock_ttl_s"):
        EngineConfig(state_store="redis://h:1/0", session_lock_ttl_s=0)


def test_state_store_flags_and_their_environment_variables():
    import os

    from server.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.state_store == "memory" and args.share_prefix_states is False
    os.environ["LLN_SERVE_SHARE_PREFIX_STATES"] = "1"
    os.environ["LLN_SERVE_STATE_STORE"] = "redis://r:6379/0"
    try:
        args = build_parser().parse_args(["serve"])
        assert args.share_prefix_states is True and args.state_store == "redis://r:6379/0"
        assert (
            build_parser().parse_args(["serve", "--no-share-prefix-states"]).share_prefix_states
            is False
        )
    finally:
        del os.environ["LLN_SERVE_SHARE_PREFIX_STATES"], os.environ["LLN_SERVE_STATE_STORE"]


def test_dtype_auto_is_bfloat16_on_cuda_and_int8_on_a_cpu_with_the_int8_kernel(monkeypatch):
    from models import int8_kernel
    from server.config import EngineConfig

    assert EngineConfig().dtype == "auto"
    cpu = "int8" if int8_kernel.available() else "float32"
    assert EngineConfig(device="cpu").weight_dtype == cpu
    monkeypatch.setattr(int8_kernel, "available", lambda: False)  # no VNNI, or no compiler
    assert EngineConfig(device="cpu").weight_dtype == "float32"
    assert EngineConfig(device="cuda:0").weight_dtype == "bfloat16"
    assert EngineConfig(device="cuda", dtype="float32").weight_dtype == "float32"
    assert EngineConfig(device="cuda", dtype="int8").weight_dtype == "int8"


def test_dtype_int4_is_accepted_on_a_cpu_and_refused_elsewhere():
    from server.cli import build_parser
    from server.config import EngineConfig
    from server.engine import gemm_dtype

    args = build_parser().parse_args(["serve", "--dtype", "int4"])
    assert args.dtype == "int4" and EngineConfig(dtype=args.dtype).weight_dtype == "int4"
    assert gemm_dtype(EngineConfig(dtype="int4")) is None  # int4 picks its own kernels
    generate = build_parser().parse_args(["generate", "--prompt", "hi", "--dtype", "int4"])
    assert generate.dtype == "int4"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--dtype", "int4", "--device", "cuda"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "dtype int4 runs on a CPU only" in result.stderr and "Traceback" not in result.stderr


def test_gemm_dtype_auto_is_bfloat16_for_float32_weights_on_a_bf16_cpu():
    import torch

    from models.quantize import bf16_gemm_is_fast
    from server.cli import build_parser
    from server.config import EngineConfig
    from server.engine import gemm_dtype

    fast = torch.bfloat16 if bf16_gemm_is_fast() else None
    assert build_parser().parse_args(["serve"]).gemm_dtype == "auto"
    assert gemm_dtype(EngineConfig(dtype="float32")) == fast
    assert gemm_dtype(EngineConfig(gemm_dtype="float32")) is None
    assert gemm_dtype(EngineConfig(gemm_dtype="bfloat16")) == torch.bfloat16
    assert gemm_dtype(EngineConfig(dtype="int8")) is None  # int8 picks its own kernels
    assert gemm_dtype(EngineConfig(device="cuda")) is None  # bfloat16 weights there
    with pytest.raises(ValueError, match="gemm_dtype must be one of"):
        EngineConfig(gemm_dtype="int4")


def test_enforce_eager_flag_and_environment_variable():
    import os

    from server.cli import build_parser
    from server.config import EngineConfig

    args = build_parser().parse_args(["serve"])
    assert args.enforce_eager is False and args.dtype == "auto"
    assert build_parser().parse_args(["serve", "--enforce-eager"]).enforce_eager is True
    os.environ["LLN_SERVE_ENFORCE_EAGER"] = "1"
    try:
        assert build_parser().parse_args(["serve"]).enforce_eager is True
    finally:
        del os.environ["LLN_SERVE_ENFORCE_EAGER"]
    assert EngineConfig(device="cuda", enforce_eager=True).enforce_eager


def test_deterministic_is_unset_by_default_and_set_by_flag_or_environment(monkeypatch):
    from server.cli import build_parser

    assert build_parser().parse_args(["serve"]).deterministic is None  # the engine decides
    assert build_parser().parse_args(["serve", "--deterministic"]).deterministic is True
    assert build_parser().parse_args(["serve", "--no-deterministic"]).deterministic is False
    monkeypatch.setenv("LLN_SERVE_DETERMINISTIC", "0")
    assert build_parser().parse_args(["serve"]).deterministic is False


def test_shutdown_timeout_flag_environment_and_check(monkeypatch):
    from server.cli import build_parser
    from server.config import ServerConfig

    assert build_parser().parse_args(["serve"]).shutdown_timeout == 30.0
    assert build_parser().parse_args(["serve", "--shutdown-timeout", "2.5"]).shutdown_timeout == 2.5
    monkeypatch.setenv("LLN_SERVE_SHUTDOWN_TIMEOUT", "4")
    assert build_parser().parse_args(["serve"]).shutdown_timeout == 4.0
    assert ServerConfig(shutdown_timeout_s=0).shutdown_timeout_s == 0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="shutdown_timeout must be >= 0"):
            ServerConfig(shutdown_timeout_s=bad)


def test_serve_rejects_a_thread_count_below_one():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--threads", "0"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "threads must be an integer >= 1" in result.stderr and "Traceback" not in result.stderr


def test_default_threads_follow_omp_num_threads_else_the_affinity(monkeypatch):
    import os

    from server.cli import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored
    assert default_threads() == len(os.sched_getaffinity(0))
