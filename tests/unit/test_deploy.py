"""What users deploy with must parse and point at the command and topics the worker really has."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from detector.cli import _parser
from detector.settings import Settings
from detector.worker.config import KafkaSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DEFAULTS = KafkaSettings()
TOPICS = {
    "USAGE_TOPIC": DEFAULTS.usage_topic,
    "ALERTS_TOPIC": DEFAULTS.alerts_topic,
    "BREAKERS_TOPIC": DEFAULTS.breakers_topic,
    "DLQ_TOPIC": DEFAULTS.dlq_topic,
}


def _worker_args(args: list[str]) -> Any:
    return _parser().parse_args(args)


def test_dockerfile_runs_the_worker_command() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["detector"\]$', text, re.M)
    assert re.search(r'^CMD \["worker"\]$', text, re.M)
    assert _worker_args(["worker"]).run.__name__ == "_worker"


def test_compose_has_kafka_and_two_workers_on_the_default_topics() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert "kafka" in services and len(workers) == 2
    for worker in workers:
        assert worker["command"] == ["worker"]
        env = worker["environment"]
        assert {k: env[f"STORMWATCH_KAFKA__{k}"] for k in TOPICS} == TOPICS
        assert env["STORMWATCH_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    alerter = services["alerter"]
    assert _worker_args(alerter["command"]).run.__name__ == "_alerter"
    assert alerter["environment"]["STORMWATCH_KAFKA__ALERTS_TOPIC"] == DEFAULTS.alerts_topic
    outbox = alerter["environment"]["STORMWATCH_ALERTING__OUTBOX_PATH"]
    assert any(outbox.startswith(v.split(":", 1)[1]) for v in alerter["volumes"]), "the outbox is on a volume"


def test_kubernetes_config_is_a_valid_stormwatch_config_and_the_deployment_uses_it() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "stormwatch.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    settings = Settings.model_validate(tomllib.loads(config_map["data"]["stormwatch.toml"]))
    assert settings.kafka.usage_topic == DEFAULTS.usage_topic and settings.kafka.alerts_topic == DEFAULTS.alerts_topic
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = _worker_args(container["args"])
    assert args.run.__name__ == "_worker" and str(args.config) == "/etc/stormwatch/stormwatch.toml"
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/stormwatch" and deployment["spec"]["replicas"] == 2
    # The probes and the scrape hit the worker's web server, on the port the config gives it.
    port = container["ports"][0]["containerPort"]
    assert settings.kafka.web_port == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    alerter = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "stormwatch-alerter")
    spec = alerter["spec"]["template"]["spec"]
    assert _worker_args(spec["containers"][0]["args"]).run.__name__ == "_alerter"
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert any(settings.alerting.outbox_path.startswith(m) for m in mounts - {"/etc/stormwatch"})
    assert alerter["spec"]["replicas"] == 1 and alerter["spec"]["strategy"]["type"] == "Recreate"
