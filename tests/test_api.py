"""The operator HTTP API (issue 17) on one real server: every endpoint, its success and each error, exactly.

Multi-instance behaviour (idempotency, kicks and bans across instances) is
in test_api_cluster.py; per-user tokens in test_identity.py.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from _api import KEY, call, events, from_address, keys_file
from _chat import ServerProcess, scrape, wait_for
from chat_svc.api import ROUTES, key_id
from chat_svc.openapi import DOCUMENT

Start = Callable[..., ServerProcess]


@pytest.fixture
def api(chat_server: Start, tmp_path: Path) -> ServerProcess:
    return chat_server("--api-keys-file", str(keys_file(tmp_path)), "--flood-rate", "0")


def raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ----------------------------------------------------------------------------- the frame: keys, JSON, errors


def test_without_a_keys_file_every_api_path_is_404(chat_server: Start) -> None:
    srv = chat_server()
    for path in ["/api/v1/rooms", "/api/v1/openapi.json", "/api/v1/bans", "/api/x"]:
        assert raw_get(srv.port, path, {"Authorization": f"Bearer {KEY}"})[0] == 404


def test_every_request_needs_a_known_bearer_key(api: ServerProcess) -> None:
    for headers in [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer # operators"},
        {"Authorization": "Bearer "},
    ]:
        status, body, answer_headers = call(api.port, "GET", "/api/v1/rooms", key=None, headers=headers)
        assert (status, body) == (401, {"error": "missing or unknown API key"})
        assert answer_headers["WWW-Authenticate"] == "Bearer"
    # Unknown paths and methods are not revealed without a key either.
    assert call(api.port, "GET", "/api/v2/nothing", key=None)[:2] == (401, {"error": "missing or unknown API key"})
    assert call(api.port, "GET", "/api/v1/rooms", key=f"  {KEY}  ".strip())[0] == 200
    assert call(api.port, "GET", "/api/v1/rooms", headers={"Authorization": f"bearer {KEY}"})[0] == 200


def test_unknown_paths_are_404_and_other_methods_405_with_allow(api: ServerProcess) -> None:
    assert call(api.port, "GET", "/api/v1/nothing")[:2] == (404, {"error": "not found"})
    assert call(api.port, "GET", "/api/v1/rooms/lobby/messages/extra")[:2] == (404, {"error": "not found"})
    status, body, headers = call(api.port, "PUT", "/api/v1/bans")
    assert (status, body, headers["Allow"]) == (405, {"error": "method not allowed"}, "POST, GET")
    status, body, headers = call(api.port, "GET", "/api/v1/rooms/lobby/messages")
    assert (status, body, headers["Allow"]) == (405, {"error": "method not allowed"}, "POST")
    assert call(api.port, "DELETE", "/api/v1/rooms")[2]["Allow"] == "GET"


def test_bodies_must_be_json_objects_of_known_fields_within_64_kib(api: ServerProcess) -> None:
    api.member("alice")
    path = "/api/v1/rooms/lobby/messages"
    cases = [
        (b"{not json", {"error": "body is not valid JSON"}),
        (b"[1, 2]", {"error": "body must be a JSON object"}),
        (b'"text"', {"error": "body must be a JSON object"}),
        (b"\xff\xfe\x00garbage", {"error": "body is not valid JSON"}),
        (b"[" * 100_00 + b"]" * 100_00, {"error": "body is not valid JSON"}),
        (b'{"text": "hi", "txt": "typo"}', {"error": "unknown field: txt"}),
        (b'{"text": 5}', {"error": "text must be a string"}),
        (b"{}", {"error": "text is required"}),
        (b"", {"error": "text is required"}),
    ]
    for raw, error in cases:
        assert call(api.port, "POST", path, raw=raw)[:2] == (400, error), raw[:40]
    big = json.dumps({"text": "x" * (64 * 1024)}).encode()
    assert call(api.port, "POST", path, raw=big)[:2] == (413, {"error": "body over 65536 bytes"})
    # Without Content-Length (chunked), the limit holds just the same; broken chunks are the client's error.
    assert chunked(api.port, path, [big[:40000], big[40000:]], encode=True) == (413, {"error": "body over 65536 bytes"})
    assert chunked(api.port, path, [b'{"text": "hi"}'], encode=False) == (400, {"error": "body could not be read"})
    status, answer = chunked(api.port, path, [b'{"text": ', b'"hi"}'], encode=True)
    assert status == 200 and isinstance(answer, dict) and re.fullmatch(r"[A-Za-z0-9]{1,16}:\d+", answer["id"])


def chunked(port: int, path: str, parts: list[bytes], encode: bool) -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            path,
            body=iter(parts),
            encode_chunked=encode,
            headers={"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# ----------------------------------------------------------------------------- publish


def test_publish_reaches_every_member_of_the_room_and_its_history(api: ServerProcess) -> None:
    alice, bob = api.member("alice", "dev"), api.member("bob", "dev")
    carol = api.member("carol")
    bob.send("/ids")
    bob.expect("* ids on")
    dev = "/api/v1/rooms/dev/messages"
    status, answer, _ = call(api.port, "POST", dev, {"text": "deploy done", "from": "deploy-bot"})
    assert status == 200 and set(answer) == {"id"}
    assert alice.expect("[") == "[deploy-bot] deploy done"
    # The answer is the id members with /ids see the line under.
    assert bob.expect("@") == f"@{answer['id']} [deploy-bot] deploy done"
    second = call(api.port, "POST", dev, {"text": "  tab\there\x1b[31m  "})[1]
    assert alice.expect("[") == "[api] tab\there[31m"
    assert bob.expect("@") == f"@{second['id']} [api] tab\there[31m"
    epoch, offset = answer["id"].split(":")
    assert second["id"] == f"{epoch}:{int(offset) + 1}"
    assert carol.lines_for(0.3) == []
    later = api.connect()
    later.expect("* welcome")
    later.send("/join dev")
    assert later.expect("[history]") == "[history] [deploy-bot] deploy done"
    # A room addressed with its leading # (URL-encoded) is the room without it, as with /join.
    eve = api.member("eve", "ops")
    assert call(api.port, "POST", "/api/v1/rooms/%23ops/messages", {"text": "hi"})[0] == 200
    assert eve.expect("[") == "[api] hi"


def test_publish_refuses_bad_rooms_senders_and_texts(api: ServerProcess, chat_server: Start) -> None:
    api.member("alice")
    lobby = "/api/v1/rooms/lobby/messages"
    nick_rule = "use 1-32 letters, digits, _ - ."
    cases = [
        (
            f"/api/v1/rooms/{urllib.parse.quote('bad room')}/messages",
            {"text": "x"},
            f"invalid room name: {nick_rule} (optional leading #)",
        ),
        (
            "/api/v1/rooms/" + "r" * 33 + "/messages",
            {"text": "x"},
            f"invalid room name: {nick_rule} (optional leading #)",
        ),
        (lobby, {"text": "x", "from": "deploy bot"}, f"invalid from: {nick_rule}"),
        (lobby, {"text": "x", "from": ""}, f"invalid from: {nick_rule}"),
        (lobby, {"text": "x", "from": 7}, "from must be a string"),
        (lobby, {"text": "   "}, "text is empty"),
        (lobby, {"text": "\x00\x01"}, "text is empty"),
        (lobby, {"text": "x" * 8193}, "text is longer than 8192 bytes"),
    ]
    for path, body, error in cases:
        assert call(api.port, "POST", path, body)[:2] == (400, {"error": error}), body
    assert call(api.port, "POST", "/api/v1/rooms/empty/messages", {"text": "x"})[:2] == (404, {"error": "no such room"})
    assert call(api.port, "POST", lobby, {"text": "x" * 8192})[0] == 200
    # A line never splits into two: newlines are controls, stripped like any other.
    bob = api.member("bob")
    assert call(api.port, "POST", lobby, {"text": "one\ntwo\r\n* server shutting down"})[0] == 200
    assert bob.expect("[api]") == "[api] onetwo* server shutting down"


def test_an_idempotency_key_delivers_once_and_answers_the_same(api: ServerProcess) -> None:
    alice = api.member("alice")
    path = "/api/v1/rooms/lobby/messages"
    first = call(api.port, "POST", path, {"text": "once"}, headers={"Idempotency-Key": "deploy-42"})
    second = call(api.port, "POST", path, {"text": "once"}, headers={"Idempotency-Key": "deploy-42"})
    assert first[0] == second[0] == 200
    assert first[1] == second[1] == {"id": first[1]["id"]}  # the replay answers the first line's id
    other = call(api.port, "POST", path, {"text": "twice"}, headers={"Idempotency-Key": "deploy-43"})
    assert other[0] == 200 and other[1]["id"] != first[1]["id"]
    assert [line for line in alice.lines_for(0.5) if line.startswith("[")] == ["[api] once", "[api] twice"]
    assert scrape(api.port)["chat_api_idempotent_replays_total"] == 1
    # A request that delivered nothing does not use up its key.
    assert call(api.port, "POST", "/api/v1/rooms/dev/messages", {"text": "x"}, headers={"Idempotency-Key": "k"})[
        :2
    ] == (404, {"error": "no such room"})
    api.member("bob", "dev")
    assert (
        call(api.port, "POST", "/api/v1/rooms/dev/messages", {"text": "x"}, headers={"Idempotency-Key": "k"})[0] == 200
    )
    for bad in ["with space", "x" * 256, "tab\tkey"]:
        assert call(api.port, "POST", path, {"text": "x"}, headers={"Idempotency-Key": bad})[:2] == (
            400,
            {"error": "invalid Idempotency-Key: 1-255 printable ASCII characters"},
        )


# ----------------------------------------------------------------------------- rooms and members


def test_rooms_and_members(api: ServerProcess) -> None:
    assert call(api.port, "GET", "/api/v1/rooms")[:2] == (200, [])
    api.member("carol", "ops")
    api.member("bob")
    api.member("alice")
    assert call(api.port, "GET", "/api/v1/rooms")[:2] == (
        200,
        [{"name": "lobby", "members": 2}, {"name": "ops", "members": 1}],
    )
    assert call(api.port, "GET", "/api/v1/rooms/lobby/members")[:2] == (200, ["alice", "bob"])
    assert call(api.port, "GET", "/api/v1/rooms/%23ops/members")[:2] == (200, ["carol"])
    assert call(api.port, "GET", "/api/v1/rooms/dev/members")[:2] == (404, {"error": "no such room"})
    assert call(api.port, "GET", "/api/v1/rooms/a%20b/members")[:2] == (
        400,
        {"error": "invalid room name: use 1-32 letters, digits, _ - . (optional leading #)"},
    )


# ----------------------------------------------------------------------------- kick


def test_kick_tells_the_member_why_closes_it_and_counts_it(api: ServerProcess) -> None:
    alice, bob = api.member("alice"), api.member("bob")
    assert call(api.port, "POST", "/api/v1/members/alice/kick", {"reason": "spamming links"})[:2] == (200, {})
    assert alice.expect("!") == "! kicked: spamming links"
    assert alice.closed()
    assert bob.expect("* alice left") == "* alice left lobby"
    assert call(api.port, "POST", "/api/v1/members/bob/kick")[:2] == (200, {})
    assert bob.expect("!") == "! kicked: no reason given"
    assert bob.closed()
    wait_for(
        lambda: scrape(api.port).get("chat_disconnects_total{reason=kicked,transport=tcp}") == 2, 5, "two kicks counted"
    )
    assert call(api.port, "POST", "/api/v1/members/alice/kick", {"reason": "again"})[:2] == (
        404,
        {"error": "no such member"},
    )
    assert call(api.port, "POST", "/api/v1/members/a%20b/kick")[:2] == (
        400,
        {"error": "invalid nick: use 1-32 letters, digits, _ - ."},
    )
    assert call(api.port, "POST", "/api/v1/members/x/kick", {"reason": "r" * 201})[:2] == (
        400,
        {"error": "reason is longer than 200 characters"},
    )
    assert call(api.port, "POST", "/api/v1/members/x/kick", {"why": "r"})[:2] == (400, {"error": "unknown field: why"})
    kicked = events(api, "member_kicked")
    assert [(e["nick"], e["reason"]) for e in kicked] == [("alice", "spamming links"), ("bob", "no reason given")]


def test_a_kicked_or_banned_websocket_member_gets_the_line_then_a_policy_close(api: ServerProcess) -> None:
    from _ws import WsClient

    browser = WsClient(api.host, api.port)
    browser.join("carol")
    assert call(api.port, "POST", "/api/v1/members/carol/kick", {"reason": "spam"})[:2] == (200, {})
    assert browser.expect("!") == "! kicked: spam"
    assert browser.wait_closed() == (1008, "kicked")
    again = WsClient(api.host, api.port)
    again.join("carol")
    assert call(api.port, "POST", "/api/v1/bans", {"nick": "carol", "ttl_s": 60, "reason": "spam"})[0] == 200
    assert again.expect("!") == "! banned: spam"
    assert again.wait_closed() == (1008, "banned")
    wait_for(
        lambda: scrape(api.port).get("chat_disconnects_total{reason=kicked,transport=ws}") == 1, 5, "counted as ws"
    )


# ----------------------------------------------------------------------------- bans


def test_a_nick_ban_kicks_the_member_and_holds_at_nick_until_lifted(api: ServerProcess) -> None:
    mallory, bob = api.member("mallory"), api.member("bob")
    status, body, _ = call(api.port, "POST", "/api/v1/bans", {"nick": "mallory", "ttl_s": 600, "reason": "spam"})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{16}", body["id"])
    ban_id = body["id"]
    assert mallory.expect("!") == "! banned: spam"
    assert mallory.closed()
    wait_for(lambda: scrape(api.port).get("chat_disconnects_total{reason=banned,transport=tcp}") == 1, 5, "ban counted")
    # Back again: the nick stays banned at /nick; the connection itself is fine.
    again = api.member()
    again.send("/nick mallory")
    assert again.expect("!") == "! banned: spam"
    again.send("/nick bob")
    assert again.expect("!") == "! nick bob is taken"
    status, listed, _ = call(api.port, "GET", "/api/v1/bans")
    assert status == 200 and len(listed) == 1
    assert listed[0]["id"] == ban_id and listed[0]["nick"] == "mallory" and listed[0]["ip"] is None
    assert listed[0]["reason"] == "spam" and 595 <= listed[0]["ttl_s"] <= 600
    assert scrape(api.port)["chat_bans"] == 1
    assert call(api.port, "DELETE", f"/api/v1/bans/{ban_id}")[:2] == (200, {})
    assert call(api.port, "DELETE", f"/api/v1/bans/{ban_id}")[:2] == (404, {"error": "no such ban"})
    assert call(api.port, "DELETE", "/api/v1/bans/not-an-id")[:2] == (404, {"error": "no such ban"})
    assert call(api.port, "GET", "/api/v1/bans")[:2] == (200, [])
    again.send("/nick mallory")
    again.expect_re("is now known as mallory$")
    assert bob.expect_re("is now known as mallory$")


def test_an_ip_ban_kicks_every_member_from_it_and_refuses_it_at_connect_until_the_ttl_ends(
    api: ServerProcess,
) -> None:
    here = api.member("here")
    there = from_address(api, "127.0.0.2")
    there.expect("* welcome")
    also = from_address(api, "127.0.0.2")
    also.expect("* welcome")
    status, body, _ = call(api.port, "POST", "/api/v1/bans", {"ip": "127.0.0.2", "ttl_s": 2, "reason": "abuse"})
    assert status == 200
    for member in (there, also):
        assert member.expect("!") == "! banned: abuse"
        assert member.closed()
    back = from_address(api, "127.0.0.2")
    assert back.expect("!") == "! banned: abuse"
    assert back.closed()
    here.send("/who")
    assert here.expect("* in lobby") == "* in lobby (1): here"
    wait_for(lambda: call(api.port, "GET", "/api/v1/bans")[1] == [], 5, "the ban ends after its ttl")
    after = from_address(api, "127.0.0.2")
    after.expect("* welcome")
    # A network bans every address in it; the ban list shows it in CIDR form.
    status, body, _ = call(api.port, "POST", "/api/v1/bans", {"ip": "127.0.0.0/30", "ttl_s": 60})
    assert after.expect("!") == "! banned: no reason given"
    assert call(api.port, "GET", "/api/v1/bans")[1][0]["ip"] == "127.0.0.0/30"
    assert here.expect("!") == "! banned: no reason given"
    assert call(api.port, "DELETE", f"/api/v1/bans/{body['id']}")[:2] == (200, {})


def test_ban_requests_are_checked(api: ServerProcess) -> None:
    bans = "/api/v1/bans"
    ttl_rule = "ttl_s must be a whole number of seconds from 1 to 31536000"
    cases = [
        ({"ttl_s": 60}, "give nick or ip (or both)"),
        ({"nick": "a b", "ttl_s": 60}, "invalid nick: use 1-32 letters, digits, _ - ."),
        ({"ip": "300.1.1.1", "ttl_s": 60}, "invalid ip: give an IPv4 or IPv6 address or network"),
        ({"ip": 5, "ttl_s": 60}, "ip must be a string"),
        ({"nick": "x"}, ttl_rule),
        ({"nick": "x", "ttl_s": 0}, ttl_rule),
        ({"nick": "x", "ttl_s": True}, ttl_rule),
        ({"nick": "x", "ttl_s": "60"}, ttl_rule),
        ({"nick": "x", "ttl_s": 1.5}, ttl_rule),
        ({"nick": "x", "ttl_s": 31536001}, ttl_rule),
        ({"nick": "x", "ttl_s": 60, "reason": 5}, "reason must be a string"),
        ({"nick": "x", "ttl_s": 60, "until": 5}, "unknown field: until"),
    ]
    for body, error in cases:
        assert call(api.port, "POST", bans, body)[:2] == (400, {"error": error}), body
    status, body, _ = call(api.port, "POST", bans, {"nick": "x", "ip": "::1", "ttl_s": 31536000})
    assert status == 200
    assert call(api.port, "GET", bans)[1][0]["ip"] == "::1"


# ----------------------------------------------------------------------------- OpenAPI, logs, metrics, reload


def test_openapi_document_lists_exactly_the_routes_in_the_code(api: ServerProcess) -> None:
    in_code = {(route.method.lower(), route.template) for route in ROUTES}
    documented = {(method, path) for path, operations in DOCUMENT["paths"].items() for method in operations}
    assert in_code == documented
    status, served, _ = call(api.port, "GET", "/api/v1/openapi.json")
    assert status == 200 and served == json.loads(json.dumps(DOCUMENT))
    assert served["openapi"].startswith("3.")
    for method, path in documented:
        assert {"200", "401"} <= set(DOCUMENT["paths"][path][method]["responses"]), (method, path)


def test_every_request_is_logged_with_the_key_id_never_the_key(api: ServerProcess) -> None:
    call(api.port, "GET", "/api/v1/rooms")
    call(api.port, "GET", "/api/v1/rooms", key="wrong-key-0000")
    call(api.port, "POST", "/api/v1/bans", {"nick": "x"})
    logged = [(e["key_id"], e["method"], e["path"], e["status"]) for e in events(api, "api_request")]
    assert logged == [
        (key_id(KEY), "GET", "/api/v1/rooms", 200),
        (None, "GET", "/api/v1/rooms", 401),
        (key_id(KEY), "POST", "/api/v1/bans", 400),
    ]
    text = api.log_text()
    assert KEY not in text and "wrong-key-0000" not in text
    found = scrape(api.port)
    assert found["chat_api_requests_total{route=/api/v1/rooms,status=200}"] == 1
    assert found["chat_api_requests_total{route=unmatched,status=401}"] == 1
    assert found["chat_api_requests_total{route=/api/v1/bans,status=400}"] == 1


def test_sighup_rereads_the_keys_file(chat_server: Start, tmp_path: Path) -> None:
    path = keys_file(tmp_path, "old-key")
    srv = chat_server("--api-keys-file", str(path))
    assert call(srv.port, "GET", "/api/v1/rooms", key="old-key")[0] == 200
    keys_file(tmp_path, "new-key")
    srv.signal(signal.SIGHUP)
    wait_for(lambda: call(srv.port, "GET", "/api/v1/rooms", key="new-key")[0] == 200, 5, "the new key works")
    assert call(srv.port, "GET", "/api/v1/rooms", key="old-key")[0] == 401
    path.unlink()
    srv.signal(signal.SIGHUP)
    wait_for(lambda: bool(events(srv, "reload_failed")), 5, "the failed reload logged")
    assert call(srv.port, "GET", "/api/v1/rooms", key="new-key")[0] == 200, "an unreadable file keeps the keys"
    assert srv.proc.poll() is None


def test_with_a_metrics_port_the_api_leaves_the_chat_port(chat_server: Start, tmp_path: Path) -> None:
    srv = chat_server("--api-keys-file", str(keys_file(tmp_path)), "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    metrics_port = srv.metrics_port
    assert metrics_port
    wait_for(lambda: raw_get(metrics_port, "/healthz")[0] == 200, 5, "metrics port up")
    assert call(metrics_port, "GET", "/api/v1/rooms")[:2] == (200, [])
    assert raw_get(srv.port, "/api/v1/rooms", {"Authorization": f"Bearer {KEY}"})[0] == 404


def test_a_bad_keys_file_stops_the_start_with_a_reason(chat_server: Start, tmp_path: Path) -> None:
    srv = chat_server("--api-keys-file", str(tmp_path / "missing"), wait=False)
    srv.expect_exit(1)
    assert srv.proc.wait(10) == 1
    assert "No such file" in srv.wait_log("startup_failed")["error"]


# ----------------------------------------------------------------------------- fuzz


def test_random_json_and_headers_at_every_endpoint_get_a_4xx_never_a_500(chat_server: Start, tmp_path: Path) -> None:
    """Hypothesis throws random bodies, path parameters and headers at every route.

    Nobody is connected, so no request can find a room or a member: the only
    2xx answers possible are reads and a ban that happened to be valid.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    srv = chat_server("--api-keys-file", str(keys_file(tmp_path)))
    fields = st.sampled_from(["text", "from", "reason", "nick", "ip", "ttl_s", "id", "rooms", ""])
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    bodies = st.dictionaries(fields | st.text(max_size=10), values, max_size=5).map(lambda d: json.dumps(d).encode())
    bodies = bodies | values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200) | st.just(b"")
    visible = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=60)
    headers = st.dictionaries(
        st.sampled_from(["Authorization", "Content-Type", "Idempotency-Key", "Accept", "X-Forwarded-For", "Expect"]),
        visible,
        max_size=4,
    )
    params = st.text(max_size=40).map(lambda text: urllib.parse.quote(text, safe="")) | st.sampled_from(
        ["nobody", "empty-room", "%23nowhere", "0123456789abcdef", "", "..", "%2F"]
    )
    methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"])

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        route=st.sampled_from(ROUTES),
        param=params,
        method=st.none() | methods,
        body=bodies,
        sent=headers,
        keyed=st.booleans(),
    )
    def throw(route, param, method, body, sent, keyed) -> None:
        path = re.sub(r"\{\w+\}", param, route.template)
        if keyed:
            sent = {**sent, "Authorization": f"Bearer {KEY}"}
        status, answer, _ = call(srv.port, method or route.method, path, key=None, headers=sent, raw=body)
        assert status < 500, (route.template, status, answer)
        if status != 200:
            assert 400 <= status < 500 and set(answer) == {"error"}, (status, answer)

    throw()
    assert srv.proc.poll() is None
    text = srv.log_text()
    assert "Traceback" not in text and "api_failed" not in text and '"exception"' not in text
    statuses = {event["status"] for event in events(srv, "api_request")}
    assert {400, 401, 404, 405} <= statuses, statuses
