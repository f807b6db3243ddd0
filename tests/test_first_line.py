"""Issue 18 points 10 and 11: what a connection's first line may be.

An HTTP request line is never chat, whenever it arrives: one that misses the
sniff window (--http-sniff-ms) is refused and closed, and neither the line nor
its headers (an ``Authorization`` among them) reach the room or its history.
Blank lines before ``/auth`` are skipped rather than taken as a wrong token.
"""

from __future__ import annotations

import time

from _chat import scrape


def test_a_late_http_request_is_refused_and_never_relayed(chat_server):
    srv = chat_server()
    alice = srv.member("alice")
    late = srv.connect()
    late.expect("* welcome")  # past the sniff window: a member
    alice.expect("* 127.0.0.1:")
    late.send(b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nHost: x\r\n\r\n")
    assert late.expect("!") == "! HTTP request refused: send it as soon as you connect"
    assert late.closed()
    assert all("s3cret" not in line and "GET" not in line for line in alice.lines_for(0.5))
    joiner = srv.member("joiner")
    assert all("s3cret" not in line and "GET" not in line for line in joiner.lines_for(0.5))
    assert scrape(srv.port)["chat_disconnects_total{reason=http_request,transport=tcp}"] == 1
    assert "s3cret" not in srv.log_text()


def test_only_the_first_line_is_checked_and_a_chat_line_about_get_is_chat(chat_server):
    srv = chat_server()
    alice, bob = srv.member("alice"), srv.member("bob")
    alice.send("GET / HTTP/1.1")  # not a first line any more: just text
    assert bob.expect("[alice]") == "[alice] GET / HTTP/1.1"


def test_blank_lines_before_auth_are_skipped(chat_server):
    srv = chat_server("--token", "sesame")
    member = srv.connect()
    member.send(b"\r\n\n  \r\n")
    time.sleep(0.3)
    member.send(b"\n/auth sesame\n/nick bo")
    member.expect("* welcome")
    member.expect_re("now known as bo$")
