"""Turning untrusted bytes into text that is safe to show other people."""

from __future__ import annotations

# C0 controls except TAB, DEL, and the C1 controls: these are what terminal
# escape sequences (colours, cursor moves, title changes) are made of.
_CONTROL = {code: None for code in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0))}


def clean(raw: bytes) -> str:
    """Decode UTF-8 leniently and strip control characters other than tab.

    Invalid UTF-8 becomes U+FFFD instead of an exception, so no input can crash
    a session, and nobody can inject terminal escapes into other people's screens.
    """
    return raw.decode("utf-8", "replace").translate(_CONTROL)
