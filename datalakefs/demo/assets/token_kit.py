"""The demo lake's offline token issuer (runs in the server venv: needs only ``cryptography``).

    token_kit.py init  --key KEY --keycache DB --issuer ISSUER
        creates the issuer's EC P-256 key (KEY, mode 0600) unless it exists, and writes its JWKS into
        scitokens-cpp's key cache DB (sqlite, ``$XDG_CACHE_HOME/scitokens/scitokens_cpp.sqllite``) with
        refresh and expiry ten years ahead, so the https issuer is never contacted
    token_kit.py mint  --key KEY --issuer ISSUER --audience AUD [--scope S] [--lifetime SECONDS]
                       [--expired] [--wrong-key]
        prints a WLCG-profile JWT (ES256, kid); --expired: expired an hour ago; --wrong-key: signed
        by a key the issuer never published (the origin must refuse both)

``verify`` checks such a token as a storage server does (signature, issuer, audience, time); the
WebDAV doors' authoriser (``dav_auth.py``) uses it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sqlite3
import sys
import time
import uuid

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

KID = "demo-lake-key-1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _load_key(path: str) -> ec.EllipticCurvePrivateKey:
    with open(path, "rb") as fh:
        key = serialization.load_pem_private_key(fh.read(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
        "kid": KID,
        "alg": "ES256",
        "use": "sig",
    }


def init(key_path: str, keycache: str, issuer: str) -> None:
    if not os.path.exists(key_path):
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
    jwks = {"keys": [_jwk(_load_key(key_path))]}
    os.makedirs(os.path.dirname(keycache), exist_ok=True)
    far = int(time.time()) + 10 * 365 * 86400
    db = sqlite3.connect(keycache)
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS keycache (issuer text UNIQUE PRIMARY KEY NOT NULL, keys text NOT NULL)"
        )
        db.execute("DELETE FROM keycache WHERE issuer = ?", (issuer,))
        db.execute(
            "INSERT INTO keycache VALUES (?, ?)",
            (issuer, json.dumps({"jwks": jwks, "next_update": far, "expires": far})),
        )
        db.commit()
    finally:
        db.close()


def mint(key_path: str, issuer: str, audience: str, scope: str, lifetime: int, expired: bool, wrong_key: bool) -> str:
    key = ec.generate_private_key(ec.SECP256R1()) if wrong_key else _load_key(key_path)
    now = int(time.time())
    issued = now - 7200 if expired else now
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": "datalakefs-demo",
        "iat": issued,
        "nbf": issued,
        "exp": now - 3600 if expired else now + lifetime,
        "jti": str(uuid.uuid4()),
        "wlcg.ver": "1.0",
        "scope": scope,
    }
    header = {"alg": "ES256", "typ": "JWT", "kid": KID}
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


class InvalidToken(Exception):
    """The token is not one this issuer signed for this audience, or not now; the message says why."""


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify(token: str, public_key: ec.EllipticCurvePublicKey, issuer: str, audience: str, now: float) -> dict:
    """The claims of ``token`` once its ES256 signature, issuer, audience, nbf and exp are good."""
    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        header = json.loads(_unb64(header_b64))
        claims = json.loads(_unb64(claims_b64))
        signature = _unb64(signature_b64)
    except ValueError:
        raise InvalidToken("not a JWT") from None
    if header.get("alg") != "ES256" or len(signature) != 64:
        raise InvalidToken(f"algorithm {header.get('alg')!r} is not accepted")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise InvalidToken("bad signature") from None
    if claims.get("iss") != issuer:
        raise InvalidToken(f"issuer {claims.get('iss')!r} is not trusted")
    audiences = claims.get("aud")
    audiences = audiences if isinstance(audiences, list) else [audiences]
    if audience not in audiences and "https://wlcg.cern.ch/jwt/v1/any" not in audiences:
        raise InvalidToken(f"audience {claims.get('aud')!r} is not this storage")
    if not claims.get("nbf", 0) <= now < claims.get("exp", 0):
        raise InvalidToken("expired or not yet valid")
    return claims


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init")
    p_init.add_argument("--key", required=True)
    p_init.add_argument("--keycache", required=True)
    p_init.add_argument("--issuer", required=True)
    p_mint = sub.add_parser("mint")
    p_mint.add_argument("--key", required=True)
    p_mint.add_argument("--issuer", required=True)
    p_mint.add_argument("--audience", required=True)
    p_mint.add_argument("--scope", default="storage.read:/")
    p_mint.add_argument("--lifetime", type=int, default=3600)
    p_mint.add_argument("--expired", action="store_true")
    p_mint.add_argument("--wrong-key", action="store_true")
    args = parser.parse_args()
    if args.command == "init":
        init(args.key, args.keycache, args.issuer)
    else:
        print(mint(args.key, args.issuer, args.audience, args.scope, args.lifetime, args.expired, args.wrong_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
