"""A site's SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower expects).

``make_node_keys(out_dir, name)`` writes ``<name>`` (private key, mode 0600, ``-----BEGIN OPENSSH PRIVATE
KEY-----``) and ``<name>.pub`` (``ecdsa-sha2-nistp384 AAAA...``, mode 0644): the same files
``ssh-keygen -t ecdsa -b 384`` makes. The private key stays at the hospital
(``flower-supernode --auth-supernode-private-key <name>``); the public key goes to the coordinator, who
registers it (``flwr supernode register <name>.pub ...``). Compare ``public_key_fingerprint`` on both sides
over a second channel (phone, signed e-mail) before registering: it is what proves the key is the site's.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.common.files import write_with_mode

_PRIVATE_MARK = b"-----BEGIN OPENSSH PRIVATE KEY-----"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("key name must be a non-empty file name")
    if name != name.strip() or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"key name {name!r} must be a plain file name (no path separators, no leading dot)")


def make_node_keys(out_dir: str | os.PathLike, name: str = "node", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``out_dir/<name>`` (OpenSSH private key, 0600) and ``out_dir/<name>.pub`` (0644).

    Returns ``(private_path, public_path)``. Raises ``FileExistsError`` naming the file(s) if either exists
    (unless ``overwrite``), ``ValueError`` for a bad name. Nothing is written when refused.
    """
    _check_name(name)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    private_path, public_path = out / name, out / f"{name}.pub"
    if not overwrite:
        existing = [str(p) for p in (private_path, public_path) if os.path.lexists(p)]
        if existing:
            raise FileExistsError(f"refusing to overwrite existing file(s): {', '.join(existing)} "
                                  "(use overwrite=True / --force)")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_with_mode(private_path, private, 0o600, overwrite)
    try:
        write_with_mode(public_path, public + b"\n", 0o644, overwrite)
    except BaseException:
        if not overwrite:
            private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def load_public_key_line(path: str | os.PathLike) -> bytes:
    """The ``"<type> <base64>"`` OpenSSH public key of a public *or* private key file (validated)."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(_PRIVATE_MARK):
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable unencrypted OpenSSH private key ({exc})") from None
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    lines = [ln for ln in data.splitlines() if ln.strip() and not ln.lstrip().startswith(b"#")]
    if len(lines) != 1:
        raise ValueError(f"{path}: expected one OpenSSH public key line, found {len(lines)}")
    line = lines[0].strip()
    try:
        serialization.load_ssh_public_key(line)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not an OpenSSH public key ({exc})") from None
    return b" ".join(line.split()[:2])


def public_key_fingerprint(path: str | os.PathLike) -> str:
    """OpenSSH-style fingerprint ``SHA256:<base64, no padding>`` of a public (or private) key file.

    SHA-256 over the decoded key blob (the base64 field of the ``.pub`` line), exactly what
    ``ssh-keygen -l -E sha256 -f FILE`` prints.
    """
    blob = base64.b64decode(load_public_key_line(path).split()[1], validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
