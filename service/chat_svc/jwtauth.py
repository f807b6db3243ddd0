"""Verifying JSON Web Tokens with PyJWT: the key file, the one algorithm it allows, and why a token fails.

The algorithm comes from the key, never from the token (RFC 8725 2.1): a
secret allows HS256 only, an RSA public key RS256 only, a P-256 public key
ES256 only.  So ``none``, or an HS256 token signed with the RSA public key
as its secret, is refused by PyJWT before any claim is looked at.
"""

from __future__ import annotations

from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# RFC 7518 3.2: an HS256 key must be at least as long as the hash.
MIN_SECRET_BYTES = 32

# Why a token was refused: the label of chat_auth_failures_total.
MALFORMED = "malformed"
BAD_SIGNATURE = "bad_signature"
BAD_ALGORITHM = "bad_algorithm"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
BAD_CLAIMS = "bad_claims"

_REASONS: tuple[tuple[type[Exception], str], ...] = (
    # Order matters: the more specific classes first.
    (jwt.ExpiredSignatureError, EXPIRED),
    (jwt.ImmatureSignatureError, NOT_YET_VALID),
    (jwt.InvalidAlgorithmError, BAD_ALGORITHM),
    (jwt.InvalidSignatureError, BAD_SIGNATURE),
    (jwt.DecodeError, MALFORMED),
    (jwt.InvalidTokenError, BAD_CLAIMS),
)


class AuthFailed(Exception):
    """A presented token was refused; ``reason`` is a metric label, never the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JwtKey:
    """The verification key from ``--jwt-key-file`` and the single algorithm it allows."""

    def __init__(self, algorithm: str, key: Any) -> None:
        self.algorithm = algorithm
        self.key = key

    @classmethod
    def load(cls, path: str) -> JwtKey:
        """Read the file: a PEM public key (or certificate) means RS256/ES256, anything else an HS256 secret.

        Raises ValueError with a sentence an operator can act on.
        """
        with open(path, "rb") as handle:
            data = handle.read()
        if b"-----BEGIN" not in data:
            secret = data.strip()
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(f"--jwt-key-file: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes")
            return cls("HS256", secret)
        if b"PRIVATE KEY" in data:
            raise ValueError("--jwt-key-file: give the public key; the private key stays with the token issuer")
        if b"BEGIN CERTIFICATE" in data:
            public: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
        if isinstance(public, rsa.RSAPublicKey):
            return cls("RS256", public)
        if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
            return cls("ES256", public)
        raise ValueError("--jwt-key-file: the PEM key must be RSA (RS256) or EC P-256 (ES256)")


def decode(token: str, key: JwtKey, audience: str | None = None, issuer: str | None = None) -> dict[str, Any]:
    """The verified claims of ``token``; raises AuthFailed with the reason.

    ``exp`` and ``nbf`` are checked when present; ``sub`` is required.  A
    token carrying ``aud`` is refused unless ``audience`` is configured and
    matches (PyJWT's default), so a token minted for another service is no
    key to this one.
    """
    required = ["sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm],
            audience=audience,
            issuer=issuer,
            options={"require": required},
        )
    except jwt.InvalidTokenError as exc:
        raise AuthFailed(next(reason for kind, reason in _REASONS if isinstance(exc, kind))) from None
    return claims


def looks_like_jwt(text: str) -> bool:
    """Three dot-separated parts: how /auth tells a token from the shared --token."""
    return text.count(".") == 2
