"""TLS for everything between machines: the API over HTTPS, the controller and the workers'
RPC over nng's ``tls+tcp://`` (mbedTLS), with client certificates for the worker plane.

- :class:`ServerTls` (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``): the API's SSL
  context, the controller's listener (asking workers for a certificate of the client CA when
  there is one) and the dialer that calls a worker back, which checks that the worker's
  certificate names the worker (``server_name``): a certificate for ``w1`` cannot join as ``w2``.
- :class:`WorkerTls` (``--tls-ca``, ``--tls-cert``, ``--tls-key``): the dialer to the
  controller (checking the server's certificate against the CA), the RPC listener (serving the
  worker's certificate, or a throwaway self-signed one when it has none and the server does not
  ask for one) and the HTTP client's context.

Certificates are read once, at start; one that has expired or is not valid yet stops the
process with one line naming the file (see :func:`read_certificate`).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import pynng
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TLS_SCHEME = "tls+tcp://"


class TlsError(ValueError):
    """A certificate, key or CA that cannot be used; the message names the file."""


def nng_url(host: str, port: int, tls: bool) -> str:
    """An nng address, ``tls+tcp://`` when ``tls``; IPv6 literals bracketed."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (TLS_SCHEME if tls else "tcp://") + where


def is_tls(address: str) -> bool:
    return address.startswith(TLS_SCHEME)


def _validity(cert: x509.Certificate, what: str, path: Path | str, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise TlsError(f"the {what} {path} is not valid yet (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)")
    if now > cert.not_valid_after_utc:
        raise TlsError(f"the {what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def read_certificate(path: Path, what: str) -> str:
    """The PEM text of the certificate(s) in ``path``, each checked for its dates."""
    try:
        data = Path(path).read_bytes()
        certs = x509.load_pem_x509_certificates(data)
    except OSError as e:
        raise TlsError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise TlsError(f"the {what} {path} is not a PEM certificate") from e
    for cert in certs:
        _validity(cert, what, path)
    return data.decode("ascii")


def _read_key(path: Path, what: str) -> str:
    try:
        data = Path(path).read_bytes()
        serialization.load_pem_private_key(data, password=None)
    except OSError as e:
        raise TlsError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        raise TlsError(f"the {what} {path} is not an unencrypted PEM private key") from e
    return data.decode("ascii")


@dataclass(frozen=True)
class Identity:
    """A certificate and its key (PEM), and the files they came from (empty: made here)."""

    cert_pem: str
    key_pem: str
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_files(cls, cert: Path, key: Path, what: str) -> Identity:
        """The pair in these files; TlsError naming both if the key is not the certificate's."""
        cert_pem, key_pem = read_certificate(cert, f"{what} certificate"), _read_key(key, f"{what} key")
        public = x509.load_pem_x509_certificates(cert_pem.encode("ascii"))[0].public_key()
        private = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if public.public_bytes(*spki) != private.public_key().public_bytes(*spki):
            raise TlsError(f"the {what} key {key} does not belong to the certificate {cert} (its public key is"
                           " another's): give the key made with that certificate")
        return cls(cert_pem, key_pem, str(cert), str(key))

    @classmethod
    def throwaway(cls, name: str) -> Identity:
        """A self-signed certificate for a worker without one, so that its RPC listener can
        serve TLS when the server does not ask workers for certificates (encryption without
        a proven name; the session seals still prove who sent what)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                   key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode("ascii"))


def _nng(mode: int, identity: Identity | None, ca: str | None, server_name: str | None) -> pynng.TLSConfig:
    """An nng TLS configuration; the peer must prove itself against ``ca`` when one is given."""
    config = pynng.TLSConfig(
        mode, server_name=server_name, ca_string=ca,
        own_cert_string=identity.cert_pem if identity else None,
        own_key_string=identity.key_pem if identity else None)
    # Always set: pynng skips a falsy auth_mode (NONE is 0), and a client's default is REQUIRED.
    config.set_auth_mode(pynng.TLSConfig.AUTH_MODE_REQUIRED if ca else pynng.TLSConfig.AUTH_MODE_NONE)
    return config


def system_ca_file() -> str:
    """The system's trusted CAs (what a worker trusts when given no ``--tls-ca``)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise TlsError("no --tls-ca given and no system CA bundle found: give the CA that signed the server's certificate")


class ServerTls:
    """The server's certificate, and the CA its workers' certificates must come from (if any)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.identity = Identity.from_files(cert, key, "server's")
        self.client_ca = read_certificate(client_ca, "client CA") if client_ca else None
        self.client_ca_file = str(client_ca) if client_ca else ""

    @property
    def mutual(self) -> bool:
        """Whether workers must present a certificate of the client CA."""
        return self.client_ca is not None

    def http(self) -> ssl.SSLContext:
        """The API's context: TLS 1.2 at least; clients are not asked for certificates."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.identity.cert_file, self.identity.key_file)
        return ctx

    def listener(self) -> pynng.TLSConfig:
        """The controller's pub/sub listener: a worker without the client CA's certificate
        never gets a message through (when there is a client CA)."""
        return _nng(pynng.TLSConfig.MODE_SERVER, self.identity, self.client_ca, None)

    def dialer(self, worker: str) -> pynng.TLSConfig:
        """Calling worker ``worker`` back: with a client CA, its certificate must be of that
        CA and name ``worker``; the server's own certificate proves the server to it."""
        return _nng(pynng.TLSConfig.MODE_CLIENT, self.identity, self.client_ca, worker)


class WorkerTls:
    """A worker's CA (what it trusts the server by) and its own certificate, if it has one."""

    def __init__(self, ca: Path | None, cert: Path | None, key: Path | None, name: str) -> None:
        if (cert is None) != (key is None):
            raise TlsError("--tls-cert and --tls-key go together")
        self.ca_file = str(ca) if ca else system_ca_file()
        self.ca = read_certificate(Path(self.ca_file), "CA file")
        self.has_certificate = cert is not None
        self.identity = Identity.from_files(cert, key, "worker's") if cert and key else Identity.throwaway(name)

    def controller(self, host: str) -> pynng.TLSConfig:
        """Dialing the controller at ``host``: its certificate must be of our CA and name it."""
        return _nng(pynng.TLSConfig.MODE_CLIENT, self.identity, self.ca, host)

    def listener(self) -> pynng.TLSConfig:
        """Our RPC listener: with a certificate of our own (a cluster of certificates), only a
        caller with one of our CA's certificates gets through; without, anyone may connect
        (and only what is sealed with our session key is obeyed)."""
        return _nng(pynng.TLSConfig.MODE_SERVER, self.identity, self.ca if self.has_certificate else None, None)

    def peer(self) -> pynng.TLSConfig:
        """Calling a tied peer's RPC (a cancel, proven by the attempt's tie secret): encrypted,
        with our certificate shown; the peer's is not checked (we know its address, not its name)."""
        return _nng(pynng.TLSConfig.MODE_CLIENT, self.identity, None, "peer")

    def http(self) -> ssl.SSLContext:
        """Talking to the API: its certificate checked against our CA and its host name."""
        return http_client_context(self.ca_file)


def http_client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A worker's HTTPS trust: ``ca_file`` (else the system's CAs), plus ``AWS_CA_BUNDLE`` when
    set, for the object store a worker reads and writes through presigned URLs."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if bundle := os.environ.get("AWS_CA_BUNDLE"):
        try:
            ctx.load_verify_locations(bundle)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"cannot use AWS_CA_BUNDLE {bundle}: {getattr(e, 'strerror', None) or e}") from e
    return ctx
