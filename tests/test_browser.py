"""The chat page in a real headless Chromium (Debian's), driven by Playwright, against a real server.

Playwright launches the system browser (``executable_path``); nothing is
downloaded.  Under CI=true a missing Chromium or Playwright fails the test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from _backplane import cluster, joined
from _chat import ServerProcess
from _require import require_binary, require_module

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_binary("chromium")
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class ChatPage:
    """One browser tab on the chat page, used with the keyboard only."""

    def __init__(self, browser: Any, url: str, width: int = 360) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": 640})
        self.dialogs: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.goto(url)
        self.connected()

    def connected(self, timeout: float = 10) -> None:
        self.page.wait_for_selector("#state[data-state=connected]", timeout=timeout * 1000)

    def type(self, text: str) -> None:
        assert self.page.evaluate("document.activeElement.id") == "input"
        self.page.keyboard.type(text)
        self.page.keyboard.press("Enter")

    def lines(self) -> list[str]:
        return self.page.locator("#log li").all_text_contents()

    def wait_line(self, text: str, timeout: float = 5) -> None:
        self.page.wait_for_function(
            "text => [...document.querySelectorAll('#log li')].some(li => li.textContent === text)",
            arg=text,
            timeout=timeout * 1000,
        )

    def header(self) -> tuple[str, str]:
        return self.page.inner_text("#room"), self.page.inner_text("#count")


def test_two_pages_and_nc_chat_safely_rename_join_and_survive_a_restart(browser, chat_server):
    srv = chat_server()
    url = f"http://{srv.host}:{srv.port}/"
    one, two = ChatPage(browser, url), ChatPage(browser, url)
    tcp = srv.member("nc")
    one.type("/nick ann")
    tcp.expect_re(r"is now known as ann$")
    two.type("/nick ben")
    tcp.expect_re(r"is now known as ben$")
    assert one.header() == ("lobby", "3 members")

    one.type("hello from ann")
    two.wait_line("[ann] hello from ann")
    assert tcp.expect("[ann]") == "[ann] hello from ann"
    two.type("hello from ben")
    one.wait_line("[ben] hello from ben")
    assert tcp.expect("[ben]") == "[ben] hello from ben"
    tcp.send("hello from nc")
    one.wait_line("[nc] hello from nc")
    two.wait_line("[nc] hello from nc")

    # Markup arrives as text, from the server and in the page's own echo.
    tcp.send(XSS)
    one.type(f"ann says {XSS}")
    one.wait_line(f"[nc] {XSS}")
    one.wait_line(f"[ann] ann says {XSS}")
    two.wait_line(f"[ann] ann says {XSS}")
    for tab in (one, two):
        assert tab.page.locator("#log img").count() == 0
        assert tab.dialogs == []

    one.type("/join dev")
    one.wait_line("* you joined dev")
    two.wait_line("* ann left lobby")
    tcp.send("/join dev")
    tcp.expect("* you joined dev")
    one.page.wait_for_function("() => document.getElementById('count').textContent === '2 members'")
    assert one.header() == ("dev", "2 members")
    one.type("only in dev")
    assert tcp.expect("[ann]") == "[ann] only in dev"

    # The server goes away and comes back on the same port: the pages reconnect on their own,
    # with their nicks and rooms.
    port = srv.port
    srv.stop()
    one.page.wait_for_selector("#state[data-state=retrying]", timeout=5000)
    again = chat_server(port=port)
    one.connected(timeout=20)
    two.connected(timeout=20)
    # The page had seen ids in dev, but a single server's log died with it: the page says so.
    one.wait_line("* could not resume dev: lines may be missing (epoch changed)")
    one.page.wait_for_function("() => document.getElementById('room').textContent === 'dev'")
    nc = again.member("nc2", room="dev")
    one.wait_line("* nc2 joined dev")
    one.type("back after the restart")
    assert nc.expect("[ann]") == "[ann] back after the restart"

    # Usable at 360 px: nothing wider than the screen.
    assert one.page.evaluate("document.documentElement.scrollWidth") <= 360
    for tab in (one, two):
        assert not [line for line in tab.lines() if line.startswith("@")], "an id shown"


@pytest.mark.redis
def test_the_page_resumes_on_a_restarted_instance_and_shows_each_line_once(browser, chat_server, redis_server):
    """Two instances share Redis; the page is on a, a TCP member on b.  While a is stopped and
    started again on its port, b's member talks; the page comes back, resumes from the room's
    log in Redis, and shows what it missed, once, without ids."""
    a, b = cluster(chat_server, redis_server, 2)
    tab = ChatPage(browser, f"http://{a.host}:{a.port}/")
    tab.type("/nick ann")
    tab.type("/join dev")
    tab.wait_line("* you joined dev")
    tcp = joined(b, "bob", "dev")
    tab.wait_line("* bob joined dev")
    tcp.send("before the restart")
    tab.wait_line("[bob] before the restart")
    tab.type("ann was here")
    assert tcp.expect("[ann]") == "[ann] ann was here"

    port = a.port
    a.stop()
    tab.page.wait_for_selector("#state[data-state=retrying]", timeout=5000)
    missed = [f"said while you were away {n}" for n in range(5)]
    for text in missed:
        tcp.send(text)
    again = chat_server("--redis-url", redis_server.url, "--flood-rate", "0", port=port)
    tab.connected(timeout=30)
    tab.wait_line("* resumed 5 lines", timeout=10)
    tab.page.wait_for_function("() => document.getElementById('room').textContent === 'dev'")
    late = again.member("cat", "dev")
    tab.wait_line("* cat joined dev")
    late.send("hello from the instance that came back")
    tcp.send("and from b")
    tab.wait_line("[cat] hello from the instance that came back")
    tab.wait_line("[bob] and from b")

    lines = tab.lines()
    for text in ["[bob] before the restart", *(f"[bob] {text}" for text in missed), "[bob] and from b"]:
        assert lines.count(text) == 1, (text, lines)
    assert lines.count("[ann] ann was here") == 1, "the page's own line, shown as typed, is not replayed"
    assert lines.index("[bob] said while you were away 4") < lines.index("* resumed 5 lines")
    assert not [line for line in lines if line.startswith("@")], lines


def test_the_log_follows_new_lines_unless_scrolled_up(browser, chat_server):
    srv = chat_server("--flood-rate", "0")
    tab = ChatPage(browser, f"http://{srv.host}:{srv.port}/")
    tcp = srv.member("talker")
    tcp.send("".join(f"line {n}\n" for n in range(80)))
    tab.wait_line("[talker] line 79")
    at_bottom = (
        "() => { const l = document.getElementById('log'); return l.scrollHeight - l.scrollTop - l.clientHeight < 8; }"
    )
    assert tab.page.evaluate(at_bottom)
    tab.page.focus("#log")
    tab.page.keyboard.press("Home")
    tab.page.wait_for_function("() => document.getElementById('log').scrollTop === 0")
    tcp.send("while you were reading")
    tab.wait_line("[talker] while you were reading")
    assert tab.page.evaluate("document.getElementById('log').scrollTop") == 0
    assert tab.page.is_visible("#below")
    tab.page.focus("#below")
    tab.page.keyboard.press("Enter")
    assert tab.page.evaluate(at_bottom)


def test_the_page_asks_for_the_token_when_the_server_does(browser, chat_server):
    srv = chat_server("--token", "sesame", "--auth-timeout", "1")
    tab = ChatPage.__new__(ChatPage)
    tab.page = browser.new_page(viewport={"width": 360, "height": 640})
    tab.dialogs = []
    tab.page.goto(f"http://{srv.host}:{srv.port}/")
    tab.wait_line("! authentication required: send /auth TOKEN first")
    tab.page.wait_for_selector("#input[type=password]")
    assert tab.page.inner_text("#prompt") == "access token"
    tab.type("sesame")
    tab.connected()
    assert re.fullmatch(r"\* welcome to chat-svc, you are \S+ in lobby; type /help", tab.lines()[-1])
    tcp = srv.connect()
    tcp.send("/auth sesame\n/nick tcp")
    tcp.expect_re("now known as tcp$")
    tab.type("authenticated from the page")
    assert tcp.expect("[") .endswith("] authenticated from the page")


def test_the_page_from_the_metrics_port_talks_to_the_chat_port(browser, chat_server):
    srv: ServerProcess = chat_server("--metrics-port", "0")
    tab = ChatPage(browser, f"http://{srv.host}:{srv.metrics_port}/")
    tcp = srv.member("tcp")
    tab.type("from the metrics port's page")
    assert tcp.expect("[") .endswith("] from the metrics port's page")
