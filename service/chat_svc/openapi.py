"""The operator API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json``.

Written by hand, as the reference clients are generated from;
tests/test_api.py checks that its paths and methods are exactly the
routes of ``api.ROUTES`` and that every status an endpoint answers is
listed here.
"""

from __future__ import annotations

from typing import Any

from . import __version__


def _error(description: str) -> dict[str, Any]:
    return _ok(description, {"$ref": "#/components/schemas/Error"})


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


EMPTY = {"type": "object", "additionalProperties": False}
NICK = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,32}$"}
ROOM = _path("room", "Room name: optional leading # (URL-encoded as %23), then 1-32 of A-Z a-z 0-9 _ - .")
BAD_REQUEST = _error("Bad input: the sentence says which field and why.")
UNAUTHORIZED = _error("No `Authorization: Bearer <key>` header, or a key not in --api-keys-file.")
TOO_LARGE = _error("Body over 64 KiB.")
BANS_DOWN = _error("With --redis-url, Redis is unreachable: bans cannot be changed (nothing was changed).")

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "chat-svc operator API",
        "version": __version__,
        "description": (
            "Enabled by --api-keys-file. Every request needs `Authorization: Bearer <key>`; bodies are JSON "
            "objects of at most 64 KiB (unknown fields are refused); every answer is JSON, errors as "
            '`{"error": "..."}`. A known path with another method answers 405 with `Allow`; an unknown '
            "path 404. Cluster-wide with --redis-url. Reference: docs/api.md."
        ),
    },
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            },
            "Ban": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "nick": {"type": ["string", "null"]},
                    "ip": {"type": ["string", "null"], "description": "An address, or a network in CIDR form."},
                    "reason": {"type": "string"},
                    "ttl_s": {"type": "integer", "description": "Seconds until the ban ends."},
                },
                "required": ["id", "nick", "ip", "reason", "ttl_s"],
            },
        },
    },
    "paths": {
        "/api/v1/rooms/{room}/messages": {
            "post": {
                "summary": "Say a line in a room on every instance: members see `[<from>] <text>`.",
                "parameters": [
                    ROOM,
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "1-255 printable ASCII characters. A second request with the same key "
                        "within 5 minutes (cluster-wide with Redis) delivers nothing and gets the first answer.",
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": _body(
                    {
                        "text": {"type": "string", "description": "One line; control characters are stripped."},
                        "from": {**NICK, "default": "api", "description": "Shown as the sender; a valid nick."},
                    },
                    ["text"],
                ),
                "responses": {
                    "200": _ok(
                        "Delivered to the room's members. `id` is the line's message id, the one members "
                        "with `/ids` see it under (`@<epoch>:<offset> [<from>] <text>`), on every instance; "
                        "a replay of an Idempotency-Key answers the first request's id.",
                        {
                            "type": "object",
                            "properties": {"id": {"type": "string", "pattern": "^[A-Za-z0-9]{1,16}:[0-9]+$"}},
                            "required": ["id"],
                            "additionalProperties": False,
                        },
                    ),
                    "400": BAD_REQUEST,
                    "401": UNAUTHORIZED,
                    "404": _error("No such room: nobody is in it, on any instance."),
                    "409": _error("A request with the same Idempotency-Key is still running."),
                    "413": TOO_LARGE,
                    "503": _error(
                        "With --redis-url, the line's id did not come back within 3 s (Redis stalled or failed "
                        "and the room has no members on this instance): it may not have been delivered. "
                        "The Idempotency-Key is released, so a retry may deliver it twice."
                    ),
                },
            }
        },
        "/api/v1/rooms": {
            "get": {
                "summary": "Rooms with members, on every instance, sorted by name.",
                "responses": {
                    "200": _ok(
                        "Each room and its member count.",
                        {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"name": {"type": "string"}, "members": {"type": "integer"}},
                                "required": ["name", "members"],
                            },
                        },
                    ),
                    "401": UNAUTHORIZED,
                },
            }
        },
        "/api/v1/rooms/{room}/members": {
            "get": {
                "summary": "Nicks in a room, on every instance, sorted.",
                "parameters": [ROOM],
                "responses": {
                    "200": _ok("The nicks.", {"type": "array", "items": {"type": "string"}}),
                    "400": BAD_REQUEST,
                    "401": UNAUTHORIZED,
                    "404": _error("No such room."),
                },
            }
        },
        "/api/v1/members/{nick}/kick": {
            "post": {
                "summary": "The member gets `! kicked: <reason>` and is disconnected, wherever it is.",
                "parameters": [_path("nick", "The member's nick (or the sub of an identified member).")],
                "requestBody": _body({"reason": {"type": "string", "maxLength": 200, "default": "no reason given"}}),
                "responses": {
                    "200": _ok("Kicked.", EMPTY),
                    "400": BAD_REQUEST,
                    "401": UNAUTHORIZED,
                    "404": _error("No such member."),
                    "413": TOO_LARGE,
                },
            }
        },
        "/api/v1/bans": {
            "post": {
                "summary": "Ban a nick, an address or network, or both (either matches); matching members "
                "are disconnected with `! banned: <reason>`.",
                "requestBody": _body(
                    {
                        "nick": NICK,
                        "ip": {"type": "string", "description": "An IPv4/IPv6 address or CIDR network."},
                        "ttl_s": {"type": "integer", "minimum": 1, "maximum": 31536000},
                        "reason": {"type": "string", "maxLength": 200, "default": "no reason given"},
                    },
                    ["ttl_s"],
                ),
                "responses": {
                    "200": _ok(
                        "The ban's id.",
                        {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
                    ),
                    "400": BAD_REQUEST,
                    "401": UNAUTHORIZED,
                    "413": TOO_LARGE,
                    "503": BANS_DOWN,
                },
            },
            "get": {
                "summary": "Bans in force, soonest to end first.",
                "responses": {
                    "200": _ok("The bans.", {"type": "array", "items": {"$ref": "#/components/schemas/Ban"}}),
                    "401": UNAUTHORIZED,
                },
            },
        },
        "/api/v1/bans/{id}": {
            "delete": {
                "summary": "Lift a ban.",
                "parameters": [_path("id", "The id POST /api/v1/bans answered.")],
                "responses": {
                    "200": _ok("Lifted.", EMPTY),
                    "401": UNAUTHORIZED,
                    "404": _error("No such ban (or it has ended)."),
                    "503": BANS_DOWN,
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {"200": _ok("OpenAPI 3.1.", {"type": "object"}), "401": UNAUTHORIZED},
            }
        },
    },
}
