"""The operator HTTP API: post into rooms, list rooms and members, kick, ban.

Other services use it (deploy bots, alerting, moderation tools), so it is
plain JSON over HTTP behind Bearer keys, served by the same pywsgi as
``/metrics`` (``httpfront`` mounts it under ``/api/``).  ``ROUTES`` is the
one place that knows the paths; the OpenAPI document (``openapi``) is
checked against it by the tests.  Every answer, good or bad, is JSON, and
every request is logged as ``api_request`` with the key's id, never the key.
Cluster-wide answers come from the ``Directory``, bans from a ``BanStore``
and idempotency keys from an ``IdempotencyStore``: each has a local and a
Redis form, chosen once at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import structlog
from prometheus_client import Counter

from . import openapi, protocol
from .bans import MAX_TTL_S, BanStore, Unavailable, normalize_ip
from .commands import NICK_RULE, ROOM_RULE
from .directory import Directory
from .idempotency import PENDING, IdempotencyStore
from .text import clean

log = structlog.get_logger("chat_svc.api")

MAX_BODY = 64 * 1024
DEFAULT_FROM = "api"
DEFAULT_REASON = "no reason given"
MAX_REASON_CHARS = 200
# An Idempotency-Key: printable ASCII, as Stripe's and the IETF draft's are.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# A request finding its Idempotency-Key held by a request still running waits this long for its answer.
IDEMPOTENCY_WAIT_S = 1.0
# How long a publish waits for its line's id.  With Redis the id comes back with the publish
# (a millisecond); when Redis fails the line goes out locally with a local id after the
# backplane's 1 s timeout.  Past this the line was lost or is stuck, and the caller is told so.
PUBLISH_ID_WAIT_S = 3.0
LINE_ID_LATE = f"no id for the line within {PUBLISH_ID_WAIT_S:g} s: it may not have been delivered"
BAN_ID = re.compile(r"[0-9a-f]{16}")

StartResponse = Callable[..., Any]


class ApiError(Exception):
    """An answer other than 200: its status and the sentence in ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def key_id(key: str | bytes) -> str:
    """How logs name a key: the first 12 hex digits of its SHA-256 (``printf %s KEY | sha256sum``)."""
    data = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(data).hexdigest()[:12]


class ApiKeys:
    """The keys of ``--api-keys-file``: one per line, blank lines and ``#`` comments ignored.

    Held as SHA-256 digests; a presented key is hashed and compared with
    every digest in constant time.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests: dict[bytes, str] = {}
        self.load()

    def __len__(self) -> int:
        return len(self._digests)

    def load(self) -> None:
        """Read the file (at start and on SIGHUP); OSError leaves the keys as they were."""
        with open(self.path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        keys = [line.encode() for line in lines if line and not line.startswith("#")]
        self._digests = {hashlib.sha256(key).digest(): key_id(key) for key in keys}

    def identify(self, authorization: str) -> str | None:
        """The id of the key in an ``Authorization: Bearer <key>`` header; None when absent or unknown."""
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        # A WSGI header is latin-1 text standing for the bytes sent.
        digest = hashlib.sha256(presented.strip().encode("latin-1", "replace")).digest()
        found = None
        for known, kid in self._digests.items():
            if hmac.compare_digest(digest, known):
                found = kid
        return found


@dataclass
class Request:
    """One API request: its route's path parameters, its headers, its JSON body."""

    environ: dict[str, Any]
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def json(self, allowed: Iterable[str]) -> dict[str, Any]:
        """The body as a JSON object with no fields but ``allowed``; an empty body is ``{}``."""
        length = self.environ.get("CONTENT_LENGTH") or ""
        if length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, f"body over {MAX_BODY} bytes")
        try:
            raw = self.environ["wsgi.input"].read(MAX_BODY + 1)
        except OSError:  # broken chunked framing, a timeout: pywsgi's own errors are OSErrors
            raise ApiError(400, "body could not be read") from None
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"body over {MAX_BODY} bytes")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise ApiError(400, f"unknown field: {unknown[0]}")
        return body


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    return value


def _text(value: str) -> str:
    """Text from a request as chat lines carry it: one line, no control characters."""
    return clean(value.encode("utf-8", "replace")).strip()


def _reason(body: dict[str, Any]) -> str:
    reason = _text(_string(body, "reason") or "") or DEFAULT_REASON
    if len(reason) > MAX_REASON_CHARS:
        raise ApiError(400, f"reason is longer than {MAX_REASON_CHARS} characters")
    return reason


def _room(request: Request) -> str:
    room = protocol.room_name(request.params["room"])
    if room is None:
        raise ApiError(400, f"invalid room name: {ROOM_RULE}")
    return room


Answer = tuple[int, Any]
Handler = Callable[["Api", Request], Answer]


@dataclass(frozen=True)
class Route:
    """One operation: a method, a path template with ``{name}`` parameters, and its handler."""

    method: str
    template: str
    handler: Handler

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


@dataclass
class Api:
    """The WSGI application for ``/api/``; built once by the service."""

    keys: ApiKeys
    directory: Directory
    bans: BanStore
    idempotency: IdempotencyStore
    requests: Counter
    replays: Counter
    max_text_bytes: int = 8192

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "").encode("latin-1", "replace").decode("utf-8", "replace")
        kid = self.keys.identify(environ.get("HTTP_AUTHORIZATION", ""))
        route: Route | None = None
        headers: list[tuple[str, str]] = []
        try:
            if kid is None:
                raise ApiError(401, "missing or unknown API key", [("WWW-Authenticate", "Bearer")])
            route, params = _match(method, path)
            status, body = route.handler(self, Request(environ, method, path, params))
        except ApiError as error:
            status, body, headers = error.status, {"error": error.message}, error.headers
        except Exception:
            log.exception("api_failed", method=method, path=path[:256])
            status, body = 500, {"error": "internal error"}
        log.info("api_request", key_id=kid, method=method[:16], path=path[:256], status=status)
        self.requests.labels(route.template if route else "unmatched", str(status)).inc()
        data = (json.dumps(body) + "\n").encode()
        start_response(
            f"{status} {_PHRASES.get(status, 'Error')}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close"),
                *headers,
            ],
        )
        return [data]

    # -- operations ---------------------------------------------------------------

    def publish(self, request: Request) -> Answer:
        room = _room(request)
        body = request.json(("text", "from"))
        text = _string(body, "text")
        if text is None:
            raise ApiError(400, "text is required")
        text = _text(text)
        if not text:
            raise ApiError(400, "text is empty")
        if len(text.encode()) > self.max_text_bytes:
            raise ApiError(400, f"text is longer than {self.max_text_bytes} bytes")
        sender = _string(body, "from")
        sender = DEFAULT_FROM if sender is None else sender
        if not protocol.valid_nick(sender):
            raise ApiError(400, f"invalid from: {NICK_RULE}")
        key = request.header("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            raise ApiError(400, "invalid Idempotency-Key: 1-255 printable ASCII characters")
        if key is not None:
            replayed = self._claim(key)
            if replayed is not None:
                self.replays.inc()
                return 200, json.loads(replayed)
        assigned: gevent.event.AsyncResult[str] = gevent.event.AsyncResult()
        try:
            if not self.directory.post(room, protocol.chat_line(sender, text), assigned.set):
                raise ApiError(404, "no such room")
            line_id = assigned.get(timeout=PUBLISH_ID_WAIT_S)
        except gevent.Timeout:
            if key is not None:
                self.idempotency.abandon(key)
            raise ApiError(503, LINE_ID_LATE) from None
        except BaseException:
            if key is not None:
                self.idempotency.abandon(key)
            raise
        answer = {"id": line_id}
        if key is not None:
            self.idempotency.record(key, json.dumps(answer))
        return 200, answer

    def _claim(self, key: str) -> str | None:
        """None once ``key`` is ours; the recorded answer when it was used; 409 while a twin still runs."""
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            found = self.idempotency.claim(key)
            if found != PENDING:
                return found
            if time.monotonic() > deadline:
                raise ApiError(409, "a request with this Idempotency-Key is still running")
            gevent.sleep(0.02)

    def rooms(self, request: Request) -> Answer:
        return 200, [{"name": name, "members": count} for name, count in self.directory.room_counts()]

    def members(self, request: Request) -> Answer:
        names = self.directory.who(_room(request))
        if not names:
            raise ApiError(404, "no such room")
        return 200, names

    def kick(self, request: Request) -> Answer:
        nick = request.params["nick"]
        if not protocol.valid_nick(nick):
            raise ApiError(400, f"invalid nick: {NICK_RULE}")
        reason = _reason(request.json(("reason",)))
        if not self.directory.kick(nick, protocol.error_line(f"kicked: {reason}")):
            raise ApiError(404, "no such member")
        log.info("member_kicked", nick=nick, reason=reason)
        return 200, {}

    def create_ban(self, request: Request) -> Answer:
        body = request.json(("nick", "ip", "ttl_s", "reason"))
        nick, ip = _string(body, "nick"), _string(body, "ip")
        if nick is not None and not protocol.valid_nick(nick):
            raise ApiError(400, f"invalid nick: {NICK_RULE}")
        if ip is not None:
            try:
                ip = normalize_ip(ip)
            except ValueError:
                raise ApiError(400, "invalid ip: give an IPv4 or IPv6 address or network") from None
        if nick is None and ip is None:
            raise ApiError(400, "give nick or ip (or both)")
        ttl = body.get("ttl_s")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL_S:
            raise ApiError(400, f"ttl_s must be a whole number of seconds from 1 to {MAX_TTL_S}")
        reason = _reason(body)
        try:
            ban = self.bans.create(nick, ip, reason, ttl)
        except Unavailable as exc:
            raise ApiError(503, str(exc)) from None
        log.info("ban_added", id=ban.id, nick=nick, ip=ip, ttl_s=ttl, reason=reason)
        return 200, {"id": ban.id}

    def list_bans(self, request: Request) -> Answer:
        now = self.bans.clock()
        return 200, [ban.public(now) for ban in self.bans.active()]

    def delete_ban(self, request: Request) -> Answer:
        ban_id = request.params["id"]
        try:
            found = BAN_ID.fullmatch(ban_id) is not None and self.bans.delete(ban_id)
        except Unavailable as exc:
            raise ApiError(503, str(exc)) from None
        if not found:
            raise ApiError(404, "no such ban")
        log.info("ban_removed", id=ban_id)
        return 200, {}

    def document(self, request: Request) -> Answer:
        return 200, openapi.DOCUMENT


ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/rooms/{room}/messages", Api.publish),
    Route("GET", "/api/v1/rooms", Api.rooms),
    Route("GET", "/api/v1/rooms/{room}/members", Api.members),
    Route("POST", "/api/v1/members/{nick}/kick", Api.kick),
    Route("POST", "/api/v1/bans", Api.create_ban),
    Route("GET", "/api/v1/bans", Api.list_bans),
    Route("DELETE", "/api/v1/bans/{id}", Api.delete_ban),
    Route("GET", "/api/v1/openapi.json", Api.document),
)
_PATTERNS = [(route, route.pattern) for route in ROUTES]
_PHRASES = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for ``method`` and ``path``; ApiError 404 (no such path) or 405 (not that method)."""
    allowed = []
    for route, pattern in _PATTERNS:
        found = pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict()
        allowed.append(route.method)
    if not allowed:
        raise ApiError(404, "not found")
    raise ApiError(405, "method not allowed", [("Allow", ", ".join(allowed))])
