"""Fixtures: a real PostgreSQL database and a real Mosquitto topic space per test.

Each test gets its own database (cloned from a migrated template) and its own topic
prefix, so tests run in any order against the shared local broker. Set
``GATEWAY_TEST_PG`` / ``GATEWAY_TEST_MQTT`` to point them elsewhere.

Markers (the default run runs every test, marked or not):

- ``fault``: the test starts a broker, database or gateway process of its own, or breaks
  one (stops, kills, hangs or drops it);
- ``slow``: the test takes more than about 5 s.

For a quick local run, leave them out: ``pytest -m "not fault and not slow"``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import aiomqtt
import asyncpg
import msgspec
import pytest

from gateway import auth, logs
from gateway.app import Gateway
from gateway.client import GatewayClient
from gateway.config import Config
from gateway.storage import Storage, migrate

PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
MQTT_URL = os.environ.get("GATEWAY_TEST_MQTT", "mqtt://127.0.0.1:1883")
MQTT_HOST = MQTT_URL.removeprefix("mqtt://").split(":")[0]
MQTT_PORT = int(MQTT_URL.rsplit(":", 1)[1])
TEMPLATE = f"gw_test_template_{os.getpid()}"
# Without TCP_NODELAY, Nagle holds a request behind the previous PUBACK (~40 ms each).
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

logs.configure("console", "warning")


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background (`./dev test &` in a script) inherits SIGINT
    # ignored, and so would every process the tests start: the tests that press Ctrl-C on
    # the CLI, the demo or the simulator need it delivered. A handler here (rather than
    # SIG_IGN) gives those processes the default disposition again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "fault: starts a broker, database or gateway process of its own, or breaks "
        "one (stop, kill, hang, drop); leave out with -m 'not fault'")
    config.addinivalue_line(
        "markers", "slow: takes more than about 5 s; leave out with -m 'not slow'")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(f"{PG_ADMIN}/postgres")


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    async def create() -> None:
        conn = await _admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        finally:
            await conn.close()
        await migrate(f"{PG_ADMIN}/{TEMPLATE}")

    async def drop() -> None:
        conn = await _admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        finally:
            await conn.close()

    asyncio.run(create())
    yield TEMPLATE
    asyncio.run(drop())


class Databases:
    """Fresh clones of the template, made ahead of time and dropped after use on threads
    of their own.

    CREATE DATABASE and DROP DATABASE each spend a few hundred milliseconds waiting for
    the disk; made here they overlap with the tests instead of adding to each one. Every
    test still gets a database nobody used before.
    """

    READY = 4  # clones kept ready

    def __init__(self, template: str) -> None:
        self._template = template
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="test-db")
        self._ready: collections.deque[concurrent.futures.Future[str]] = collections.deque(
            self._pool.submit(self._create) for _ in range(self.READY))
        self._drops: list[concurrent.futures.Future[None]] = []

    def _create(self) -> str:
        name = f"gw_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin_execute(f"CREATE DATABASE {name} TEMPLATE {self._template}"))
        return name

    def _drop(self, name: str) -> None:
        asyncio.run(_admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

    async def take(self) -> str:
        """The name of a new database of the test's own."""
        made = self._ready.popleft()
        self._ready.append(self._pool.submit(self._create))
        return await asyncio.wrap_future(made)

    def drop(self, name: str) -> None:
        self._drops.append(self._pool.submit(self._drop, name))

    def close(self) -> None:
        """Drop the clones nobody took; wait for every drop."""
        for made in self._ready:
            with contextlib.suppress(Exception):
                self.drop(made.result())
        for dropped in self._drops:
            dropped.result()
        self._pool.shutdown()


async def _admin_execute(statement: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def databases(template_database: str) -> Iterator[Databases]:
    made = Databases(template_database)
    yield made
    made.close()


@pytest.fixture
async def database_url(databases: Databases) -> AsyncIterator[str]:
    name = await databases.take()
    yield f"{PG_ADMIN}/{name}"
    databases.drop(name)


@pytest.fixture
def topic_prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config(database_url: str, topic_prefix: str) -> Config:
    return Config(
        mqtt_url=MQTT_URL,
        database_url=database_url,
        metrics_addr=f"127.0.0.1:{free_port()}",
        topic_prefix=topic_prefix,
        client_id=f"gw-test-{uuid.uuid4().hex[:10]}",
        session_expiry_seconds=60,
        log_format="console",
        batch_wait_ms=2,
        drain_seconds=5,
        # Periodic work at the tests' own pace, never the module defaults: the database
        # health check sees the database back within 0.1 s, and no sweep, prune or
        # revocation pass runs in the background unless a test asks for one with a short
        # interval (`dataclasses.replace(config, command_sweep_seconds=0.1)`).
        health_interval_seconds=2.0,
        health_recheck_seconds=0.1,
        command_sweep_seconds=3600.0,
        revocation_pass_seconds=3600.0,
        history_prune_seconds=3600.0,
    )


@contextlib.asynccontextmanager
async def running_gateway(config: Config) -> AsyncIterator[Gateway]:
    """A gateway running in this event loop until the context exits."""
    async with Storage.open(config.database_url, timeout=config.db_timeout_seconds,
                            offline_after=config.offline_after_seconds) as storage:
        gateway = Gateway(config, storage)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop), name="gateway-under-test")
        connected = asyncio.create_task(gateway.edge.connected.wait())
        done, _ = await asyncio.wait({task, connected}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if connected not in done:
            connected.cancel()
            if task in done:
                task.result()
            raise RuntimeError("the gateway did not connect to the broker")
        try:
            yield gateway
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)


@pytest.fixture
async def gateway(config: Config) -> AsyncIterator[Gateway]:
    async with running_gateway(config) as gw:
        yield gw


async def create_key(database_url: str, *scopes: str) -> tuple[str, str]:
    """(key id, secret) for a new API key with ``scopes``."""
    key = auth.new_key()
    async with Storage.open(database_url, min_size=1, max_size=1) as storage:
        await storage.keys.create(key.key_id, "test", key.key_hash, scopes)
    return key.key_id, key.secret


@pytest.fixture
async def api_key(database_url: str) -> str:
    return (await create_key(database_url, auth.READ, auth.WRITE))[1]


class Caller:
    """A backend service calling the gateway over MQTT request/reply: a `GatewayClient`
    (``self.gateway``) whose API key is chosen per call.

    ``call`` reaches any route and returns (status, body), with no retries. ``send``
    publishes a hand-made envelope (malformed ones included) and returns the reply as
    decoded JSON, its MQTT 5 properties under ``_properties``. Replies nobody waited for
    land in ``unmatched``. ``client`` is the MQTT connection, for raw publishes.
    """

    def __init__(self, client: aiomqtt.Client, prefix: str, reply_topic: str, key: str | None,
                 v5: bool, gateway: GatewayClient | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.reply_topic = reply_topic
        self.key = key
        self.v5 = v5
        self.unmatched: list[dict[str, Any]] = []
        # Over a connection made elsewhere (its owner runs `_read`), or the caller's own.
        self.gateway = gateway or GatewayClient.attach(
            client, reply_topic=reply_topic, topic_prefix=prefix,
            protocol=5 if v5 else "3.1.1", retries=0)
        self.gateway.on_unmatched = lambda message: self.unmatched.append(_decoded(message))

    async def _read(self) -> None:
        await self.gateway.read()

    async def send(self, payload: bytes, correlation: str, properties: Any = None,
                   timeout: float = 10) -> dict[str, Any]:
        _, message = await self.gateway.send_raw(payload, correlation, properties=properties,
                                                 timeout=timeout)
        return _decoded(message)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = "default",
    ) -> tuple[int, Any]:
        all_headers = dict(headers or {})
        key = self.key if key == "default" else key
        if key is not None and not any(h.lower() in ("authorization", "x-api-key")
                                       for h in all_headers):
            all_headers["authorization"] = f"Bearer {key}"
        return await self.gateway.call(method, path, body, query, all_headers,
                                       idempotent=False)


def _decoded(message: aiomqtt.Message) -> dict[str, Any]:
    assert isinstance(message.payload, bytes)
    reply: dict[str, Any] = msgspec.json.decode(message.payload)
    reply["_properties"] = message.properties
    return reply


@contextlib.asynccontextmanager
async def caller(prefix: str, key: str | None, *, v5: bool = True) -> AsyncIterator[Caller]:
    async with GatewayClient(MQTT_URL, topic_prefix=prefix, protocol=5 if v5 else "3.1.1",
                             retries=0) as gateway:
        yield Caller(gateway.mqtt, prefix, gateway.reply_topic, key, v5, gateway)


@pytest.fixture
async def api(gateway: Gateway, topic_prefix: str, api_key: str) -> AsyncIterator[Caller]:
    async with caller(topic_prefix, api_key) as c:
        yield c


class Device:
    """A simulated device: publishes heartbeats, collects what the gateway sends it."""

    def __init__(self, client: aiomqtt.Client, prefix: str, serial: str) -> None:
        self.client = client
        self.prefix = prefix
        self.serial = serial
        self.commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.settings: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def _read(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            document = msgspec.json.decode(message.payload)
            if message.topic.value.endswith("/commands"):
                await self.commands.put(document)
            else:
                await self.settings.put(document)

    async def heartbeat(self, payload: dict[str, Any] | bytes, *,
                        msgpack: bool = False) -> None:
        if isinstance(payload, dict):
            data = msgspec.msgpack.encode(payload) if msgpack else msgspec.json.encode(payload)
        else:
            data = payload
        await self.client.publish(f"{self.prefix}/devices/{self.serial}/heartbeat", data, qos=1)

    @staticmethod
    async def next(queue: asyncio.Queue[dict[str, Any]], timeout: float = 5) -> dict[str, Any]:
        return await asyncio.wait_for(queue.get(), timeout)


@contextlib.asynccontextmanager
async def reading(read: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run a message reader (``read``) for the duration of the block, then stop it."""
    reader = asyncio.create_task(read)
    try:
        yield reader
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await reader


@contextlib.asynccontextmanager
async def device(prefix: str, serial: str) -> AsyncIterator[Device]:
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=NODELAY) as client:
        await client.subscribe(f"{prefix}/devices/{serial}/commands", qos=1)
        await client.subscribe(f"{prefix}/devices/{serial}/settings", qos=1)
        d = Device(client, prefix, serial)
        async with reading(d._read()):
            yield d


# Events in the database (schema.sql): all recorded, and those not acknowledged by the
# broker yet (in the outbox, or given a position past event_relay.published).
EVENTS_RECORDED_SQL = "SELECT (SELECT count(*) FROM event_outbox) + (SELECT count(*) FROM events)"
EVENTS_UNPUBLISHED_SQL = ("SELECT (SELECT count(*) FROM event_outbox)"
                          " + (SELECT assigned - published FROM event_relay)")


async def event_published(db: asyncpg.Connection, device_id: str, event_type: str
                          ) -> bool | None:
    """Whether the broker acknowledged the device's event of that type (None: no such
    event is recorded)."""
    state: bool | None = await db.fetchval(
        "SELECT CASE WHEN EXISTS (SELECT FROM events e, event_relay r WHERE e.device_id = $1"
        "   AND e.type = $2 AND e.position <= r.published) THEN true"
        " WHEN EXISTS (SELECT FROM event_outbox WHERE device_id = $1 AND type = $2)"
        "   OR EXISTS (SELECT FROM events WHERE device_id = $1 AND type = $2) THEN false END",
        device_id, event_type)
    return state


async def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.02) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for checking stored state."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()

