import subprocess
import sys


def test_serve_says_it_is_not_ready_and_fails():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "not built yet" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "fly"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
