"""The AsyncAPI 3.0 document (gateway/asyncapi.py) covers every topic, payload and route,
is checked in as docs/asyncapi.yaml, and is accepted by the reference parser."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from gateway_codecs import api, device, registry, settings

from gateway import asyncapi
from gateway.routes import ROUTER, ROUTES

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "docs" / "asyncapi.yaml"
REGENERATE = ".venv/bin/python -m gateway.asyncapi -o docs/asyncapi.yaml"
PARSER = "@asyncapi/parser@3.6.6"  # pinned: a newer parser may add warnings of its own
NPM_CACHE = Path(os.environ.get(
    "GATEWAY_TEST_NPM_CACHE", Path(tempfile.gettempdir()) / "gateway-test-asyncapi-parser"))


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi.document()


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_checked_in_document_is_current() -> None:
    """docs/asyncapi.yaml is what the code generates now."""
    assert CHECKED_IN.read_text() == asyncapi.render(), (
        f"docs/asyncapi.yaml is out of date with the codecs or routes; regenerate it: "
        f"{REGENERATE}")


def test_yaml_reads_back_as_the_document(doc: dict[str, Any]) -> None:
    """No value changes type on its way through YAML (times such as 00:00 stay strings)."""
    assert yaml.safe_load(asyncapi.render()) == json.loads(json.dumps(doc))


def test_every_topic_has_its_channel_and_operation(doc: dict[str, Any]) -> None:
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == {
        "devices/{serial}/heartbeat", "devices/{serial}/commands", "devices/{serial}/settings",
        "api/v1/requests", "api/v1/replies/{client}", "events/v1/{type}",
    }
    used = {op["channel"]["$ref"].rsplit("/", 1)[1] for op in doc["operations"].values()}
    assert used == set(doc["channels"])
    actions = {name: op["action"] for name, op in doc["operations"].items()}
    assert actions["receiveHeartbeat"] == actions["handleRequest"] == "receive"
    assert {actions["sendCommands"], actions["sendSettings"], actions["sendEvent"]} == {"send"}


def test_each_payload_is_the_codecs_struct(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    payloads = {name: m["payload"]["$ref"].rsplit("/", 1)[1] for name, m in messages.items()}
    assert payloads == {
        "heartbeatJson": "Heartbeat", "heartbeatMsgpack": "Heartbeat",
        "commandBatch": "CommandBatch", "settingsPatch": "SettingsPatch",
        "settingsFull": "SettingsFull", "request": "Request", "response": "Response",
        "event": "Event",
    }
    assert messages["heartbeatMsgpack"]["contentType"] == "application/msgpack"
    schemas = doc["components"]["schemas"]
    heartbeat_fields = set(schemas["Heartbeat"]["properties"])
    assert heartbeat_fields == {f.name for f in msgspec.structs.fields(device.Heartbeat)}
    assert schemas["Heartbeat"]["properties"]["battery_percent"]["anyOf"][0] == {
        "type": "integer", "minimum": 0, "maximum": 100}
    # Two Structs named Command, one per module, each under a name of its own.
    assert {"DeviceCommand", "RegistryCommand"} <= set(schemas)
    assert not any("." in name for name in schemas)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    for ref in set(refs(doc)):
        assert resolve(doc, ref) is not None, ref


def test_every_route_is_described_with_its_body_and_answer(doc: dict[str, Any]) -> None:
    """A route added to gateway/routes.py must get its answer in asyncapi.RESPONSES."""
    missing = [(r.method, r.template) for r in ROUTES
               if (r.method, r.template) not in asyncapi.RESPONSES]
    assert not missing, f"add the answers of these routes to gateway/asyncapi.py: {missing}"
    table = doc["components"]["messages"]["request"]["description"]
    for route in ROUTES:
        assert f"| {route.method} | `{route.template}` | `{route.scope}` |" in table
    answers = doc["components"]["schemas"]["Response"]["properties"]["body"]["anyOf"]
    named = {ref["$ref"].rsplit("/", 1)[1] for ref in answers}
    assert {"Device", "DeviceList", "DeviceSettings", "RegistryCommand", "CommandList",
            "DeviceCredentials", "DeletedDevice", "TelemetronResult", "ErrorBody"} <= named


def test_examples_decode_with_the_codecs(doc: dict[str, Any]) -> None:
    """Every message example is a valid message, as the gateway or a device decodes it."""
    messages = doc["components"]["messages"]
    for example in messages["heartbeatJson"]["examples"]:
        device.decode_heartbeat(msgspec.json.encode(example["payload"]))
    for example in messages["commandBatch"]["examples"]:
        msgspec.convert(example["payload"], device.CommandBatch)
    for example in messages["settingsPatch"]["examples"]:
        patch = msgspec.convert(example["payload"], device.SettingsPatch)
        settings.patch(settings.DEFAULTS, patch.patch)
    for example in messages["settingsFull"]["examples"]:
        full = msgspec.convert(example["payload"], device.SettingsFull)
        assert settings.replace(full.settings) == full.settings
    for example in messages["request"]["examples"]:
        request = api.parse_request(example["payload"])
        route, _ = ROUTER.match(request.method, request.path)
        if route.template.endswith("/settings"):
            settings.patch(settings.DEFAULTS, request.body)
        elif route.takes is not None and route.source == "body":
            msgspec.convert(request.body or {}, route.takes)
    for example in messages["response"]["examples"]:
        response = msgspec.convert(example["payload"], api.Response)
        answer = registry.ErrorBody if response.status >= 400 else registry.DeletedDevice
        msgspec.convert(response.body, answer)


def test_gateway_asyncapi_prints_the_document(tmp_path: Path) -> None:
    printed = subprocess.run([sys.executable, "-m", "gateway.asyncapi"], capture_output=True,
                             text=True, timeout=60, check=True)
    assert printed.stdout == asyncapi.render()
    assert asyncapi.main(["--output", str(tmp_path / "out.yaml")]) == 0
    assert (tmp_path / "out.yaml").read_text() == printed.stdout


# ---- the reference parser ---------------------------------------------------------------------

VALIDATE = """\
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";
const { document, diagnostics } = await new Parser().parse(readFileSync(process.argv[2], "utf8"));
for (const d of diagnostics) {
  console.log(JSON.stringify({severity: d.severity, code: d.code, message: d.message,
                              path: d.path.join(".")}));
}
process.exit(document ? 0 : 1);
"""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One installer at a time (test runs in parallel share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def parser_dir() -> Path:
    """The parser installed from the npm registry into the cache (once), or a skip."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot run the AsyncAPI parser")
    target = NPM_CACHE / PARSER.replace("/", "+")
    marker = target / "node_modules" / "@asyncapi" / "parser" / "package.json"
    with locked(NPM_CACHE / ".lock"):
        if not marker.exists():
            try:
                installed = subprocess.run(
                    ["npm", "install", "--prefix", str(target), "--no-audit", "--no-fund",
                     "--ignore-scripts", "--loglevel", "error", PARSER],
                    capture_output=True, text=True, timeout=100)
            except subprocess.TimeoutExpired:
                pytest.skip(f"npm install {PARSER} took over 100 s (no registry access?)")
            if installed.returncode != 0 or not marker.exists():
                pytest.skip(f"npm install {PARSER} failed (no registry access?): "
                            f"{installed.stderr.strip()[-300:]}")
    (target / "validate.mjs").write_text(VALIDATE)
    return target


def test_the_asyncapi_parser_accepts_the_document() -> None:
    """@asyncapi/parser, the reference implementation, finds no error and no warning."""
    target = parser_dir()
    checked = subprocess.run(["node", str(target / "validate.mjs"), str(CHECKED_IN)],
                             capture_output=True, text=True, timeout=60, cwd=target)
    diagnostics = [json.loads(line) for line in checked.stdout.splitlines() if line]
    problems = [d for d in diagnostics if d["severity"] <= 1]  # 0 error, 1 warning
    assert checked.returncode == 0 and not problems, (
        json.dumps(problems, indent=1) or checked.stderr)
