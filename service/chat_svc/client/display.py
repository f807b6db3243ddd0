"""GNU readline's own calls for printing above the line being edited.

Python's ``readline`` module can report the line buffer but not the cursor position, the
number of screen rows the line occupies, or whether the prompt is on screen at all.  GNU
readline itself knows all three and offers the calls an application uses to print
asynchronously in callback mode (which is how CPython drives it): ``rl_clear_visible_line``
clears every row of the prompt and line, ``rl_on_new_line`` + ``rl_redisplay`` draw them again
with the cursor where the user left it.  They are reached through ``ctypes`` because the
``readline`` module does not wrap them; ``load`` returns None where they are missing (libedit).

Every call here must be made on the main thread while readline waits for a key (see
:class:`~chat_svc.client.terminal.ReadlineTerminal`): readline is not thread-safe, and only then
is it not drawing anything itself.
"""

from __future__ import annotations

import ctypes
from types import ModuleType

#: ``RL_STATE_CALLBACK`` from readline.h: set by ``rl_callback_handler_install`` (the prompt has
#: just been drawn) and cleared by ``rl_callback_handler_remove`` (CPython calls it as soon as a
#: line is accepted), so it is true exactly while a prompt and line are on screen.
_RL_STATE_CALLBACK = 0x0080000


class ReadlineDisplay:
    """The few readline display functions the client needs, bound once."""

    def __init__(self, lib: ctypes.CDLL, libc: ctypes.CDLL) -> None:
        self._state = ctypes.c_ulong.in_dll(lib, "rl_readline_state")
        self._prompt = ctypes.c_char_p.in_dll(lib, "rl_prompt")
        self._clear_visible_line = lib.rl_clear_visible_line
        self._on_new_line = lib.rl_on_new_line
        self._redisplay = lib.rl_redisplay
        self._set_prompt = lib.rl_set_prompt
        self._set_prompt.argtypes = [ctypes.c_char_p]
        self._replace_line = lib.rl_replace_line
        self._replace_line.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._fflush = libc.fflush
        self._fflush.argtypes = [ctypes.c_void_p]

    @classmethod
    def load(cls, readline: ModuleType) -> ReadlineDisplay | None:
        """Bind to the readline library that ``readline`` (the Python module) is linked with."""
        if "libedit" in (readline.__doc__ or "") or not getattr(readline, "__file__", None):
            return None
        try:
            # dlsym on the extension module's handle also searches the libraries it links.
            return cls(ctypes.CDLL(readline.__file__), ctypes.CDLL(None))
        except (OSError, AttributeError, ValueError):
            return None

    def line_shown(self) -> bool:
        """Whether readline has a prompt and input line on screen and is waiting for a key."""
        return bool(self._state.value & _RL_STATE_CALLBACK)

    def clear(self) -> None:
        """Erase every screen row of the prompt and input line; the cursor ends in column 0."""
        self._clear_visible_line()
        self._fflush(None)  # readline writes through C stdio; Python's writes come next

    def redraw(self, prompt: str) -> None:
        """Draw ``prompt`` and the input line on a fresh line, cursor back at the edit point."""
        wanted = prompt.encode("utf-8", "replace")
        if self._prompt.value != wanted:  # nick or room changed (left alone, a search prompt stays)
            self._set_prompt(wanted)
        self._on_new_line()
        self._redisplay()

    def leave(self) -> None:
        """Keep the prompt and line off screen for good (the session is over).

        readline redraws once more as it gives up the line, so it is given nothing to draw.
        """
        self._set_prompt(b"")
        self._replace_line(b"", 0)
        self._on_new_line()
