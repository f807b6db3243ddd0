"""The chat page: static HTML, CSS and JavaScript shipped in the package, served at ``/``.

No build step, no CDN, no framework: three files under ``web/``, read once
at start.  The page talks to ``/ws`` on the chat port.  Served from the
chat port it connects back to where it came from (which also works through
a port mapping or a proxy); served from ``--metrics-port`` it is told the
chat port and whether it speaks TLS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.resources import files
from typing import Any

# Where the listener that served a request is recorded in its WSGI environ.
LISTENER = "chat_svc.listener"
CHAT_LISTENER = "chat"

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}

# The page runs only its own script and style, opens WebSockets, and cannot be framed.
_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
    ("Connection", "close"),
]

_PORT_SLOT = b'data-chat-port=""'


class Page:
    """The page's files, ready to serve; ``chat_port`` says where the chat port is bound."""

    def __init__(self, chat_port: Callable[[], int], tls: bool) -> None:
        web = files("chat_svc") / "web"
        self._files = {path: ((web / name).read_bytes(), kind) for path, (name, kind) in _ASSETS.items()}
        assert _PORT_SLOT in self._files["/"][0]
        self._chat_port = chat_port
        self._tls = tls

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._files)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        body, kind = self._files[path]
        if path == "/" and environ.get(LISTENER) != CHAT_LISTENER:
            where = f'data-chat-port="{self._chat_port()}" data-chat-tls="{int(self._tls)}"'
            body = body.replace(_PORT_SLOT, where.encode())
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))), *_HEADERS])
        return [body]
