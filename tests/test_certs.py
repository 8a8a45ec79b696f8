"""Coordinator certificates (server/certs.py) and site node keys (client/keys.py)."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import sys
import ssl
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedrad.client.keys import make_node_keys, public_key_fingerprint
from fedrad.server.certs import make_certificates, parse_host


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _load(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    return make_certificates(out, hosts=["superlink.example.org", "10.1.2.3", "2001:db8::7", "LOCALHOST"], days=30)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("other"), days=30)


# ----------------------------------------------------------------------------------------- contents
def test_files_and_modes(certs):
    assert {p.name for p in certs.values()} == {"ca.crt", "ca.key", "server.pem", "server.key"}
    out = certs["ca_cert"].parent
    assert certs["ca_key"] == out / "ca" / "ca.key"  # apart from what the SuperLink needs
    assert sorted(p.name for p in out.iterdir()) == ["ca", "ca.crt", "server.key", "server.pem"]
    assert _mode(out / "ca") == 0o700 and [p.name for p in (out / "ca").iterdir()] == ["ca.key"]
    assert _mode(certs["ca_key"]) == 0o600
    assert _mode(certs["server_key"]) == 0o600
    assert _mode(certs["ca_cert"]) == 0o644
    assert _mode(certs["server_cert"]) == 0o644


def test_subject_alt_names_exact(certs):
    san = _load(certs["server_cert"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["localhost", "superlink.example.org"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.1.2.3", "2001:db8::7", "127.0.0.1", "::1")}
    assert len(list(san)) == 6  # no duplicates (LOCALHOST == localhost)


def test_default_sans_only(other_ca):
    san = _load(other_ca["server_cert"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("::1")}


def test_ca_extensions_and_signature(certs):
    ca, server = _load(certs["ca_cert"]), _load(certs["server_cert"])
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"
    # CA self-signed, server signed by CA, and not by another CA
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    assert server.issuer == ca.subject


def test_server_signature_not_from_other_ca(certs, other_ca):
    server, other = _load(certs["server_cert"]), _load(other_ca["ca_cert"])
    with pytest.raises(Exception):
        other.public_key().verify(server.signature, server.tbs_certificate_bytes,
                                  ec.ECDSA(server.signature_hash_algorithm))


def test_server_extensions(certs):
    server = _load(certs["server_cert"])
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(certs["server_key"].read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_validity_period(certs):
    now = dt.datetime.now(dt.timezone.utc)
    for p in (certs["ca_cert"], certs["server_cert"]):
        c = _load(p)
        assert c.not_valid_before_utc <= now <= c.not_valid_after_utc
        assert abs((c.not_valid_after_utc - now) - dt.timedelta(days=30)) < dt.timedelta(minutes=5)
        assert now - c.not_valid_before_utc < dt.timedelta(minutes=10)


def test_refuses_overwrite_then_overwrites(tmp_path):
    first = make_certificates(tmp_path, days=2)
    before = first["server_cert"].read_bytes()
    with pytest.raises(FileExistsError, match="server.pem"):
        make_certificates(tmp_path, days=2)
    assert first["server_cert"].read_bytes() == before
    # a partly filled directory is refused before anything is written
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ca.key").write_text("keep me")
    with pytest.raises(FileExistsError, match="ca.key"):
        make_certificates(tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["ca.key"]
    # overwrite=True replaces and keeps exact modes even if the old file was world-readable
    os.chmod(first["server_key"], 0o644)
    again = make_certificates(tmp_path, days=2, overwrite=True)
    assert again["server_cert"].read_bytes() != before
    assert _mode(again["server_key"]) == 0o600 and _mode(again["server_cert"]) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_validity_caps(tmp_path):
    for kwargs in ({"days": 826}, {"days": 0}, {"days": 30, "ca_days": 3651}, {"days": 800, "ca_days": 799},
                   {"days": True}):
        with pytest.raises(ValueError):
            make_certificates(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())  # refused before anything is written
    paths = make_certificates(tmp_path, days=825, ca_days=3650)
    now = dt.datetime.now(dt.timezone.utc)
    assert abs(_load(paths["server_cert"]).not_valid_after_utc - now - dt.timedelta(days=825)) < dt.timedelta(minutes=5)
    assert abs(_load(paths["ca_cert"]).not_valid_after_utc - now - dt.timedelta(days=3650)) < dt.timedelta(minutes=5)


def test_legacy_ca_key_is_refused_then_removed(tmp_path):
    (tmp_path / "ca.key").write_text("old layout")
    with pytest.raises(FileExistsError, match="ca.key"):
        make_certificates(tmp_path, days=2)
    paths = make_certificates(tmp_path, days=2, overwrite=True)
    assert not (tmp_path / "ca.key").exists() and paths["ca_key"].is_file()


@pytest.mark.parametrize("host", ["", " ", "https://x.org", "x.org:9092", "bad_name.org", "-a.org", "a..b",
                                  "10.0.0.256", "1.2.3", "a" * 64 + ".org", "héllo.org", "a b"])
def test_bad_hosts(tmp_path, host):
    with pytest.raises(ValueError):
        make_certificates(tmp_path, hosts=[host])
    assert not list(tmp_path.iterdir())


def test_host_forms():
    assert parse_host("[::1]") == x509.IPAddress(ipaddress.ip_address("::1"))
    assert parse_host("Link.Example.ORG.") == x509.DNSName("link.example.org")
    assert parse_host("*.example.org") == x509.DNSName("*.example.org")
    with pytest.raises(ValueError):
        make_certificates("/nonexistent-never", hosts="localhost")  # a string, not a list


def test_rsa_option(tmp_path):
    paths = make_certificates(tmp_path, hosts=["h.example"], days=1, key_type="rsa4096")
    _load(paths["server_cert"]).verify_directly_issued_by(_load(paths["ca_cert"]))


# ----------------------------------------------------------------------------------------- real TLS
@contextmanager
def _tls_server(cert: Path, key: Path, family=socket.AF_INET, host="127.0.0.1"):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                conn.settimeout(5)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello from superlink")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        sock.close()


def _client(ca: Path, port: int, server_hostname: str, connect_host: str = "127.0.0.1",
            family=socket.AF_INET) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))  # only trust anchor: this CA (no system store)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    with socket.create_connection((connect_host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(100)


def test_tls_handshake_loopback(certs, other_ca):
    with _tls_server(certs["server_cert"], certs["server_key"]) as port:
        assert _client(certs["ca_cert"], port, "127.0.0.1") == b"hello from superlink"
        assert _client(certs["ca_cert"], port, "localhost") == b"hello from superlink"
        assert _client(certs["ca_cert"], port, "superlink.example.org") == b"hello from superlink"
        with pytest.raises(ssl.SSLCertVerificationError):
            _client(other_ca["ca_cert"], port, "127.0.0.1")  # trusting a different CA
        with pytest.raises(ssl.SSLCertVerificationError):
            _client(certs["ca_cert"], port, "not-in-san.example.org")  # name not in SAN


def test_tls_handshake_ipv6(certs):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with _tls_server(certs["server_cert"], certs["server_key"], socket.AF_INET6, "::1") as port:
            assert _client(certs["ca_cert"], port, "::1", "::1", socket.AF_INET6) == b"hello from superlink"
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SUPERLINK = Path(sys.executable).parent / "flower-superlink"  # the venv's, whether or not it is on PATH


@pytest.mark.skipif(not SUPERLINK.exists(), reason="flower-superlink not installed in this environment")
def test_superlink_serves_our_certificate(certs, tmp_path):
    """flower-superlink starts with these files (EC P-384) and presents a certificate our CA verifies."""
    port, fleet, control = _free_port(), _free_port(), _free_port()
    cmd = [str(SUPERLINK), "--ssl-ca-certfile", str(certs["ca_cert"]), "--ssl-certfile",
           str(certs["server_cert"]), "--ssl-keyfile", str(certs["server_key"]),
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
           "--fleet-api-address", f"127.0.0.1:{fleet}", "--control-api-address", f"127.0.0.1:{control}",
           "--database", str(tmp_path / "state.db")]
    from fedrad.server.runtime import flower_env  # the venv's bin first on PATH: Flower spawns its tools by name

    env = flower_env(tmp_path / "home")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        ctx = ssl.create_default_context(cafile=str(certs["ca_cert"]))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        deadline, last = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                        assert peer == _load(certs["server_cert"])
                        return
            except (ConnectionRefusedError, socket.timeout, TimeoutError) as exc:
                last = exc
                time.sleep(0.3)
        pytest.fail(f"flower-superlink did not accept TLS on port {port}: {last}")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------- node keys
def test_node_keys_round_trip(tmp_path):
    priv_path, pub_path = make_node_keys(tmp_path / "keys", "site1_auth")
    assert priv_path.name == "site1_auth" and pub_path.name == "site1_auth.pub"
    assert _mode(priv_path) == 0o600 and _mode(pub_path) == 0o644
    assert priv_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = pub_path.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.endswith("\n") and len(line.split()) == 2
    priv = serialization.load_ssh_private_key(priv_path.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()


def test_node_keys_refuse_overwrite(tmp_path):
    priv_path, pub_path = make_node_keys(tmp_path)
    assert priv_path.name == "node"
    old = pub_path.read_bytes()
    with pytest.raises(FileExistsError, match="node"):
        make_node_keys(tmp_path)
    assert pub_path.read_bytes() == old
    os.chmod(priv_path, 0o644)
    make_node_keys(tmp_path, overwrite=True)
    assert pub_path.read_bytes() != old and _mode(priv_path) == 0o600
    for bad in ("", "a/b", ".hidden", "../x"):
        with pytest.raises(ValueError):
            make_node_keys(tmp_path, bad)


def test_fingerprint(tmp_path):
    priv_path, pub_path = make_node_keys(tmp_path, "k")
    fp = public_key_fingerprint(pub_path)
    assert fp.startswith("SHA256:") and len(fp) == len("SHA256:") + 43 and "=" not in fp
    assert public_key_fingerprint(priv_path) == fp  # also from the private key
    other = public_key_fingerprint(make_node_keys(tmp_path, "other")[1])
    assert other != fp
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(ValueError):
        public_key_fingerprint(tmp_path / "junk.pub")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path):
    priv_path, pub_path = make_node_keys(tmp_path, "k")
    for p in (pub_path, priv_path):
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(p)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[0] == "384" and out[1] == public_key_fingerprint(pub_path) and out[-1] == "(ECDSA)"
