"""Coordinator TLS certificates: a private CA and the SuperLink's server certificate (``cryptography`` only).

``make_certificates(out_dir, hosts)`` writes four files:

``ca.crt``      the CA certificate: give it to every site (``--root-certificates``) and to ``flwr``
                (``root-certificates`` in the connection config). It is the sites' only trust anchor.
``ca/ca.key``   the CA private key, in its own ``ca/`` folder (0700): needed only to issue certificates, never by
                the SuperLink; move the ``ca/`` folder offline / off the SuperLink host after issuing.
``server.pem``  the SuperLink certificate (``--ssl-certfile``), signed by the CA.
``server.key``  its private key (``--ssl-keyfile``).
(``flower-superlink`` also takes ``--ssl-ca-certfile ca.crt``.) A ``ca.key`` beside the others (the layout
before the ``ca/`` folder) counts as an existing file: refused, or deleted with ``overwrite=True``.

Validity: the server certificate at most :data:`MAX_SERVER_DAYS` (825) days, the CA at most
:data:`MAX_CA_DAYS` (3650) days and never shorter than the server certificate.

Key type: EC P-384 (ECDSA with SHA-384) by default for both CA and server. It gives ~192-bit security (the
CNSA/"Suite B" top level, stronger than RSA-3072 and on par with RSA-7680), generates in milliseconds
instead of seconds, keeps handshakes small, and is supported by every client fedrad talks to (gRPC/BoringSSL
in Flower, OpenSSL in Python's ``ssl``). ``key_type="rsa4096"`` is available for peers that need RSA (it is
what FLOWER.md's first verification used).

Server certificate: subjectAltName holds every requested host (DNS names as DNSName, IPv4/IPv6 literals as
IPAddress) plus always ``localhost``, ``127.0.0.1`` and ``::1``: the SuperLink connects to its own Runtime API
at ``https://127.0.0.1:<port>`` and verifies the name (FLOWER.md section 5). EKU serverAuth, keyUsage
digitalSignature + keyEncipherment, basicConstraints CA:FALSE. The CA: basicConstraints CA:TRUE (pathlen 0),
keyUsage keyCertSign + cRLSign, both critical. Both are valid from 5 minutes ago (clock skew between sites)
for ``days`` days; the CA is valid at least as long as the server certificate.

Files: private keys are created with mode 0600 (``os.open(..., 0o600)``, never world-readable, not even
briefly), certificates 0644. Existing files are never overwritten unless ``overwrite=True``; the check covers
all four files before anything is generated, so a refused call writes nothing.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrad.common.files import write_with_mode

#: Always in the server certificate's subjectAltName (the SuperLink reaches itself on 127.0.0.1).
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
KEY_TYPES = ("ec-p384", "rsa4096")
FILES = {"ca_cert": "ca.crt", "ca_key": "ca/ca.key", "server_cert": "server.pem", "server_key": "server.key"}
LEGACY_CA_KEY = "ca.key"  # where the CA key lived before the ca/ folder
MAX_SERVER_DAYS = 825  # the longest server-certificate lifetime browsers accept (CA/Browser Forum, 2018)
MAX_CA_DAYS = 3650

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_CLOCK_SKEW = _dt.timedelta(minutes=5)


# ----------------------------------------------------------------------------------------------- hosts
def parse_host(host: str) -> x509.GeneralName:
    """One host string -> ``x509.IPAddress`` (IPv4/IPv6 literal) or ``x509.DNSName`` (lower-cased).

    Accepts ``[::1]``-style bracketed IPv6 and a trailing dot on DNS names; a leading ``*.`` wildcard label is
    allowed. Raises ``ValueError`` naming the host for anything else (empty, URL, ``host:port``, spaces,
    non-ASCII (give the punycode ``xn--`` form), labels longer than 63 characters, an all-numeric last label
    such as ``10.0.0.256``).
    """
    if not isinstance(host, str):
        raise ValueError(f"host must be a string, got {host!r}")
    text = host.strip()
    if not text:
        raise ValueError("empty host name")
    if text != host:
        raise ValueError(f"host {host!r} has leading/trailing whitespace")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if "://" in text or "/" in text:
        raise ValueError(f"host {host!r} looks like a URL; give only the host name or IP address")
    if ":" in text:
        raise ValueError(f"host {host!r} is neither an IP address nor a DNS name (a host:port? give the host only)")
    if not text.isascii():
        raise ValueError(f"host {host!r} is not ASCII; give an internationalized name in its punycode (xn--) form")
    name = text.lower().removesuffix(".")
    if not name or len(name) > 253:
        raise ValueError(f"host {host!r} is not a valid DNS name (length)")
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 2:
            continue
        if not _LABEL.match(label):
            raise ValueError(f"host {host!r} is not a valid DNS name (bad label {label!r}: letters, digits and "
                             "inner hyphens only, 1-63 characters)")
    if labels[-1].isdigit():
        raise ValueError(f"host {host!r} is neither a valid IP address nor a DNS name (numeric last label)")
    return x509.DNSName(name)


def san_names(hosts: Iterable[str] = ()) -> list[x509.GeneralName]:
    """Validated, de-duplicated subjectAltName entries: the given hosts, then the loopback defaults."""
    if isinstance(hosts, str):
        raise ValueError("hosts must be a list of host names, not a single string")
    out: list[x509.GeneralName] = []
    for h in [*hosts, *DEFAULT_HOSTS]:
        name = parse_host(h)
        if name not in out:
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------- files
def _check_targets(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing file(s): {', '.join(existing)} "
                              "(use overwrite=True / --force)")


# ----------------------------------------------------------------------------------------------- keys
def _new_key(key_type: str):
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise ValueError(f"unknown key_type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def _hash_for(key) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256()


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ----------------------------------------------------------------------------------------------- API
def _check_days(value, name: str, cap: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > cap:
        raise ValueError(f"{name}={value} exceeds the maximum of {cap} days")


def make_certificates(out_dir: str | os.PathLike, hosts: Iterable[str] = (), days: int = MAX_SERVER_DAYS, *,
                      ca_days: int | None = None, overwrite: bool = False, key_type: str = "ec-p384",
                      ca_name: str = "fedrad coordinator CA") -> dict[str, Path]:
    """Create a CA and a SuperLink server certificate signed by it in ``out_dir``.

    Returns ``{"ca_cert": .../ca.crt, "ca_key": .../ca/ca.key, "server_cert": .../server.pem,
    "server_key": .../server.key}``. ``hosts``: names/IPs the sites use to reach the SuperLink (``localhost``,
    ``127.0.0.1`` and ``::1`` are always added). ``days``: validity of the server certificate (at most 825, the
    longest lifetime browsers accept); ``ca_days``: of the CA (default ``days``; at least ``days``, at most
    3650; sites only need the CA to stay the same, so a server certificate can be renewed under it).
    Raises ``ValueError`` for a bad host, days or key type, ``FileExistsError`` naming existing files unless
    ``overwrite``.
    """
    _check_days(days, "days", MAX_SERVER_DAYS)
    ca_days = days if ca_days is None else ca_days
    _check_days(ca_days, "ca_days", MAX_CA_DAYS)
    if ca_days < days:
        raise ValueError(f"ca_days={ca_days} is shorter than the server certificate's days={days}")
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key_type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    names = san_names(hosts)
    out = Path(out_dir)
    paths = {k: out / v for k, v in FILES.items()}
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    legacy = out / LEGACY_CA_KEY
    _check_targets([*paths.values(), legacy], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    ca_dir = paths["ca_key"].parent
    ca_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ca_dir, 0o700)

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    not_before, not_after = now - _CLOCK_SKEW, now + _dt.timedelta(days=days)
    ca_not_after = now + _dt.timedelta(days=ca_days)

    ca_key = _new_key(key_type)
    ca_subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrad"),
                            x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(ca_not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )

    server_key = _new_key(key_type)
    cn = str(names[0].value)
    server_subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrad"),
                                x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(server_subject).issuer_name(ca_subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )

    pem = serialization.Encoding.PEM
    contents = [("ca_key", _key_pem(ca_key), 0o600), ("server_key", _key_pem(server_key), 0o600),
                ("ca_cert", ca_cert.public_bytes(pem), 0o644), ("server_cert", server_cert.public_bytes(pem), 0o644)]
    written: list[Path] = []
    try:
        for name, data, mode in contents:
            write_with_mode(paths[name], data, mode, overwrite)
            written.append(paths[name])
    except BaseException:
        if not overwrite:  # leave no half set behind (it would block the next attempt)
            for p in written:
                p.unlink(missing_ok=True)
        raise
    legacy.unlink(missing_ok=True)  # overwrite=True: no CA key left beside the SuperLink's files
    return paths


def describe_certificate(path: str | os.PathLike) -> str:
    """One human line about a PEM certificate: subject, SANs, validity (for ``fedrad coordinator certs``)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = ", ".join(str(n.value) for n in san)
    except x509.ExtensionNotFound:
        sans = "-"
    return (f"{Path(path).name}: {cert.subject.rfc4514_string()}; SAN: {sans}; valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}")
