"""The coordinator's request signatures: who may ask a site anything.

A study plan names the coordinator's public signing key (``[coordinator] key`` in ``study.toml``, an OpenSSH
``ssh-ed25519`` line). The coordinator signs every request it sends with the matching private key; a site whose
approved plan names a key answers only requests that carry a valid signature by it, checked before anything else
(no ledger state changes and no study attempt is used by a request that fails the check).

What a signature covers (:func:`signed_fields`): the plan id, the request type, the destination node (the site's
own SuperNode id, which the site takes from its Flower context, never from the message), a random session id
chosen by the coordinator for one :class:`~fedrad.server.federation.Federation`, the round number within that
session (strictly increasing at each site: a request is never answered twice), and the SHA-256 of the encoded
payload. Anyone without the private key -- an outsider who can reach the SuperLink, a SuperExec or ServerApp
that is not the coordinator's -- can neither forge a request nor replay one to another site, session or round.

Pure functions on bytes and strings (``cryptography`` only); keys on disk are written owner-only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

#: version of the signed-fields layout
VERSION = 1
#: a session id: 32 hex digits (128 random bits)
SESSION = re.compile(r"^[0-9a-f]{32}$")
KEY_FILE = "signing.key"
PUB_FILE = "signing.pub"


class SigningError(ValueError):
    """A key is malformed or missing (the message names it and what to do)."""


def parse_public_key(line: str):
    """The Ed25519 public key of an OpenSSH line ``ssh-ed25519 AAAA... [comment]`` (raises :class:`SigningError`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not isinstance(line, str) or not line.startswith("ssh-ed25519 "):
        raise SigningError("a coordinator key is an OpenSSH line starting with 'ssh-ed25519 ' "
                           "(`fedrad coordinator keys` prints it)")
    try:
        key = load_ssh_public_key(" ".join(line.split()[:2]).encode())
    except (ValueError, TypeError) as exc:
        raise SigningError(f"the coordinator key is not a valid ssh-ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError("the coordinator key must be an Ed25519 key")
    return key


def public_line(line: str) -> str:
    """The canonical form of a public key line (type and base64 blob, no comment)."""
    parse_public_key(line)
    return " ".join(line.split()[:2])


def fingerprint(line: str) -> str:
    """``SHA256:...`` of the key blob, as ``ssh-keygen -lf`` prints it (what operators compare by phone)."""
    blob = base64.b64decode(public_line(line).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Signer:
    """The coordinator's private signing key and its public line."""

    private: object
    public: str

    @classmethod
    def generate(cls) -> "Signer":
        """A fresh key that lives only in memory (one-person rehearsals: local runtime, in-process paths)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        return cls(key, _public_of(key))

    @classmethod
    def load(cls, home: Path) -> "Signer":
        """The key in ``home`` (``signing.key``; :func:`ensure_key` creates it)."""
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        path = Path(home) / KEY_FILE
        if not path.is_file():
            raise SigningError(f"no coordinator signing key in {home}; create it with `fedrad coordinator keys "
                               f"--home {home}`")
        try:
            key = load_ssh_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{path} is not an OpenSSH Ed25519 private key ({exc})") from None
        return cls(key, _public_of(key))

    def sign(self, fields: bytes) -> bytes:
        return self.private.sign(fields)


def _public_of(key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def ensure_key(home: Path) -> tuple[Signer, bool]:
    """The coordinator's signing key in ``home``, created (owner-only, 0600) when absent; ``(signer, created)``."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    home = Path(home)
    path = home / KEY_FILE
    if path.is_file():
        return Signer.load(home), False
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    signer = Signer.generate()
    raw = signer.private.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    (home / PUB_FILE).write_text(signer.public + "\n")
    return signer, True


def new_session() -> str:
    return secrets.token_hex(16)


def signed_fields(plan: str, request: str, node: int, session: str, seq: int, digest: str) -> bytes:
    """The exact bytes a request signature covers (canonical JSON)."""
    doc = {"v": VERSION, "plan": str(plan), "request": str(request), "node": int(node), "session": str(session),
           "seq": int(seq), "payload": str(digest)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def verify(public: str, fields: bytes, signature: bytes) -> bool:
    """True when ``signature`` is the key's signature of ``fields``."""
    from cryptography.exceptions import InvalidSignature

    try:
        parse_public_key(public).verify(bytes(signature), fields)
        return True
    except (InvalidSignature, SigningError, TypeError, ValueError):
        return False
