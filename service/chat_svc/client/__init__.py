"""``chat-client``: the terminal client for chat-svc.

Usage: ``chat-client [--reconnect] [--max-line-bytes N] [--tls [--insecure | --ca-file PEM]]
[HOST] [PORT]`` (defaults: ``localhost 9009``).

It behaves like the seed's ``chat_client.py`` (lines typed are sent, lines received are
printed) but fixes what made the seed unpleasant to use:

* Incoming lines never garble the line being typed.  At a terminal the input line is edited
  with GNU readline, and readline itself clears and redraws its prompt and line around every
  incoming line, with the cursor where the user left it.  The prompt shows who and where the
  user is, ``[alice@lobby] `` (``[Me] `` until the server has said).
* A line longer than the server accepts is refused locally with a message, instead of getting
  the user disconnected.
* Ctrl-C and end of input exit cleanly (status 0, no traceback).  At end of input the client
  sends ``/quit`` and keeps printing what the server sends until it closes the connection
  (bounded), so a script piped into it sees every reply.
* Without a terminal on stdin (a pipe, a file) there is no prompt and nothing but received chat
  lines goes to stdout; client messages go to stderr.
* ``--reconnect`` survives server restarts: capped, jittered exponential backoff, then the last
  ``/auth`` and the nick the server had confirmed are sent again, and the room is resumed with
  message ids (``/ids``, ``/resume``): what was said meanwhile is shown once, or the user is
  told that lines may be missing.  A nick someone took meanwhile is asked for again every few
  seconds, and the user is told.  Ids are never shown.
* Received text has control characters (except tab) stripped before it is printed, so a peer
  can never drive the user's terminal with escape sequences, even if a server forgot to.

Exit status: 0 after Ctrl-C, end of input or ``/quit``; 1 when the server cannot be reached
(``Unable to connect``) or goes away without ``--reconnect`` (``Disconnected from chat
server``).

The client does not use gevent: it must not monkey-patch the user's process, and a blocking
``readline`` call cannot be made cooperative.  The main thread owns the keyboard and the screen,
one network thread owns the socket.  The modules, in the order data flows:

* :mod:`~chat_svc.client.connection`: the network thread (socket, TLS, reconnects, send queue);
* :mod:`~chat_svc.client.session`: nick and room as the server states them, and what to send
  after a reconnect;
* :mod:`~chat_svc.client.ids`: message ids stripped, the last one per room, the replay of a
  ``/resume``;
* :mod:`~chat_svc.client.terminal` and :mod:`~chat_svc.client.display`: output, and readline's
  redraw around it;
* :mod:`~chat_svc.client.wakeup`: signals that reach the main thread inside readline;
* :mod:`~chat_svc.client.cli`: the command line and the input loops.
"""

from chat_svc.client.cli import main, run

__all__ = ["main", "run"]
