"""Test certificates and JWTs, made with the ``openssl`` command line (no Python crypto
packages needed).

    ca = make_ca(tmp, "test-ca")
    server = make_cert(tmp, ca, "server", cn="localhost", sans=["DNS:localhost", "IP:127.0.0.1"])
    client = make_cert(tmp, ca, "device-1", cn="device-1", client=True)
    token = hs256_jwt({"sub": "dev", "exp": int(time.time()) + 60}, b"secret...")
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def openssl() -> str:
    path = shutil.which("openssl")
    if not path:
        raise RuntimeError("the openssl command is needed to make test certificates")
    return path


def _run(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    r = subprocess.run([openssl(), *args], cwd=cwd, input=stdin, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
    return r.stdout


@dataclass
class Pair:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> Pair:
    """A self-signed CA (EC P-256, valid 2 days)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pair = Pair(d / f"{name}.pem", d / f"{name}.key")
    _run(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    return pair


def make_cert(directory: Path, ca: Pair, name: str, cn: str, sans: list[str] | None = None,
              client: bool = False, days: int = 2) -> Pair:
    """A leaf certificate signed by ``ca``. ``sans`` like ["DNS:localhost", "IP:127.0.0.1"]."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pair = Pair(d / f"{name}.pem", d / f"{name}.key")
    csr = d / f"{name}.csr"
    ext = d / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
    ]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={cn}")
    serial = "0x" + hashlib.sha1(f"{name}{cn}{pair.cert}".encode() + Path(ca.cert).read_bytes()).hexdigest()[:16]
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-set_serial", serial,
         "-days", str(days), "-extfile", str(ext), "-out", str(pair.cert))
    return pair


def fingerprint(pem_path: Path) -> str:
    """SHA-256 of the DER certificate, hex (what ``ssl.getpeercert(True)`` hashes to)."""
    der = _run("x509", "-in", str(pem_path), "-outform", "DER")
    return hashlib.sha256(der).hexdigest()


def make_rsa_key(directory: Path, name: str) -> tuple[Path, Path]:
    """(private key PEM, public key PEM), RSA 2048."""
    d = Path(directory)
    key, pub = d / f"{name}.key", d / f"{name}.pub.pem"
    _run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    _run("pkey", "-in", str(key), "-pubout", "-out", str(pub))
    return key, pub


# ----------------------------------------------------------------------------- JWT


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(alg: str, claims: dict) -> bytes:
    header = _b64url(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}".encode()


def hs256_jwt(claims: dict, secret: bytes) -> str:
    signing_input = _signing_input("HS256", claims)
    sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{_b64url(sig)}"


def rs256_jwt(claims: dict, private_key: Path) -> str:
    signing_input = _signing_input("RS256", claims)
    sig = _run("dgst", "-sha256", "-sign", str(private_key), stdin=signing_input)
    return f"{signing_input.decode()}.{_b64url(sig)}"


# ----------------------------------------------------------------------------- CRL


class RevocationList:
    """A CA's revocation database (``openssl ca``), written out as a PEM CRL.

        crl = RevocationList(tmp, ca)
        crl.revoke(device)
        crl.write(tmp / "crl.pem")
    """

    def __init__(self, directory: Path, ca: Pair):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        (self.dir / "index.txt").write_text("")
        (self.dir / "crlnumber").write_text("01\n")
        self.conf = self.dir / "ca.cnf"
        self.conf.write_text(
            "[ca]\ndefault_ca = test_ca\n\n[test_ca]\n"
            f"database = {self.dir / 'index.txt'}\n"
            f"crlnumber = {self.dir / 'crlnumber'}\n"
            f"certificate = {ca.cert}\nprivate_key = {ca.key}\n"
            "default_md = sha256\ndefault_crl_days = 2\n"
        )

    def revoke(self, pair: Pair) -> None:
        _run("ca", "-config", str(self.conf), "-revoke", str(pair.cert))

    def write(self, path: Path) -> Path:
        """Writes the current CRL to ``path`` atomically (write, then rename)."""
        tmp = Path(path).with_suffix(".tmp")
        _run("ca", "-config", str(self.conf), "-gencrl", "-out", str(tmp))
        tmp.replace(path)
        return Path(path)
