"""Talking to the operator API and to chat from a second loopback address, for the API and identity tests.

``call`` also checks the answer against the OpenAPI document: every status
an operation answers must be listed there, and every body is JSON.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from _chat import LineClient, ServerProcess
from chat_svc.api import ApiError, _match
from chat_svc.openapi import DOCUMENT

KEY = "k3y-for-tests-0123456789"


def keys_file(directory: Path, *keys: str) -> Path:
    path = directory / "api-keys"
    path.write_text("# operators\n\n" + "".join(f"{key}\n" for key in keys or (KEY,)))
    return path


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request; (status, JSON body, headers).  ``raw`` sends bytes as the body instead of ``body``."""
    sent = dict(headers or {})
    if key is not None:
        sent.setdefault("Authorization", f"Bearer {key}")
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read()
        status, answer_headers = response.status, dict(response.getheaders())
    finally:
        connection.close()
    assert answer_headers["Content-Type"] == "application/json", (status, text)
    parsed = json.loads(text)
    documented(method, path, status)
    return status, parsed, answer_headers


def documented(method: str, path: str, status: int) -> None:
    """An operation's answer must be one its OpenAPI entry lists (401, 404 and 405 are the router's)."""
    try:
        route, _ = _match(method, urllib.parse.unquote(path.split("?")[0], errors="replace"))
    except ApiError as error:
        assert status in (401, error.status), (method, path, status)
        return
    responses = DOCUMENT["paths"][route.template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {route.template} answered {status}, not in the OpenAPI document"


class SourceClient(LineClient):
    """A LineClient connecting from another local address (127.0.0.2 stands in for "another IP")."""

    def __init__(self, host: str, port: int, source: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        self.timeout = timeout
        self._buffer = b""


def from_address(srv: ServerProcess, source: str) -> LineClient:
    client = SourceClient(srv.host, srv.port, source)
    srv.clients.append(client)
    return client


def events(srv: ServerProcess, name: str) -> list[dict[str, Any]]:
    """The JSON log events called ``name``."""
    return [event for event in srv.log_events() if event.get("event") == name]
