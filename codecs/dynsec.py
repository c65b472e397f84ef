"""Mosquitto's dynamic security control API: command batches out, response batches in.

Commands are published as ``{"commands": [...]}`` to ``$CONTROL/dynamic-security/v1``; the
plugin answers every batch with ``{"responses": [...]}`` on ``.../v1/response``, one entry
per command, carrying the command's ``correlationData`` back. Field names are the plugin's.
"""

from __future__ import annotations

import msgspec

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"

# ACL types the gateway uses (the plugin also knows unsubscribe*).
PUBLISH_SEND = "publishClientSend"
PUBLISH_RECEIVE = "publishClientReceive"
SUBSCRIBE_LITERAL = "subscribeLiteral"
SUBSCRIBE_PATTERN = "subscribePattern"


class Acl(msgspec.Struct):
    acltype: str
    topic: str
    allow: bool = True


class RoleRef(msgspec.Struct):
    rolename: str


class Command(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One control command; only the fields a command takes are set."""

    command: str
    correlationData: str | None = None  # the plugin's spelling
    username: str | None = None
    password: str | None = None
    rolename: str | None = None
    textname: str | None = None
    textdescription: str | None = None
    roles: list[RoleRef] | None = None
    acls: list[Acl] | None = None


class CommandBatch(msgspec.Struct):
    commands: list[Command]


class ClientInfo(msgspec.Struct, kw_only=True):
    """``getClient``'s answer (unknown fields are ignored)."""

    username: str
    textname: str | None = None
    textdescription: str | None = None
    disabled: bool = False
    roles: list[RoleRef] = []


class ResponseData(msgspec.Struct, kw_only=True):
    client: ClientInfo | None = None


class Response(msgspec.Struct, kw_only=True):
    command: str
    correlationData: str | None = None  # the plugin's spelling
    error: str | None = None
    data: ResponseData | None = None


class ResponseBatch(msgspec.Struct):
    responses: list[Response]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ResponseBatch)


def encode_commands(commands: list[Command]) -> bytes:
    return _encoder.encode(CommandBatch(commands))


def decode_responses(payload: bytes) -> ResponseBatch:
    """Raises ``msgspec.DecodeError`` (a ``ValueError``) on anything else."""
    return _decoder.decode(payload)
