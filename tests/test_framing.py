"""The line framer and the command parser, as pure units, fuzzed with Hypothesis."""

from __future__ import annotations

from chat_svc import protocol
from chat_svc.framing import LineFramer
from chat_svc.text import clean
from hypothesis import given, settings
from hypothesis import strategies as st

LIMIT = 64


def frame(chunks: list[bytes], limit: int = LIMIT) -> tuple[list[bytes], bool]:
    framer = LineFramer(limit)
    lines: list[bytes] = []
    for chunk in chunks:
        lines.extend(framer.feed(chunk))
        assert framer.pending <= limit + 1
    return lines, framer.overflowed


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points})
    pieces, last = [], 0
    for bound in bounds:
        pieces.append(data[last:bound])
        last = bound
    pieces.append(data[last:])
    return pieces


line_bytes = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"a", b"\n", b"\r", b"\r\n", b"\xff", b"\x00", b"x" * 30]), max_size=40
).map(b"".join)


@settings(max_examples=400)
@given(data=line_bytes, points=st.lists(st.integers(min_value=0), max_size=20))
def test_any_chunking_yields_the_same_lines_as_one_piece(data: bytes, points: list[int]) -> None:
    assert frame(cut(data, points)) == frame([data])


@given(data=line_bytes)
def test_lines_never_hold_newlines_or_exceed_the_limit(data: bytes) -> None:
    lines, _ = frame([data])
    assert all(b"\n" not in line and len(line) <= LIMIT for line in lines)
    assert len(lines) <= data.count(b"\n")


def test_crlf_and_lf_both_end_lines() -> None:
    assert frame([b"one\r\ntwo\nthree"]) == ([b"one", b"two"], False)


def test_partial_line_over_the_limit_overflows_without_a_newline() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"ok\n" + b"x" * 11) == [b"ok"]
    assert framer.overflowed
    assert framer.pending == 0
    assert framer.feed(b"more\n") == []


def test_line_of_exactly_the_limit_passes() -> None:
    assert frame([b"x" * 10 + b"\r\n"], limit=10) == ([b"x" * 10], False)
    assert frame([b"x" * 11 + b"\n"], limit=10) == ([], True)


@settings(max_examples=400)
@given(raw=st.binary(max_size=300))
def test_any_bytes_parse_without_raising_and_show_no_controls(raw: bytes) -> None:
    text = clean(raw)
    assert not any((ord(ch) < 32 and ch != "\t") or 0x7F <= ord(ch) < 0xA0 for ch in text)
    parsed = protocol.parse(text)
    assert parsed is None or isinstance(parsed, (str, protocol.Command))


def test_parse_classifies_lines() -> None:
    assert protocol.parse("   ") is None
    assert protocol.parse("hello") == "hello"
    assert protocol.parse("/NICK  bob ") == protocol.Command("nick", "bob")
    assert protocol.parse("/msg bob hi there") == protocol.Command("msg", "bob hi there")
    assert protocol.parse("//not a command") == "/not a command"


def test_nick_and_room_validation() -> None:
    assert protocol.valid_nick("a") and protocol.valid_nick("A_b-c.9" * 4 + "1234")
    assert not protocol.valid_nick("x" * 33) and not protocol.valid_nick("a b") and not protocol.valid_nick("")
    assert protocol.room_name("#Dev") == protocol.room_name("dev") == protocol.room_name("DEV") == "dev"
    assert protocol.room_name("lobby") == "lobby"
    assert protocol.room_name("##dev") is None and protocol.room_name("a/b") is None
    assert protocol.room_name("#") is None and protocol.room_name("x" * 33) is None


@settings(max_examples=400)
@given(raw=st.binary(max_size=LIMIT) | st.text(max_size=LIMIT // 4).map(str.encode))
def test_cleaned_text_never_grows_past_the_line_limit(raw: bytes) -> None:
    """Each invalid byte decodes to three bytes of U+FFFD: the text is cut back to the limit."""
    if len(raw) <= LIMIT:
        assert len(clean(raw, LIMIT).encode()) <= LIMIT


def test_invalid_utf8_is_cut_to_the_limit_at_a_character_boundary() -> None:
    assert clean(b"\xff" * 8192, 8192) == "\ufffd" * 2730
    assert clean(b"ok \xff" * 4, 10) == "ok \ufffdok "
    assert clean("caf\u00e9".encode(), 4) == "caf\u00e9"  # valid text is never cut


def test_invisible_reordering_characters_are_stripped_and_line_separators_become_spaces() -> None:
    hidden = "a\u202eb\u2066c\u2069d\u200be\u2060f\ufeffg"
    assert clean(hidden.encode()) == "abcdefg"
    assert clean("one\u2028two\u2029three".encode()) == "one two three"
    # ZWJ (emoji sequences), ZWNJ (Persian, Indic scripts) and direction marks stay.
    kept = "\U0001f469\u200d\U0001f4bb \u0645\u200c\u06cc \u200eA\u200f"
    assert clean(kept.encode()) == kept
