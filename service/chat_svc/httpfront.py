"""HTTP on the chat port: telling HTTP from chat, routing, and serving it with pywsgi.

Only port 9009 is published in a plain container, so Prometheus, the probes
and browsers (the chat page) may reach us on the chat port.  A connection is
HTTP when its first line is an HTTP request line; everything after that line
(headers, keep-alive, HEAD, size limits) is parsed by gevent's pywsgi, not by
hand.  ``Routes`` is the one place that decides which paths each listener
serves: with ``--metrics-port`` the operators' routes (metrics, probes, the
API) move there and the chat port answers them 404; the page stays.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import pywsgi
from gevent.pool import Pool
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from .gevent_seams import QuietHandler, wsgi_handler
from .listener import PausingServer
from .webpage import CHAT_LISTENER, LISTENER, Page

_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
_REQUEST_LINE = re.compile(rb"(?:%s) [\x21-\x7e]+ HTTP/\d\.\d\r?" % b"|".join(_METHODS))
_STARTS = tuple(method + b" " for method in _METHODS)
MAX_REQUEST_LINE = pywsgi.MAX_REQUEST_LINE

HTTP, CHAT, UNDECIDED = "http", "chat", "undecided"


def classify(head: bytes) -> str:
    """Decide from the first bytes of a connection whether it speaks HTTP.

    ``UNDECIDED`` means the bytes so far could still become an HTTP request
    line and the caller should read more (within its time limit).
    """
    newline = head.find(b"\n")
    if newline >= 0:
        return HTTP if is_request_line(head[:newline]) else CHAT
    if len(head) > MAX_REQUEST_LINE:
        return CHAT
    if head.startswith(_STARTS):
        return UNDECIDED if b"\r" not in head[:-1] else CHAT
    if any(start.startswith(head) for start in _STARTS):
        return UNDECIDED
    return CHAT


def is_request_line(line: bytes) -> bool:
    """True for an HTTP request line (without its LF): never chat, whenever it arrives."""
    return _REQUEST_LINE.fullmatch(line) is not None


class Health:
    """What the probes report; the application fills in the callables."""

    def __init__(self, alive: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]):
        self.alive = alive
        self.ready = ready


StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class Route:
    """Paths the HTTP front serves: each of ``paths`` exactly, or everything under them with ``prefix``.

    ``kind`` is the path class requests are counted under
    (``chat_http_requests_total{path}``).  ``internal`` routes are the
    operators' (metrics, probes, the API): with --metrics-port they leave the
    chat port, which then answers them 404.
    """

    paths: tuple[str, ...]
    app: WsgiApp
    kind: str
    # None: the app answers every method itself (the API, with its JSON 405s).
    methods: tuple[str, ...] | None = ("GET", "HEAD")
    internal: bool = True
    prefix: bool = False

    def matches(self, path: str) -> bool:
        return any(path.startswith(p) if self.prefix else path == p for p in self.paths)


class Routes:
    """The one place that decides what each HTTP listener serves; later features ``add`` a ``Route``."""

    def __init__(self, routes: Iterable[Route], requests: Mapping[str, Counter]) -> None:
        self.routes = list(routes)
        self.requests = requests

    def add(self, route: Route) -> None:
        self.routes.append(route)

    def app(self, *, internal: bool) -> WsgiApp:
        """The WSGI app of one listener: with ``internal`` False, the internal routes answer 404."""

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            route = next((r for r in self.routes if (internal or not r.internal) and r.matches(path)), None)
            self.requests["other" if route is None else route.kind].inc()
            if route is None:
                return _reply(start_response, "404 Not Found", b"not found\n")
            if route.methods is not None and environ.get("REQUEST_METHOD", "") not in route.methods:
                allow = [("Allow", ", ".join(route.methods))]
                return _reply(start_response, "405 Method Not Allowed", b"method not allowed\n", allow)
            return route.app(environ, start_response)

        return app


class Exposition:
    """prometheus_client's /metrics app, rendered at most once per ``max_age`` seconds per format, and shared.

    Every scrape collects from the hub (a pass over all members) on the event
    loop, so concurrent or rapid scrapes would cost the members their latency.
    A scrape is always answered with a rendering made after it arrived (two
    scrapes in a row see every change in between), but one that comes within
    ``max_age`` of the last rendering waits for the next, which everyone who
    waited shares.  The request is reduced to what chooses the format
    (OpenMetrics or text, gzip or not) first, so odd headers cannot multiply
    the renderings; query parameters (prometheus_client's ``name[]``
    filter) are ignored for the same reason.
    """

    def __init__(self, registry: CollectorRegistry, max_age: float = 0.1) -> None:
        self._app = make_wsgi_app(registry)
        self.max_age = max_age
        self._rendered: dict[tuple[bool, bool], tuple[float, str, list[tuple[str, str]], bytes]] = {}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        openmetrics = "application/openmetrics-text" in environ.get("HTTP_ACCEPT", "")
        key = (openmetrics, "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""))
        asked = time.monotonic()
        last = self._rendered.get(key)
        if last is not None and asked - last[0] < self.max_age:
            gevent.sleep(last[0] + self.max_age - asked)
            last = self._rendered.get(key)
        if last is None or last[0] < asked:
            last = self._rendered[key] = (time.monotonic(), *self._render(*key))
        _, status, headers, body = last
        start_response(status, [*headers, ("Connection", "close")])
        return [body]

    def _render(self, openmetrics: bool, gzip: bool) -> tuple[str, list[tuple[str, str]], bytes]:
        environ = {
            "REQUEST_METHOD": "GET",  # prometheus_client answers GET only; pywsgi drops the body for HEAD
            "PATH_INFO": "/metrics",
            "QUERY_STRING": "",
            "HTTP_ACCEPT": "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain",
            "HTTP_ACCEPT_ENCODING": "gzip" if gzip else "",
        }
        answer: list[Any] = []
        body = b"".join(self._app(environ, lambda status, headers, exc_info=None: answer.extend((status, headers))))
        return answer[0], list(answer[1]), body


def default_routes(
    registry: CollectorRegistry, health: Health, page: Page, requests: Mapping[str, Counter]
) -> Routes:
    """The chat page (public), /metrics (prometheus_client's exposition, shared per 100 ms), /healthz, /readyz."""

    def probe(check: Callable[[], tuple[bool, str]]) -> WsgiApp:
        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            ok, detail = check()
            status = "200 OK" if ok else "503 Service Unavailable"
            return _reply(start_response, status, (detail + "\n").encode())

        return app

    return Routes(
        [
            Route(page.paths, page, "page", internal=False),
            Route(("/metrics",), Exposition(registry), "metrics"),
            Route(("/healthz",), probe(health.alive), "health"),
            Route(("/readyz",), probe(health.ready), "health"),
        ],
        requests,
    )


def _reply(
    start_response: StartResponse, status: str, body: bytes, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(extra or []),
    ]
    start_response(status, headers)
    return [body]


class _Replay(io.RawIOBase):
    """A socket's byte stream with the already-sniffed bytes put back in front."""

    def __init__(self, head: bytes, sock: Any) -> None:
        self._head = head
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        return int(self._sock.recv_into(buffer))


class HttpFront:
    """Serves one sniffed connection with pywsgi, then lets the caller close it."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        # Never started: only its handler machinery is used for sniffed sockets.
        self._server = pywsgi.WSGIServer(
            ("127.0.0.1", 0), app, log=None, error_log=None, handler_class=QuietHandler
        )
        self._server.environ.update({"SERVER_NAME": "chat-svc", "SERVER_PORT": "0", LISTENER: CHAT_LISTENER})

    def serve(self, sock: Any, address: Any, head: bytes) -> None:
        wsgi_handler(self._server, sock, address, io.BufferedReader(_Replay(head, sock))).handle()


# Concurrent connections on --metrics-port: probes and a few scrapers need far
# fewer, and the pool bounds the descriptors they take (admission.FD_RESERVE).
METRICS_PORT_CONNECTIONS = 32


class MetricsServer(pywsgi.WSGIServer, PausingServer):
    """pywsgi with a time limit per connection (a client that never finishes its request cannot hold a place)."""

    handler_class = QuietHandler

    def __init__(self, host: str, port: int, app: WsgiApp, timeout: float) -> None:
        super().__init__((host, port), app, log=None, error_log=None, spawn=Pool(METRICS_PORT_CONNECTIONS))
        self.timeout = timeout

    def handle(self, sock: Any, address: Any) -> None:
        sock.settimeout(self.timeout)
        with gevent.Timeout(self.timeout * 2, False):
            super().handle(sock, address)


def serve_metrics_port(host: str, port: int, app: WsgiApp, timeout: float) -> MetricsServer:
    """The optional separate listener: pywsgi with the internal routes, at most 32 connections at once."""
    server = MetricsServer(host, port, app, timeout)
    server.start()
    return server
