"""``python main.py certs init|worker``: a cluster CA and the certificates it signs, so nobody
needs an openssl recipe to run DPIP over TLS.

    python main.py certs init DIR --host dpip.example.org,10.0.0.5
    python main.py certs worker DIR w1

``init`` makes ``DIR/ca.pem`` and ``DIR/ca.key`` (the CA: keep its key where you issue
certificates, nowhere else) and ``DIR/server.pem`` / ``DIR/server.key`` (the server's, with a
subject alternative name for each ``--host``, names and addresses, plus ``localhost`` and the
loopback addresses). ``worker`` issues ``DIR/worker-NAME.pem`` / ``DIR/worker-NAME.key``: the
certificate names the worker (its common name and its one DNS name), and the server checks that
name against the name the worker joins with. Keys are ECDSA P-256, written 0600. Every
certificate may be used by either end of a connection (server and client authentication): the
server's also proves it when it calls a worker, and a worker's when it dials the controller.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plane.wire import NAME_RE

CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers accept at most for a server certificate
LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Written whole (a temporary file renamed), a key 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600 if secret else 0o644)  # whatever the umask made of it
    os.replace(tmp, path)


def _save(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, stem: Path) -> Issued:
    issued = Issued(stem.with_suffix(".pem"), stem.with_suffix(".key"))
    _write(issued.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), secret=True)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return issued


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """Each host as what it is (an address or a DNS name); an address also as a DNS name, for TLS
    stacks (nng's mbedTLS) that match the name asked for only against DNS names."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            pass
        names.append(x509.DNSName(host))
    return names


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(directory: Path, days: int = CA_DAYS) -> Issued:
    """A new CA: ``ca.pem`` and ``ca.key`` in ``directory``."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DPIP cluster CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _save(cert, key, directory / "ca")


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as e:
        raise ValueError(f"no CA in {directory} (make one with: main.py certs init {directory})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'} is not the ECDSA key certs init makes")
    return cert, key


def issue(directory: Path, stem: str, common_name: str, hosts: list[str], days: int = LEAF_DAYS,
          not_before: dt.datetime | None = None) -> Issued:
    """A certificate signed by ``directory``'s CA, for ``hosts``, written as ``stem``.pem/.key."""
    ca_cert, ca_key = load_ca(directory)
    key = _key()
    start = not_before or _now() - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _save(cert, key, directory / stem)


def init(directory: Path, hosts: list[str], days: int = LEAF_DAYS) -> tuple[Issued, Issued]:
    """A CA (kept if ``directory`` has one) and the server's certificate for ``hosts``."""
    ca = Issued(directory / "ca.pem", directory / "ca.key")
    if not (ca.cert.exists() and ca.key.exists()):
        ca = make_ca(directory)
    names = [h for h in hosts if h] + list(LOOPBACK)
    return ca, issue(directory, "server", names[0], names, days)


def worker(directory: Path, name: str, days: int = LEAF_DAYS, not_before: dt.datetime | None = None,
           force: bool = False) -> Issued:
    """Worker ``name``'s certificate: its name is the one it can join as. One that exists is
    replaced only with ``force`` (the old one stays valid until it expires: nothing revokes it)."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a worker name (letters, digits, '.', '_', '-'; 1 to 64)")
    existing = directory / f"worker-{name}.pem"
    if existing.exists() and not force:
        raise ValueError(f"{existing} exists already: give --force to issue a new pair for {name} (the old"
                         " certificate stays valid until it expires; a worker holding it can still join as"
                         f" {name}, so to shut one out make a new CA)")
    return issue(directory, f"worker-{name}", name, [name], days, not_before)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="main.py certs", description="Make DPIP's TLS certificates.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="a CA (unless DIR has one) and the server's certificate")
    i.add_argument("dir", type=Path)
    i.add_argument("--host", default="", help="the server's names and addresses, comma-separated"
                   " (localhost and the loopback addresses are always added)")
    i.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity (default {LEAF_DAYS})")
    w = sub.add_parser("worker", help="a worker's certificate, signed by DIR's CA")
    w.add_argument("dir", type=Path)
    w.add_argument("name")
    w.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity (default {LEAF_DAYS})")
    w.add_argument("--force", action="store_true", help="replace an existing pair for NAME (the old certificate"
                   " stays valid until it expires)")
    args = p.parse_args(argv)
    if args.days < 1:
        p.error("--days takes a positive number of days")
    try:
        if args.command == "init":
            ca, server = init(args.dir, [h.strip() for h in args.host.split(",") if h.strip()], args.days)
            print(f"CA: {ca.cert} (its key {ca.key}: keep it where you issue certificates)")
            print(f"server: {server.cert} {server.key}")
            print(f"run: main.py --tls-cert {server.cert} --tls-key {server.key} --tls-client-ca {ca.cert}")
        else:
            replaced = (args.dir / f"worker-{args.name}.pem").exists()
            issued = worker(args.dir, args.name, args.days, force=args.force)
            print(f"worker {args.name}: {issued.cert} {issued.key}")
            if replaced:
                print(f"note: the pair it replaces stays valid until it expires (a worker holding it can still"
                      f" join as {args.name})")
            print(f"run: worker --worker-name {args.name} --tls-ca {args.dir / 'ca.pem'}"
                  f" --tls-cert {issued.cert} --tls-key {issued.key}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
