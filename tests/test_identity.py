"""Per-user identities (issue 17): /auth with a JWT, over real server processes.

Keys are made in the test: an HS256 secret, and RS256/ES256 key pairs whose
public half goes in --jwt-key-file.  Tokens are signed with PyJWT, as an
identity provider would.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from _api import events
from _chat import LineClient, ServerProcess, scrape, wait_for
from chat_svc.identity import Authenticator, ExpiryWatch, Identity
from chat_svc.jwtauth import AuthFailed, JwtKey
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

Start = Callable[..., ServerProcess]
SECRET = "an-hs256-secret-of-at-least-32-bytes!"


def hs256(tmp_path: Path) -> tuple[Path, Callable[..., str]]:
    path = tmp_path / "jwt.key"
    path.write_text(SECRET + "\n")
    return path, lambda **claims: jwt.encode(claims, SECRET, algorithm="HS256")


def asymmetric(tmp_path: Path, kind: str) -> tuple[Path, Callable[..., str]]:
    private: Any = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / f"{kind}.pem"
    path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path, lambda **claims: jwt.encode(claims, private, algorithm=kind)


def auth_first(srv: ServerProcess, token: str) -> LineClient:
    client = srv.connect()
    client.send(f"/auth {token}")
    return client


def identified(srv: ServerProcess, token: str, nick: str) -> LineClient:
    """A guest that presents ``token`` mid-session and becomes ``nick``."""
    client = srv.member()
    client.send(f"/auth {token}")
    assert client.expect("* authenticated") == f"* authenticated as {nick}"
    return client


def failures(srv: ServerProcess) -> dict[str, float]:
    prefix = "chat_auth_failures_total{reason="
    return {k[len(prefix) : -1]: v for k, v in scrape(srv.port).items() if k.startswith(prefix) and v}


def forge(token: str, **changes: Any) -> str:
    """The token with its payload changed and the signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


# ----------------------------------------------------------------------------- accepting and refusing


@pytest.mark.parametrize("kind", ["HS256", "RS256", "ES256"])
def test_a_valid_token_makes_sub_the_nick(chat_server: Start, tmp_path: Path, kind: str) -> None:
    key, sign = hs256(tmp_path) if kind == "HS256" else asymmetric(tmp_path, kind)
    srv = chat_server("--jwt-key-file", str(key), "--require-auth")
    alice = auth_first(srv, sign(sub="alice", exp=int(time.time()) + 60))
    assert alice.expect("* welcome") == "* welcome to chat-svc, you are alice in lobby; type /help"
    bob = auth_first(srv, sign(sub="bob"))
    bob.expect("* welcome")
    bob.send("hi alice")
    assert alice.expect("[bob]") == "[bob] hi alice"


def test_refused_tokens_say_authentication_failed_and_are_counted_by_reason(chat_server: Start, tmp_path: Path) -> None:
    key, sign = hs256(tmp_path)
    rsa_key, rsa_sign = asymmetric(tmp_path, "RS256")
    # Every refusal below comes from one address: more than the default --auth-failure-burst.
    srv = chat_server("--jwt-key-file", str(key), "--require-auth", "--auth-failure-burst", "100")
    now = int(time.time())
    good = sign(sub="alice", exp=now + 60)
    public_pem = rsa_key.read_text()
    tokens = {
        "bad_algorithm": [
            jwt.encode({"sub": "alice"}, None, algorithm="none"),  # alg none
            rsa_sign(sub="alice"),  # an algorithm the key does not allow
        ],
        "bad_signature": [
            forge(good, sub="root"),  # tampered payload
            jwt.encode({"sub": "alice"}, "another-secret-of-at-least-32-bytes!!", algorithm="HS256"),
        ],
        "expired": [sign(sub="alice", exp=now - 30)],
        "not_yet_valid": [sign(sub="alice", nbf=now + 300)],
        "bad_claims": [
            sign(exp=now + 60),  # no sub
            sign(sub="not a nick"),
            sign(sub="alice", rooms="lobby"),
            sign(sub="alice", rooms=[]),
            sign(sub="alice", nick_change="yes"),
            sign(sub="alice", aud="another-service"),
        ],
        "malformed": ["a.b.c", "not-a-token"],
        "missing": [],
    }
    for reason, presented in tokens.items():
        for token in presented:
            client = auth_first(srv, token)
            assert client.expect("!") == "! authentication failed", (reason, token)
            assert client.closed(), reason
    no_auth = srv.connect()
    no_auth.send("hello")
    assert no_auth.expect("!") == "! authentication failed"
    counted = failures(srv)
    assert counted == {reason: len(presented) for reason, presented in tokens.items() if presented} | {"missing": 1}
    # An HS256 token signed with the RS256 public key as its secret (algorithm confusion) is refused too.
    rsa_srv = chat_server("--jwt-key-file", str(rsa_key), "--require-auth")
    confused = auth_first(rsa_srv, forge_hs256_with(public_pem))
    assert confused.expect("!") == "! authentication failed"
    assert failures(rsa_srv) == {"bad_algorithm": 1}
    text = srv.log_text() + rsa_srv.log_text()
    for token in [good, *(token for presented in tokens.values() for token in presented if len(token) > 20)]:
        signature = token.split(".")[-1]
        assert token not in text
        assert not signature or signature not in text


def forge_hs256_with(secret: str) -> str:
    """What PyJWT refuses to sign (it knows the key is PEM): HS256 over the public key, by hand."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(b'{"sub":"alice"}')
    signature = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"


def test_shared_token_and_jwt_are_both_accepted_and_guests_stay_anonymous(chat_server: Start, tmp_path: Path) -> None:
    key, sign = hs256(tmp_path)
    both = chat_server("--jwt-key-file", str(key), "--token", "open-sesame")
    guest = auth_first(both, "open-sesame")
    assert guest.expect("* welcome").startswith("* welcome to chat-svc, you are 127.0.0.1:")
    alice = auth_first(both, sign(sub="alice"))
    assert alice.expect("* welcome").startswith("* welcome to chat-svc, you are alice ")
    wrong = auth_first(both, "open-sesamE")
    assert wrong.expect("!") == "! authentication failed"
    # --jwt-key-file alone: no /auth needed, a guest keeps its ip:port nick; a token later identifies it.
    optional = chat_server("--jwt-key-file", str(key))
    anon = optional.connect()
    anon.send("/who")
    welcome = anon.expect("* welcome")
    guest_nick = welcome.split("you are ")[1].split(" ")[0]
    assert anon.expect("* in lobby") == f"* in lobby (1): {guest_nick}"
    anon.send("/auth open-sesame")
    assert anon.expect("!") == "! no token is required"
    anon.send(f"/auth {sign(sub='carol')}")
    assert anon.expect("* ") == f"* {guest_nick} is now known as carol"
    assert anon.expect("* ") == "* authenticated as carol"
    anon.send(f"/auth {forge(sign(sub='carol'), sub='root')}")
    assert anon.expect("!") == "! authentication failed"
    assert anon.closed(0.3) is False, "a refused /auth mid-session does not disconnect"
    assert [e["nick"] for e in events(optional, "authenticated")] == ["carol"]


# ----------------------------------------------------------------------------- what an identity may do


def test_the_sub_is_reserved_and_nick_change_needs_the_claim(chat_server: Start, tmp_path: Path) -> None:
    key, sign = hs256(tmp_path)
    srv = chat_server("--jwt-key-file", str(key), "--flood-rate", "0")
    alice = identified(srv, sign(sub="alice"), "alice")
    alice.send("/nick alicia")
    assert alice.expect("!") == "! nick change not allowed: you are alice"
    guest = srv.member()
    guest.send("/nick alice")
    assert guest.expect("!") == "! nick alice is taken"
    twin = auth_first(srv, sign(sub="alice"))  # the same identity on a second connection
    twin.expect("* welcome")
    twin.send(f"/auth {sign(sub='alice')}")
    assert twin.expect("!") == "! nick alice is taken"
    assert "nick_taken" in failures(srv)
    bob = identified(srv, sign(sub="bob", nick_change=True), "bob")
    bob.send("/nick robert")
    bob.expect_re("bob is now known as robert$")
    guest.send("/nick bob")
    assert guest.expect("!") == "! nick bob is taken", "the sub stays reserved after a rename"
    bob.send("/nick bob")
    bob.expect_re("robert is now known as bob$")
    bob.send("/nick robert")
    bob.expect_re("bob is now known as robert$")
    bob.send("/quit")
    assert bob.closed()
    wait_for(lambda: guest_takes(guest, "bob"), 5, "the sub is free once its holder left")


def guest_takes(guest: LineClient, nick: str) -> bool:
    guest.send(f"/nick {nick}")
    return guest.expect_re(rf"^(! nick {nick} is taken|\* .* is now known as {nick})$").startswith("*")


def test_the_rooms_claim_is_an_allow_list(chat_server: Start, tmp_path: Path) -> None:
    key, sign = hs256(tmp_path)
    srv = chat_server("--jwt-key-file", str(key), "--require-auth", "--flood-rate", "0")
    ops = auth_first(srv, sign(sub="olga", rooms=["ops", "#dev"]))
    assert ops.expect("* welcome") == "* welcome to chat-svc, you are olga in ops; type /help"
    ops.send("/join lobby")
    assert ops.expect("!") == "! not allowed in lobby"
    ops.send("/join #dev")
    assert ops.expect("* you joined") == "* you joined dev"  # the claim's "#dev" is the room dev
    ops.send("/join bad room")
    assert ops.expect("!").startswith("! invalid room name")
    anywhere = auth_first(srv, sign(sub="any"))
    assert anywhere.expect("* welcome").endswith("in lobby; type /help")
    # A refreshed token with a narrower list moves the member out of a room it no longer allows.
    ops.send(f"/auth {sign(sub='olga', rooms=['ops'])}")
    assert ops.expect("* authenticated") == "* authenticated as olga"
    assert ops.expect("* you joined") == "* you joined ops"


# ----------------------------------------------------------------------------- expiry and refresh


def test_expiry_disconnects_and_a_refresh_extends(chat_server: Start, tmp_path: Path) -> None:
    key, sign = hs256(tmp_path)
    srv = chat_server("--jwt-key-file", str(key), "--require-auth", "--flood-rate", "0")
    short = auth_first(srv, sign(sub="short", exp=int(time.time()) + 2))
    short.expect("* welcome")
    refreshed = auth_first(srv, sign(sub="kept", exp=int(time.time()) + 2))
    refreshed.expect("* welcome")
    refreshed.send(f"/auth {sign(sub='kept', exp=int(time.time()) + 60)}")
    assert refreshed.expect("* authenticated") == "* authenticated as kept"
    refreshed.send(f"/auth {sign(sub='someone-else', exp=int(time.time()) + 60)}")
    assert refreshed.expect("!") == "! authentication failed"
    started = time.monotonic()
    assert short.expect("!", timeout=5) == "! token expired"
    assert short.closed()
    assert time.monotonic() - started < 3.5
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    refreshed.send("/who")
    assert refreshed.expect("* in lobby") == "* in lobby (1): kept"
    found = scrape(srv.port)
    assert found["chat_disconnects_total{reason=token_expired,transport=tcp}"] == 1
    assert found["chat_auth_failures_total{reason=wrong_sub}"] == 1
    assert [e["nick"] for e in events(srv, "token_expired")] == ["short"]


# ----------------------------------------------------------------------------- units


def test_key_files_are_checked_at_load(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtKey.load(str(short))
    private = tmp_path / "private.pem"
    key = rsa.generate_private_key(65537, 2048)
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(ValueError, match="give the public key"):
        JwtKey.load(str(private))
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="RSA \\(RS256\\) or EC P-256"):
        JwtKey.load(str(p384))


def test_audience_and_issuer_when_configured(tmp_path: Path) -> None:
    key, sign = hs256(tmp_path)
    auth = Authenticator(None, str(key), audience="chat", issuer="https://id.example")
    assert auth.check(sign(sub="a", aud="chat", iss="https://id.example")) == Identity("a")
    for claims in ({"sub": "a"}, {"sub": "a", "aud": "chat"}, {"sub": "a", "aud": "x", "iss": "https://id.example"}):
        with pytest.raises(AuthFailed) as failed:
            auth.check(sign(**claims))
        assert failed.value.reason == "bad_claims"


def test_the_expiry_watch_skips_refreshed_identities_and_stays_bounded() -> None:
    import gevent
    from chat_svc.hub import Member

    ended: list[str] = []
    watch = ExpiryWatch(lambda member: ended.append(member.nick))
    members = []
    for index in range(3):
        member = Member(f"m{index}", None)  # type: ignore[arg-type]
        member.identity = Identity(member.nick, expires=time.time() + 0.2)
        watch.watch(member)
        members.append(member)
    members[1].identity = Identity("m1", expires=time.time() + 60)  # refreshed
    watch.watch(members[1])
    for _ in range(500):  # a refresh loop leaves no pile of stale entries behind
        members[2].identity = Identity("m2", expires=time.time() + 0.3)
        watch.watch(members[2])
    assert len(watch) < 200
    gevent.sleep(0.5)
    assert ended == ["m0", "m2"]
