"""HTTP on the chat port: telling HTTP from chat, and serving it with pywsgi.

Only port 9009 is published in a container, so Prometheus, the probes and
browsers (the chat page) must reach us on the chat port.  A connection is HTTP when its first line is
an HTTP request line; everything after that line (headers, keep-alive, HEAD,
size limits) is parsed by gevent's pywsgi, not by hand.  The same WSGI
application serves the optional ``--metrics-port`` listener.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gevent import pywsgi
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from .gevent_seams import wsgi_handler
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
        return HTTP if _REQUEST_LINE.fullmatch(head[:newline]) else CHAT
    if len(head) > MAX_REQUEST_LINE:
        return CHAT
    if head.startswith(_STARTS):
        return UNDECIDED if b"\r" not in head[:-1] else CHAT
    if any(start.startswith(head) for start in _STARTS):
        return UNDECIDED
    return CHAT


class Health:
    """What the probes report; the application fills in the callables."""

    def __init__(self, alive: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]):
        self.alive = alive
        self.ready = ready


StartResponse = Callable[..., Any]


def make_app(
    registry: CollectorRegistry,
    health: Health,
    page: Page,
    requests: Mapping[str, Counter],
    api: Callable[..., Iterable[bytes]] | None = None,
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """One WSGI app for the chat page, /metrics (prometheus_client's own), /healthz, /readyz and the API.

    ``api``, when given, serves everything under /api/ (it answers its own
    404s and 405s, in JSON).  ``requests`` counts every request by path class
    (``metrics.PATH_CLASSES``).
    """
    metrics_app = make_wsgi_app(registry)

    def path_class(path: str) -> str:
        if path == "/metrics":
            return "metrics"
        if path in ("/healthz", "/readyz"):
            return "health"
        if api is not None and path.startswith("/api/"):
            return "api"
        return "page" if page.serves(path) else "other"

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        kind = path_class(path)
        requests[kind].inc()
        if kind == "api":
            assert api is not None
            return api(environ, start_response)
        if kind == "other":
            return _reply(start_response, "404 Not Found", b"not found\n")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"method not allowed\n", [("Allow", "GET, HEAD")])
        if kind == "page":
            return page(environ, start_response)
        if path == "/metrics":
            def start_closing(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                return start_response(status, [*headers, ("Connection", "close")], exc_info)

            # prometheus_client's app answers GET only; pywsgi drops the body for HEAD.
            return metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_closing)
        ok, detail = health.alive() if path == "/healthz" else health.ready()
        status = "200 OK" if ok else "503 Service Unavailable"
        return _reply(start_response, status, (detail + "\n").encode())

    return app


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

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        # Never started: only its handler machinery is used for sniffed sockets.
        self._server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
        self._server.environ.update({"SERVER_NAME": "chat-svc", "SERVER_PORT": "0", LISTENER: CHAT_LISTENER})

    def serve(self, sock: Any, address: Any, head: bytes) -> None:
        wsgi_handler(self._server, sock, address, io.BufferedReader(_Replay(head, sock))).handle()


def serve_metrics_port(host: str, port: int, app: Callable[..., Iterable[bytes]]) -> pywsgi.WSGIServer:
    """The optional separate listener: plain pywsgi with the same application."""
    server = pywsgi.WSGIServer((host, port), app, log=None, error_log=None)
    server.start()
    return server
