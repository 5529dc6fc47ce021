"""NATS NKEYs, JWTs and .creds files for tests, made with the ``openssl`` command line
(Ed25519) like certs.py's certificates, so no Python crypto package is needed.

    user = NKey.generate("user")
    user.seed        # "SU..."  (what nats.nkey_seed takes)
    user.public_key  # "U..."   (what nats-server's authorization { users: [{nkey: ...}] } takes)

    op = operator_setup(tmp)     # operator, system and app accounts, one user
    op.server_conf               # nats-server config lines (operator mode, memory resolver)
    op.creds_path                # the user's .creds file

The encodings follow the NATS nkeys and JWT v2 formats: base32 of (prefix, key, CRC-16/XMODEM
little-endian); JWTs with header {"typ":"JWT","alg":"ed25519-nkey"} signed by the issuer's key.
nats-server checks all of it, so a test that connects with these is also a test of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from certs import openssl

# nkeys prefix bytes (first base32 character of the public key: O, A, U, ...)
PREFIX = {"operator": 14 << 3, "account": 0, "user": 20 << 3}
PREFIX_SEED = 18 << 3
# PKCS#8 DER header of an Ed25519 private key; the 32-byte seed follows
ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw + crc16(raw).to_bytes(2, "little")).decode().rstrip("=")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    r = subprocess.run([openssl(), *args], input=stdin, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
    return r.stdout


@dataclass
class NKey:
    kind: str
    raw_seed: bytes

    @classmethod
    def generate(cls, kind: str) -> "NKey":
        return cls(kind, os.urandom(32))

    @classmethod
    def from_seed(cls, seed: str) -> "NKey":
        """An NKEY from its seed string (``SU...``, as ``jetmq-broker nats-auth`` writes it)."""
        raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
        body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
        if crc16(body) != crc or body[0] & 0xF8 != PREFIX_SEED:
            raise ValueError("not an NKEY seed")
        prefix = ((body[0] & 7) << 5) | (body[1] >> 3)
        kind = next(k for k, v in PREFIX.items() if v == prefix)
        return cls(kind, body[2:34])

    def _with_key_file(self, fn):
        fd, path = tempfile.mkstemp(suffix=".der")
        try:
            os.write(fd, ED25519_PKCS8 + self.raw_seed)
            os.close(fd)
            return fn(path)
        finally:
            os.unlink(path)

    @property
    def public_raw(self) -> bytes:
        der = self._with_key_file(lambda p: _openssl("pkey", "-inform", "DER", "-in", p, "-pubout", "-outform", "DER"))
        return der[-32:]

    @property
    def public_key(self) -> str:
        return _b32(bytes([PREFIX[self.kind]]) + self.public_raw)

    @property
    def seed(self) -> str:
        p = PREFIX[self.kind]
        return _b32(bytes([PREFIX_SEED | (p >> 5), (p & 31) << 3]) + self.raw_seed)

    def sign(self, data: bytes) -> bytes:
        # Ed25519 signs in one shot, so openssl wants the message as a file, not a pipe.
        with tempfile.NamedTemporaryFile(suffix=".msg") as msg:
            msg.write(data)
            msg.flush()
            return self._with_key_file(
                lambda p: _openssl("pkeyutl", "-sign", "-inkey", p, "-keyform", "DER", "-rawin", "-in", msg.name))


def jwt(issuer: NKey, subject: str, name: str, nats: dict) -> str:
    claims = {"iat": int(time.time()), "iss": issuer.public_key, "name": name, "sub": subject, "nats": nats}
    # jti: a hash of the claims (the JWT library's convention; the server only needs it unique)
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{signing_input.decode()}.{_b64url(issuer.sign(signing_input))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
             "conn": -1, "leaf": -1}
JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def creds_file(path: Path, user_jwt: str, seed: str) -> Path:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


@dataclass
class OperatorSetup:
    server_conf: str
    creds_path: Path
    # a second user of an account the server does not know: its creds are refused
    stranger_creds_path: Path


def operator_setup(directory: Path, mappings: dict[str, str] | None = None) -> OperatorSetup:
    """Decentralized (JWT) auth: an operator, a system account, an application account with
    JetStream and ``mappings`` (subject -> destination), and one user of it with a .creds file."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    operator = NKey.generate("operator")
    system, app, stranger_account = (NKey.generate("account") for _ in range(3))
    user, stranger = NKey.generate("user"), NKey.generate("user")
    op_jwt = jwt(operator, operator.public_key, "test-operator", {"type": "operator", "version": 2})

    def account_jwt(acct: NKey, name: str, jetstream: bool) -> str:
        limits = dict(UNLIMITED, **(JETSTREAM_UNLIMITED if jetstream else {}))
        nats = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}
        if jetstream and mappings:
            nats["mappings"] = {src: [{"subject": dst, "weight": 100}] for src, dst in mappings.items()}
        return jwt(operator, acct.public_key, name, nats)

    def user_jwt(u: NKey, acct: NKey) -> str:
        return jwt(acct, u.public_key, "jetmq", {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                                                 "type": "user", "version": 2})

    preload = {system.public_key: account_jwt(system, "SYS", False), app.public_key: account_jwt(app, "APP", True)}
    conf = "\n".join([
        f'operator: "{op_jwt}"',
        f'system_account: "{system.public_key}"',
        "resolver: MEMORY",
        "resolver_preload: {",
        *[f'  {k}: "{v}"' for k, v in preload.items()],
        "}",
    ])
    return OperatorSetup(
        server_conf=conf,
        creds_path=creds_file(d / "jetmq.creds", user_jwt(user, app), user.seed),
        stranger_creds_path=creds_file(d / "stranger.creds", user_jwt(stranger, stranger_account), stranger.seed),
    )
