"""The dashboard and the alert rules against a running gateway (`gateway run --workers 2`,
as each compose replica runs) under a little load: every metric they use is exported,
and the real Prometheus server (Debian's package) scraping it answers every dashboard
query with data and evaluates every rule without an error."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MQTT_URL
from processes import GatewayProcess, free_port, scrape
from test_deploy import (
    RULES,
    dashboard_expressions,
    exercise,
    exported_names,
    metric_names,
    rule_metric_names,
    tool,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@pytest.fixture
async def loaded_gateway(database_url: str, topic_prefix: str) -> AsyncIterator[GatewayProcess]:
    gateway = GatewayProcess(
        mqtt_url=MQTT_URL, database_url=database_url, topic_prefix=topic_prefix,
        client_id=f"deploy-{uuid.uuid4().hex[:6]}",
        env={"GATEWAY_WORKERS": "2", "GATEWAY_SHARE_GROUP": "gateway"})
    try:
        gateway.start()
        await gateway.wait_healthy(within=30)
        await exercise(database_url, topic_prefix, gateway.metrics_port)
        yield gateway
    finally:
        gateway.close()


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    loaded_gateway: GatewayProcess,
) -> None:
    """A metric renamed in the gateway, or misspelt in deploy/, fails here. The fleet's
    gauge appears once a process has read the first presence sweep's counts (every
    5 s), so the scrape is repeated for a while."""
    used = rule_metric_names().union(*map(metric_names, dashboard_expressions()))
    deadline = time.monotonic() + 15
    while True:
        exported = exported_names(await scrape(loaded_gateway.metrics_port))
        missing = sorted(used - exported)
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert not missing, f"used by deploy/ but not in the gateway's /metrics: {missing}"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def test_prometheus_answers_every_dashboard_query_and_evaluates_every_rule(
    loaded_gateway: GatewayProcess,
) -> None:
    prometheus = tool("prometheus")
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="gw-test-prometheus-"))
    # JSON is YAML: the compose stack's job and rules, scraping this gateway every second.
    (directory / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [
            {"targets": [f"127.0.0.1:{loaded_gateway.metrics_port}"]}]}],
    }))
    log = (directory / "prometheus.log").open("wb")
    server = await asyncio.create_subprocess_exec(
        prometheus, f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        # Grafana's $__rate_interval: four scrape intervals at least.
        queries = [e.replace("$__rate_interval", "10s") for e in dashboard_expressions()]
        deadline = time.monotonic() + 20
        while True:
            assert server.returncode is None, (directory / "prometheus.log").read_text()[-2000:]
            empty, rules = await asyncio.to_thread(_check, api, queries)
            assert not [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
            if not empty and all(r["health"] != "unknown" for r in rules):
                break
            assert time.monotonic() < deadline, (
                f"no data after 20 s for: {empty}; rules not evaluated: "
                f"{[r['name'] for r in rules if r['health'] == 'unknown']}")
            await asyncio.sleep(0.5)
        failing = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not failing
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def _check(api: str, queries: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(the queries with no data, every rule's state); everything empty until the server
    answers."""
    try:
        _get(f"{api}/status/buildinfo")
    except OSError:
        return queries, [{"name": "(not started)", "health": "unknown"}]
    empty = []
    for query in queries:
        answer = _get(f"{api}/query?query={urllib.parse.quote(query)}")
        assert answer["status"] == "success", (query, answer)  # it parsed
        if not answer["data"]["result"]:
            empty.append(query)
    groups = _get(f"{api}/rules")["data"]["groups"]
    return empty, [rule for group in groups for rule in group["rules"]]
