"""Turning untrusted bytes into text that is safe to show other people."""

from __future__ import annotations

# C0 controls except TAB, DEL, and the C1 controls: these are what terminal
# escape sequences (colours, cursor moves, title changes) are made of.
_CONTROL: dict[int, str | None] = {
    code: None for code in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0))
}
# Invisible characters that change how the *rest* of a line looks: bidi
# embeddings, overrides and isolates (they can show a line's tail reversed or
# moved, the "Trojan Source" trick) and zero-width spaces, joiners-that-are-not
# (U+2060, U+FEFF) and invisible operators (they make look-alike text).  ZWJ and
# ZWNJ (U+200C, U+200D) stay: emoji sequences and several scripts need them, and
# so do the left-to-right and right-to-left marks (U+200E, U+200F), which only
# mark a direction and cannot reorder what follows.
_INVISIBLE = (0x200B, *range(0x202A, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF)
_CONTROL.update((code, None) for code in _INVISIBLE)
# Line and paragraph separators end a line in some renderers, so a member could
# draw a second, forged line after its own: they become a space.
_CONTROL.update({0x2028: " ", 0x2029: " "})
_REPLACEMENT = "\ufffd"


def clean(raw: bytes, limit: int | None = None) -> str:
    """Decode UTF-8 leniently and strip control and invisible formatting characters.

    Invalid UTF-8 becomes U+FFFD instead of an exception, so no input can crash
    a session, and nobody can inject terminal escapes into other people's screens.
    Each invalid byte becomes three bytes of U+FFFD, so with ``limit`` the text is
    cut to at most ``limit`` bytes of UTF-8 (at a character boundary): a line never
    grows on its way through the server, whatever it contained.
    """
    text = raw.decode("utf-8", "replace").translate(_CONTROL)
    if limit is not None and _REPLACEMENT in text:
        encoded = text.encode()
        if len(encoded) > limit:
            text = encoded[:limit].decode("utf-8", "ignore")
    return text
