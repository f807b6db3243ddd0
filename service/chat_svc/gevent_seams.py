"""The gevent internals chat-svc relies on, each behind one name.

gevent documents neither, so an upgrade may change them without notice;
tests/test_gevent_seams.py fails with a message naming the function if one
does.  Everything else uses gevent's public API.
"""

from __future__ import annotations

from typing import Any

import gevent
import structlog
from gevent import pywsgi

log = structlog.get_logger("chat_svc.http")


def raw_socket(sock: Any) -> Any:
    """The non-blocking standard-library socket under a gevent socket.

    gevent's socket keeps the real one, already set non-blocking, in
    ``_sock``.  Writing and reading it directly never switches greenlets:
    a TCP sink writes what the kernel takes now, and a parked session
    reads what is there now (``BlockingIOError`` when nothing is).  The
    wrapper's own ``send``/``recv`` would instead wait in the event loop.
    gevent's SSL socket is a subclass, so under TLS this is the descriptor
    below the TLS layer: a session ending shuts its input there, which
    ``SSLSocket.shutdown`` would do only after dropping the TLS state.
    """
    return sock._sock


def wsgi_handler(server: pywsgi.WSGIServer, sock: Any, address: Any, rfile: Any) -> pywsgi.WSGIHandler:
    """A pywsgi handler reading the request from ``rfile`` rather than from ``sock``.

    The chat port reads a connection's first bytes before it knows the
    connection is HTTP; ``rfile`` puts them back in front of the socket's
    stream.  ``WSGIHandler`` takes it as a keyword gevent calls unsupported.
    """
    handler: pywsgi.WSGIHandler = server.handler_class(sock, address, server, rfile=rfile)
    return handler


class QuietHandler(pywsgi.WSGIHandler):
    """pywsgi's handler, minus its tracebacks on stderr; our own time limits pass through.

    pywsgi prints a traceback for a socket that times out or is closed while
    it reads headers (its ``_handle_client_error`` hook, which gevent calls
    experimental) and for a failure while it writes the answer
    (``handle_error``).  Clients cause both, and under attack they would flood
    stdout with non-JSON text; here they end the connection silently.  A
    ``gevent.Timeout`` (the admission budget) is raised on to whoever set it,
    and any other error is logged as a structured ``http_failed`` event.
    """

    def _handle_client_error(self, ex: Exception) -> Any:
        if isinstance(ex, OSError):
            return None
        return super()._handle_client_error(ex)

    def handle_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        if isinstance(v, gevent.Timeout):
            raise v
        self.close_connection = True
        if not isinstance(v, OSError):
            log.error("http_failed", exc_info=(t, v, tb))
