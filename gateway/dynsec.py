"""Per-device broker access through Mosquitto's dynamic security plugin.

``Control`` speaks the plugin's control API over the gateway's own MQTT connection:
a batch of commands published to ``$CONTROL/dynamic-security/v1``, answers matched by each
command's ``correlationData`` on ``.../v1/response``.

``DeviceAccess`` is the policy. Issuing credentials gives the device a broker client
(username = serial) with one role of its own that may publish only its heartbeat topic and
subscribe only to its commands and settings topics; calling it again rotates the password
(the broker drops sessions logged in with the old one). Revocation deletes the client and
its role, which disconnects the device at once. It is decided in PostgreSQL (a deleted
device; a ``factory_reset`` that the device acknowledged or that expired after the
credentials were issued) and applied to the broker here: at once on delete, from the ack
and expiry hooks, and by a reconciling pass that retries until the broker confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import secrets
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime

import aiomqtt
import msgspec
import structlog
from gateway_codecs import dynsec as wire
from gateway_codecs.registry import DeviceTopics

from gateway import metrics
from gateway.config import Config
from gateway.errors import (
    Conflict,
    DynsecRefused,
    DynsecUnavailable,
    NotFound,
    StorageUnavailable,
)
from gateway.logs import RateLimitedLog
from gateway.publisher import Publisher
from gateway.storage import Storage
from gateway.storage.credentials import Reservation

log = structlog.get_logger("gateway.dynsec")

REQUEST_TIMEOUT_SECONDS = 5.0
RETRY_MAX_SECONDS = 30.0
# Device ids queued for a targeted revocation pass; past this a full pass is run instead.
DUE_MAX = 10_000
ROLE_PREFIX = "gateway-device:"
# Marks the broker clients the gateway created; it never touches any other client.
MANAGED_TEXTNAME = "device (managed by the gateway)"
SALT_BYTES = 16


def hash_password(password: str) -> bytes:
    """A random salt followed by sha256(salt + password).

    The password is 32 random characters (192 bits), so a fast hash is enough; the
    broker keeps its own salted PBKDF2 hash, which is what devices log in against.
    """
    salt = secrets.token_bytes(SALT_BYTES)
    return salt + hashlib.sha256(salt + password.encode()).digest()


class Control:
    """The plugin's control API: ``execute`` a batch, get one response per command."""

    def __init__(
        self,
        publisher: Publisher,
        connected: asyncio.Event,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        """``connected``: set while the edge is connected and subscribed."""
        self._publisher = publisher
        self.connected = connected
        self._timeout = timeout
        # Every gateway process sees every response on the topic: ids are per process.
        self._prefix = f"gw-{uuid.uuid4().hex[:12]}-"
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[wire.Response]] = {}
        self._bad_log = RateLimitedLog()

    def accept(self, message: aiomqtt.Message, received: float) -> None:
        """Called by the edge for each message on the response topic."""
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            batch = wire.decode_responses(payload)
        except msgspec.DecodeError as exc:
            metrics.DYNSEC_ERRORS.labels("bad_response").inc()
            allowed, suppressed = self._bad_log.allow()
            if allowed:
                log.warning("dynsec.bad_response", error=str(exc)[:200], suppressed=suppressed)
            return
        for response in batch.responses:
            future = self._waiting.pop(response.correlationData or "", None)
            if future is not None and not future.done():
                future.set_result(response)

    async def wait_connected(self) -> None:
        await self.connected.wait()

    async def execute(
        self,
        commands: list[wire.Command],
        tolerate: Collection[tuple[str, str]] = (),
    ) -> list[wire.Response]:
        """Run ``commands`` in order, in one message; raise on any error not in ``tolerate``.

        ``tolerate`` holds (command, error) pairs that mean "already so" (``createRole``,
        ``Role already exists``). Fails at once when the edge is not connected, so nothing
        is left queued to change the broker after the caller has given up.
        """
        if not self.connected.is_set():
            metrics.DYNSEC_ERRORS.labels("unavailable").inc()
            raise DynsecUnavailable("the gateway is not connected to the broker")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[wire.Response]] = []
        for command in commands:
            command.correlationData = f"{self._prefix}{next(self._ids)}"
            future: asyncio.Future[wire.Response] = loop.create_future()
            self._waiting[command.correlationData] = future
            futures.append(future)
        try:
            if not self._publisher.publish(wire.CONTROL_TOPIC, wire.encode_commands(commands)):
                metrics.DYNSEC_ERRORS.labels("unavailable").inc()
                raise DynsecUnavailable("the control request could not be published")
            async with asyncio.timeout(self._timeout):
                responses = [await future for future in futures]
        except TimeoutError as exc:
            metrics.DYNSEC_ERRORS.labels("unavailable").inc()
            raise DynsecUnavailable(
                f"the broker's dynamic security did not answer in {self._timeout:g} s"
            ) from exc
        finally:
            for command in commands:
                self._waiting.pop(command.correlationData or "", None)
        for response in responses:
            if response.error is not None and (response.command, response.error) not in tolerate:
                metrics.DYNSEC_ERRORS.labels("refused").inc()
                raise DynsecRefused(response.command, response.error)
        return responses

    async def get_client(self, username: str) -> wire.ClientInfo | None:
        [response] = await self.execute(
            [wire.Command(command="getClient", username=username)],
            tolerate={("getClient", "Client not found")},
        )
        return response.data.client if response.data is not None else None


@dataclass(frozen=True, slots=True)
class Issued:
    device_id: str
    serial: str
    password: str
    created_at: datetime
    rotated: bool
    topics: DeviceTopics


class DeviceAccess:
    """Issues, rotates and revokes device credentials; owns the revocation task.

    With a ``control`` (GATEWAY_DYNSEC), every change is made at the broker as well. Without
    one (GATEWAY_DATABASE_CREDENTIALS), credentials live in PostgreSQL only, for a broker
    that authenticates devices from it (EMQX, deploy/emqx): a revocation is then the
    database's ``revoked_at``, which the broker's queries read, and nothing is sent."""

    def __init__(self, config: Config, storage: Storage, control: Control | None) -> None:
        self._config = config
        self._storage = storage
        self._control = control
        self._due: set[str] = set()
        self._full_pass = True  # at start: apply whatever was left pending
        self._wakeup = asyncio.Event()
        self._wakeup.set()

    def topics(self, serial: str) -> DeviceTopics:
        topic = self._config.topic
        return DeviceTopics(heartbeat=topic(f"devices/{serial}/heartbeat"),
                            commands=topic(f"devices/{serial}/commands"),
                            settings=topic(f"devices/{serial}/settings"))

    def _acls(self, serial: str) -> list[wire.Acl]:
        topics = self.topics(serial)
        return [
            wire.Acl(wire.PUBLISH_SEND, topics.heartbeat),
            wire.Acl(wire.SUBSCRIBE_LITERAL, topics.commands),
            wire.Acl(wire.SUBSCRIBE_LITERAL, topics.settings),
            # Explicit, in case the broker's default for receiving was set to deny.
            wire.Acl(wire.PUBLISH_RECEIVE, topics.commands),
            wire.Acl(wire.PUBLISH_RECEIVE, topics.settings),
        ]

    # ---- issue and rotate ------------------------------------------------------------

    async def issue(self, device_id: str) -> Issued:
        """New credentials for a live device; the password exists only in the result.

        The device's credentials are leased (no transaction stays open while the broker
        answers), changed at the broker (with dynamic security), then confirmed. Raises
        NotFound, Conflict (the broker has a client of that name the gateway did not
        create, or another change of these credentials is in progress),
        DynsecUnavailable, DynsecRefused, StorageUnavailable.
        """
        password = secrets.token_urlsafe(24)
        reservation = await self._storage.credentials.reserve_issue(device_id, _lease())
        serial = reservation.serial
        if self._control is not None:
            await self._set_at_broker(reservation, password)
        try:
            confirmed = await self._storage.credentials.confirm_issue(
                reservation, hash_password(password)
            )
        except NotFound:
            # Deleted while the broker was being changed: the new account is revoked.
            self.revoke_later((device_id,))
            raise
        metrics.DEVICE_CREDENTIALS_ISSUED.inc()
        log.info("dynsec.credentials_issued", device_id=device_id, rotated=confirmed.rotated)
        return Issued(device_id, serial, password, confirmed.created_at, confirmed.rotated,
                      self.topics(serial))

    async def _set_at_broker(self, reservation: Reservation, password: str) -> None:
        """Create or update the device's client and role at the broker (leased)."""
        assert self._control is not None
        serial = reservation.serial
        try:
            client = await self._control.get_client(serial)
            if client is not None and client.textname != MANAGED_TEXTNAME:
                raise Conflict(
                    f"The broker has a client named {serial} that the gateway does not manage"
                )
            role = ROLE_PREFIX + serial
            acls = self._acls(serial)
            commands = [
                wire.Command(command="createRole", rolename=role, acls=acls),
                # Sets the ACLs exactly, should the role exist (e.g. another topic prefix).
                wire.Command(command="modifyRole", rolename=role, acls=acls),
            ]
            if client is None:
                commands.append(wire.Command(
                    command="createClient", username=serial, password=password,
                    textname=MANAGED_TEXTNAME, textdescription=reservation.device_id,
                    roles=[wire.RoleRef(role)],
                ))
            else:
                # The broker disconnects sessions that logged in with the old password.
                commands.append(
                    wire.Command(command="setClientPassword", username=serial, password=password)
                )
            await self._control.execute(commands, tolerate={("createRole", "Role already exists")})
        except BaseException:
            with contextlib.suppress(StorageUnavailable):
                await self._storage.credentials.release(reservation)
            raise

    # ---- revoke ----------------------------------------------------------------------

    async def revoke_now(self, device_id: str) -> None:
        """Apply a revocation already recorded (a delete); on failure leave it to the task."""
        if self._control is None:
            return  # recorded in the database, which is where the broker looks
        try:
            await self._revoke(device_id)
        except (DynsecUnavailable, DynsecRefused, StorageUnavailable) as exc:
            log.warning("dynsec.revoke_deferred", device_id=device_id, error=str(exc))
            self.revoke_later((device_id,))

    def revoke_later(self, device_ids: Iterable[str]) -> None:
        """Ask the task to check these devices' credentials (acks, expiries)."""
        if self._control is None:
            return
        queued = False
        for device_id in device_ids:
            queued = True
            if len(self._due) >= DUE_MAX:
                self._full_pass = True  # nothing is lost: a full pass finds it
                break
            self._due.add(device_id)
        if queued:
            metrics.REVOCATIONS_QUEUED.set(len(self._due))
            self._wakeup.set()

    async def run(self) -> None:
        """Apply due revocations until cancelled: when asked, and on a timer.

        The timer's full pass is claimed (see ``Database.claim``), so one process runs it
        per period whatever the number of processes; passes asked for by this process's
        acks, expiries and deletes always run.
        """
        if self._control is None:
            return
        every = self._config.revocation_pass_seconds
        delay = 1.0
        while True:
            try:
                async with asyncio.timeout(every):
                    await self._wakeup.wait()
            except TimeoutError:
                self._full_pass = True
            await self._control.wait_connected()
            self._wakeup.clear()
            full, due = self._full_pass, self._due
            self._full_pass, self._due = False, set()
            metrics.REVOCATIONS_QUEUED.set(0)
            if full and not await self._claimed(every):
                full = False
            if not full and not due:
                continue
            if await self._pass(None if full else sorted(due)):
                delay = 1.0
                continue
            self._full_pass = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            self._wakeup.set()

    async def _claimed(self, every: float) -> bool:
        try:
            return await self._storage.db.claim("credential_revocations", every)
        except StorageUnavailable:
            return True  # the pass itself will find the database away and retry

    async def _pass(self, device_ids: list[str] | None) -> bool:
        """One pass; False when something must be retried."""
        try:
            pending = await self._storage.credentials.due_revocations(device_ids)
        except StorageUnavailable as exc:
            log.warning("dynsec.revocations_deferred", error=str(exc))
            return False
        ok = True
        for device_id in pending:
            try:
                await self._revoke(device_id)
            except (DynsecUnavailable, DynsecRefused, StorageUnavailable) as exc:
                log.warning("dynsec.revoke_deferred", device_id=device_id, error=str(exc))
                ok = False
        return ok

    async def _revoke(self, device_id: str) -> None:
        assert self._control is not None
        reservation = await self._storage.credentials.claim_revocation(device_id, _lease())
        if reservation is None:
            return  # applied already, or another process is at it
        serial = reservation.serial
        try:
            client = await self._control.get_client(serial)
            commands = [wire.Command(command="deleteRole", rolename=ROLE_PREFIX + serial)]
            if client is not None and client.textname == MANAGED_TEXTNAME:
                # Deleting the client disconnects every session logged in as it.
                commands.insert(0, wire.Command(command="deleteClient", username=serial))
            await self._control.execute(commands, tolerate={("deleteRole", "Role not found")})
        except BaseException:
            with contextlib.suppress(StorageUnavailable):
                await self._storage.credentials.release(reservation)
            raise
        await self._storage.credentials.confirm_revocation(reservation)
        metrics.DEVICE_CREDENTIALS_REVOKED.inc()
        log.info("dynsec.credentials_revoked", device_id=device_id)


def _lease() -> str:
    """A lease holder's name: this process and call."""
    return uuid.uuid4().hex
