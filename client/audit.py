"""The site's audit log: every outgoing payload is appended here *before* it is sent; hash-chained and MAC'd.

One JSON object per line (``audit.jsonl`` in the site's work directory), append-only. Each record holds:

``seq``             0, 1, 2, ... (position in the chain)
``time``            UTC, ISO 8601 with milliseconds (taken under the file lock, so it grows with ``seq``)
``site``, ``request``, ``status``   who sent, which request type, ``"sent"`` or ``"refused"``
``n_values``        how many numbers left: every element of every array plus every numeric (non-bool)
                    scalar in ``payload``
``shapes``          array name -> shape
``payload_sha256``  SHA-256 (hex) of ``canonical_json({"arrays": arrays, "payload": payload})``
``payload``         the payload as sent, each array replaced by ``{"__array__": name}``
``arrays``          name -> ``{"dtype", "shape", "values"}`` (values as nested lists): the data protection
                    officer can see exactly what left the hospital
``plan``            (optional) the id of the study, harmonization or fit plan the request named: the approved
                    plan it was checked against, or for a refusal the id the request claimed
``prev``            the previous record's ``hash`` (``"0" * 64`` for the first record)
``hash``            SHA-256 (hex) of ``canonical_json(record without "hash" and "mac")``
``mac``             HMAC-SHA256 (hex) with the site's audit key of ``b"fedrad-audit-record-v1\\0" +
                    canonical_json(record without "mac")`` -- so it covers ``prev`` and ``hash`` too

``canonical_json(x)`` = ``json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False)`` encoded as ASCII. Floats are written with Python's shortest round-trip ``repr`` and read
back bit for bit, so re-serializing a parsed line reproduces the hashed bytes (the line itself may be
formatted differently; only its parsed content counts).

Three files, all created mode 0600 (an existing group/world-readable log is tightened on the next append):

``audit.jsonl``   the log
``audit.key``     the site's audit key: 32 random bytes, created with the first record, next to the log
                  (``AuditLog(path, key_path=...)`` / ``fedrad site audit --key`` for another place, e.g. a
                  directory only the site agent's account can read)
``audit.anchor``  (``<log name>.anchor``) the chain's head: ``seq`` and ``hash`` of the last record and
                  ``mac_from`` (first record carrying a MAC), itself MAC'd (``b"fedrad-audit-anchor-v1\\0"``);
                  rewritten atomically (temp file, fsync, rename, directory fsync) after every append

What :func:`verify_audit` detects: editing any field of a record (``hash``, ``payload_sha256`` and ``mac``
mismatch); dropping, inserting or reordering records (``seq`` and ``prev``); a crash mid-write (an
unterminated last line); a log rewritten with recomputed SHA-256 hashes (every changed record's ``mac``
fails without the key); records cut off the end, or the log emptied (the anchor names a later last record);
the log deleted while its anchor or (for ``audit.jsonl``) the key next to it remains; the anchor or key
deleted while the log has MAC'd records. ``record`` refuses (``AuditLogError``: the site sends nothing) in
every one of those states instead of silently starting a new chain at record 0. The log is written before
the anchor, so a crash between the two leaves one valid record after the anchor's head; that is accepted
(reported as a note) and the next append updates the anchor.

What it does NOT protect against: anyone who can read the key -- on the site host, the site agent's account
and root -- can rewrite the log, recompute every MAC and the anchor, and nothing here shows it; the same
holds for deleting log, anchor and key together (the next record starts a new chain at 0) or restoring an
older log + anchor pair. The remedy is outside the host: ``fedrad site audit`` prints the last record's
sequence number and hash ("last record: #N sha256 ..."); note it regularly somewhere the site host cannot
rewrite (the DPO's records, a ticket, a copy of the log) and compare: a later log must contain that record
with that hash. ``fedrad site audit --no-key`` checks only the plain hash chain and says that MACs were not
checked. A log written before MACs existed is adopted on the next append (records before ``mac_from`` have
no MAC and are pinned only by the first MAC'd record's ``prev``).

Concurrency: each Flower message may run in a fresh process, so two appends can race. ``record`` takes an
exclusive ``fcntl.flock`` on the log, reads the last record and checks it against the anchor, appends one
line with a single ``O_APPEND`` write, ``fsync``\\ s, rewrites the anchor, then unlocks. If the last line is
incomplete or not a chained record, or the log and anchor disagree, ``record`` refuses (``AuditLogError``)
instead of starting a broken chain: the site sends nothing until the log is checked (``fedrad site audit``)
and log, anchor and key are moved aside together.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fedrad.common.messages import REQUESTS, split_payload

GENESIS = "0" * 64
FILENAME = "audit.jsonl"
KEY_FILENAME = "audit.key"
ANCHOR_SUFFIX = ".anchor"
KEY_BYTES = 32
#: where :func:`find_audit_log` looks without a path: here, ``fedrad site join``'s default work directory, then the
#: default of a site.toml without ``workdir``
DEFAULT_WORKDIRS = (".", "fedrad-site", ".fedrad-site")
#: Fields every chained record carries (``hash`` last; ``mac`` follows it in records written with a key).
FIELDS = ("seq", "time", "site", "request", "status", "n_values", "shapes", "payload_sha256", "payload",
          "arrays", "prev", "hash")
_RECORD_DOMAIN = b"fedrad-audit-record-v1\x00"
_ANCHOR_DOMAIN = b"fedrad-audit-anchor-v1\x00"
_MOVE_ASIDE = ("nothing is sent until the log is checked: run `fedrad site audit`, then move the log, its "
               ".anchor and audit.key aside together (keep them for the DPO) to start a new chain")


class AuditLogError(RuntimeError):
    """The audit log cannot be appended to safely (damaged tail, not a chained log, log/anchor/key disagree)."""

# ------------------------------------------------------------------------------------------- hashing
def canonical_json(obj) -> bytes:
    """The byte string that is hashed: sorted keys, no whitespace, ASCII escapes, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _canonical_with(fields: dict, encoded: dict[str, bytes]) -> bytes:
    """``canonical_json({**fields, **values})`` where ``encoded`` holds the canonical JSON of some values already:
    a canonical object is its sorted members joined, so a large member is encoded once for every digest."""
    members = {**{k: canonical_json(v) for k, v in fields.items()}, **encoded}
    return b"{" + b",".join(canonical_json(k) + b":" + members[k] for k in sorted(members)) + b"}"


def payload_digest(payload, arrays) -> str:
    """``payload_sha256`` of a record: SHA-256 of ``canonical_json({"arrays": arrays, "payload": payload})``."""
    return hashlib.sha256(canonical_json({"arrays": arrays, "payload": payload})).hexdigest()


def record_digest(record: dict) -> str:
    """``hash`` of a record: SHA-256 of the canonical JSON of every field except ``hash`` and ``mac``."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k not in ("hash", "mac")})).hexdigest()


def record_mac(record: dict, key: bytes) -> str:
    """``mac`` of a record: HMAC-SHA256 with the audit key over the canonical JSON of every field but ``mac``."""
    return hmac.new(key, _RECORD_DOMAIN + canonical_json({k: v for k, v in record.items() if k != "mac"}),
                    hashlib.sha256).hexdigest()


def anchor_mac(anchor: dict, key: bytes) -> str:
    """``mac`` of an anchor: HMAC-SHA256 over the canonical JSON of every anchor field but ``mac``."""
    return hmac.new(key, _ANCHOR_DOMAIN + canonical_json({k: v for k, v in anchor.items() if k != "mac"}),
                    hashlib.sha256).hexdigest()


def _mac_ok(obj: dict, key: bytes, fn) -> bool:
    mac = obj.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, fn(obj, key))


def _listify(arrays: dict) -> dict:
    names: dict = {}  # str(dtype) once per dtype: a round's reply holds thousands of small arrays
    return {k: {"dtype": names[v.dtype] if v.dtype in names else names.setdefault(v.dtype, str(v.dtype)),
                "shape": list(v.shape), "values": v.tolist()} for k, v in arrays.items()}


def _count_numbers(obj) -> int:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return 0
    if isinstance(obj, (int, float)):
        return 1
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return 0  # counted with the arrays
        return sum(_count_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_count_numbers(v) for v in obj)
    return 0


def _n_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _array_count(arrays: dict) -> int:
    return sum(_n_elements(a["shape"]) for a in arrays.values())


# ------------------------------------------------------------------------------------------- key and anchor
def default_key_path(log_path: str | Path) -> Path:
    """Where the audit key lives unless told otherwise: ``audit.key`` in the log's directory."""
    return Path(log_path).parent / KEY_FILENAME


def anchor_path(log_path: str | Path) -> Path:
    """The log's anchor file: ``audit.jsonl`` -> ``audit.anchor`` (same directory, suffix replaced)."""
    return Path(log_path).with_suffix(ANCHOR_SUFFIX)


def _orphan_key_means_deleted(log_path: Path, key_path: Path) -> bool:
    """A key next to the site's own ``audit.jsonl`` was created with its first record: if it exists while the
    log's anchor does not, the anchor (and perhaps the log) was deleted."""
    return log_path.name == FILENAME and Path(os.path.abspath(key_path)) == Path(
        os.path.abspath(default_key_path(log_path))) and Path(key_path).exists()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh 0600 temp file next to ``path`` (fsynced); returns the temp file's path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def load_key(path: str | Path) -> bytes | None:
    """The audit key at ``path`` (exactly 32 bytes), or None if there is none; AuditLogError if malformed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditLogError(f"audit key {path} cannot be read: {exc}") from None
    if len(data) != KEY_BYTES:
        raise AuditLogError(f"{path} is not an audit key ({len(data)} bytes, expected {KEY_BYTES})")
    return data


def create_key(path: str | Path) -> bytes:
    """Create the audit key at ``path`` (32 bytes from ``secrets``, mode 0600) unless one exists; return it.

    Written to a temp file and hard-linked into place, so a concurrent creator never sees a partial key and
    an existing key is never overwritten."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _write_new_file(path, secrets.token_bytes(KEY_BYTES))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # someone else created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    key = load_key(path)
    assert key is not None
    return key


def read_anchor(path: str | Path) -> dict | None:
    """The parsed anchor at ``path`` (structure checked, MAC not), None if absent; AuditLogError if malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditLogError(f"anchor {path} cannot be read: {exc}") from None
    try:
        anchor = json.loads(raw)
        ok = (isinstance(anchor, dict) and all(k in anchor for k in ("seq", "hash", "mac_from", "mac"))
              and all(isinstance(anchor[k], int) and not isinstance(anchor[k], bool) for k in ("seq", "mac_from"))
              and anchor["seq"] >= 0 and isinstance(anchor["hash"], str) and len(anchor["hash"]) == 64
              and isinstance(anchor["mac"], str))
    except ValueError:
        ok = False
    if not ok:
        raise AuditLogError(f"anchor {path} is damaged (not a fedrad audit anchor)")
    return anchor


def write_anchor(path: str | Path, seq: int, head: str, mac_from: int, key: bytes,
                 line_sha256: str | None = None) -> dict:
    """Atomically replace the anchor: temp file (0600, fsynced), rename over ``path``, fsync the directory.
    ``line_sha256``: SHA-256 of the last record's line as written (lets the next append skip parsing it)."""
    path = Path(path)
    anchor = {"format": "fedrad-audit-anchor/1", "seq": seq, "hash": head, "mac_from": mac_from,
              "updated": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
              **({"line_sha256": line_sha256} if line_sha256 is not None else {})}
    anchor["mac"] = anchor_mac(anchor, key)
    tmp = _write_new_file(path, canonical_json(anchor) + b"\n")
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return anchor


def _tighten(path: Path) -> None:
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------- writing
def _read_tail(fd: int, path: Path, line_sha256: str | None = None) -> tuple[int, str, dict | None]:
    """(next seq, previous hash, last record) from the last line of the open log (caller holds the lock).
    ``line_sha256``: the anchor's hash of the last line; when the line has it, only its ``seq``, ``prev``, ``hash``
    and ``mac`` are read (what appending needs when the anchor names that record)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS, None
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) != b"\n":
        raise AuditLogError(f"{path}: the last line is incomplete (crash or edit during a write); {_MOVE_ASIDE}")
    # walk back to the newline before the last line
    chunk, pos, tail = 1 << 16, size - 1, b""
    while pos > 0:
        start = max(0, pos - chunk)
        os.lseek(fd, start, os.SEEK_SET)
        block = os.read(fd, pos - start)
        tail = block + tail
        pos = start
        cut = tail.rfind(b"\n")
        if cut >= 0:
            tail = tail[cut + 1:]
            break
    if line_sha256 is not None and hashlib.sha256(tail).hexdigest() == line_sha256:
        # the very line the anchor names (a forged anchor fails its MAC check next): its head and tail are all the
        # next record needs, without parsing the whole payload again
        head, end = _HEAD.match(tail), _TAIL.search(tail)
        if head and end:
            return int(head.group(1)) + 1, end.group(2).decode(), {
                "seq": int(head.group(1)), "prev": end.group(1).decode(), "hash": end.group(2).decode(),
                "mac": end.group(3).decode()}
    try:
        last = json.loads(tail)
        seq, prev = last["seq"], last["hash"]
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(prev, str) or len(prev) != 64:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AuditLogError(f"{path}: the last line is not a chained audit record (an old-format or damaged log); "
                            f"{_MOVE_ASIDE}") from None
    return seq + 1, prev, last


#: the first and last members of a record line as :meth:`AuditLog.record` writes it
_HEAD = re.compile(rb'\{"seq": (0|[1-9][0-9]{0,17}), "time": "')
_TAIL = re.compile(rb', "prev": "([0-9a-f]{64})", "hash": "([0-9a-f]{64})", "mac": "([0-9a-f]{64})"\}\Z')


def _line(entry: dict, key: str, encoded: bytes) -> bytes:
    """The record's line: ``json.dumps(entry)`` with member ``key`` written as its canonical JSON ``encoded`` (the
    same parsed content; the largest member is not encoded a second time)."""
    keys = list(entry)
    i = keys.index(key)
    before = json.dumps({k: entry[k] for k in keys[:i]}, allow_nan=False)[1:-1]
    after = json.dumps({k: entry[k] for k in keys[i + 1:]}, allow_nan=False)[1:-1]
    member = f"{json.dumps(key)}: ".encode() + encoded
    return b"{" + b", ".join(p for p in (before.encode(), member, after.encode()) if p) + b"}\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class AuditLog:
    """Append-only, hash-chained, MAC'd JSON-lines log of everything a site sends (see the module docstring).

    ``key_path``: the audit key (default ``audit.key`` next to the log; created with the first record).
    """

    def __init__(self, path: str | Path, key_path: str | Path | None = None):
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path is not None else default_key_path(self.path)
        self.anchor_path = anchor_path(self.path)

    def _refuse_if_deleted(self) -> None:
        """The log is absent: refuse if its anchor (or the key created with it) says it existed."""
        if self.anchor_path.exists():
            raise AuditLogError(f"{self.path} is missing but its anchor {self.anchor_path} exists: the audit log "
                                f"was deleted or moved; refusing to start a new chain at record 0; {_MOVE_ASIDE}")
        if _orphan_key_means_deleted(self.path, self.key_path):
            raise AuditLogError(f"{self.path} and its anchor are missing but the audit key {self.key_path} exists: "
                                f"the log was deleted or moved; refusing to start a new chain at record 0; "
                                f"{_MOVE_ASIDE}")

    def _open_locked(self) -> int:
        """Open (creating) the log and take an exclusive lock on the file that is at ``path`` right now."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            if not self.path.exists():
                self._refuse_if_deleted()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same and os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)  # a log written before 0600 (or copied in) is tightened
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)  # the log was moved aside while we waited: lock the new file instead

    def _check_state(self, next_seq: int, last: dict | None) -> tuple[bytes, int]:
        """(key, mac_from) to append record ``next_seq`` after ``last``; AuditLogError if log, anchor and key
        disagree (caller holds the lock)."""
        anchor = read_anchor(self.anchor_path)
        key = load_key(self.key_path)
        if anchor is not None:
            if key is None:
                raise AuditLogError(f"{self.path}: its anchor exists but the audit key {self.key_path} is missing "
                                    f"(deleted or moved?); {_MOVE_ASIDE}")
            _tighten(self.key_path)
            if not _mac_ok(anchor, key, anchor_mac):
                raise AuditLogError(f"{self.anchor_path}: the anchor's MAC does not verify (anchor forged, or a "
                                    f"different key {self.key_path}); {_MOVE_ASIDE}")
            a_seq, a_hash = anchor["seq"], anchor["hash"]
            if last is None:
                raise AuditLogError(f"{self.path} is empty but its anchor says the last record is #{a_seq}: the log "
                                    f"was emptied or replaced; {_MOVE_ASIDE}")
            if last["seq"] == a_seq and last["hash"] == a_hash:
                pass
            elif last["seq"] == a_seq + 1 and last.get("prev") == a_hash and last["hash"] == record_digest(last) \
                    and _mac_ok(last, key, record_mac):
                pass  # a crash between the log write and the anchor update: the anchor is updated below
            elif last["seq"] < a_seq:
                raise AuditLogError(f"{self.path}: the log ends at record #{last['seq']} but its anchor says the last "
                                    f"record is #{a_seq}: records were cut off the end; {_MOVE_ASIDE}")
            else:
                raise AuditLogError(f"{self.path}: the last record #{last['seq']} does not match the anchor "
                                    f"(#{a_seq} sha256 {a_hash}): the log was replaced or rewritten; {_MOVE_ASIDE}")
            return key, anchor["mac_from"]
        if last is not None and "mac" in last:
            raise AuditLogError(f"{self.path}: the log has MAC'd records but its anchor {self.anchor_path} is missing "
                                f"(deleted?); {_MOVE_ASIDE}")
        if _orphan_key_means_deleted(self.path, self.key_path):
            raise AuditLogError(f"{self.path}: the audit key {self.key_path} exists but the log's anchor does not: "
                                f"the anchor was deleted (or a crash hit the first record); {_MOVE_ASIDE}")
        if key is None:
            key = create_key(self.key_path)
        else:
            _tighten(self.key_path)
        return key, next_seq  # a new chain (mac_from 0) or a pre-MAC log adopted from here on

    def record(self, site: str, request: str, payload: dict, status: str = "sent", plan: str | None = None) -> dict:
        """Append one record for ``payload`` (log and anchor fsynced before returning); returns the record.
        ``plan``: the id of the plan the request belongs to (the summary groups releases by plan and attempt)."""
        skeleton, arrays = split_payload(payload)
        body = json.loads(skeleton)
        listed = _listify(arrays)
        try:  # payload and arrays are encoded once; the digest, hash, MAC and line reuse those bytes
            raw = {"payload": canonical_json(body), "arrays": canonical_json(listed)}
            digest = hashlib.sha256(_canonical_with({}, raw)).hexdigest()
        except ValueError:
            bad = [k for k, v in arrays.items() if v.dtype.kind in "fc" and not _all_finite(v)]
            raise ValueError(f"audit: {request} payload has non-finite values in array(s) {', '.join(bad)}; "
                             "refusing to send") from None
        fd = self._open_locked()
        try:
            try:
                expected = (read_anchor(self.anchor_path) or {}).get("line_sha256")
            except AuditLogError:
                expected = None  # reported by the state check below
            seq, prev, last = _read_tail(fd, self.path, expected)
            key, mac_from = self._check_state(seq, last)
            entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                     "site": site, "request": request, "status": status,
                     "n_values": _array_count(listed) + _count_numbers(body),
                     "shapes": {k: v["shape"] for k, v in listed.items()}, "payload_sha256": digest,
                     "payload": body, "arrays": listed, **({"plan": str(plan)} if plan else {}), "prev": prev}
            fields = {k: v for k, v in entry.items() if k not in raw}
            entry["hash"] = hashlib.sha256(_canonical_with(fields, raw)).hexdigest()
            fields["hash"] = entry["hash"]
            entry["mac"] = hmac.new(key, _RECORD_DOMAIN + _canonical_with(fields, raw), hashlib.sha256).hexdigest()
            line = _line(entry, "arrays", raw["arrays"])
            _write_all(fd, line)
            os.fsync(fd)
            write_anchor(self.anchor_path, seq, entry["hash"], mac_from, key,
                         line_sha256=hashlib.sha256(line[:-1]).hexdigest())
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return entry

    def entries(self) -> list[dict]:
        """Every record (parsed lines, blank lines skipped; no verification: see :meth:`verify`)."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def verify(self, check_mac: bool = True) -> "AuditReport":
        return verify_audit(self.path, self.key_path, check_mac=check_mac)

    def summary(self, check_mac: bool = True) -> str:
        return summarize_audit(self.path, self.key_path, check_mac=check_mac)


def _all_finite(v) -> bool:
    return bool(np.isfinite(v).all())


# ------------------------------------------------------------------------------------------- reading
@dataclass
class AuditReport:
    """Result of :func:`verify_audit`. ``problems``: one line each, naming the record (seq) and line number."""

    path: Path
    ok: bool
    n_records: int
    problems: list[str] = field(default_factory=list)
    head: str | None = None  # hash of the last record (compare it with a copy held elsewhere)
    last_seq: int | None = None  # seq of the last record
    macs_checked: bool = False  # True: every record's and the anchor's MAC was checked with the key
    mac_status: str = ""  # one line: which key checked the MACs, or why they were not checked
    notes: list[str] = field(default_factory=list)  # not problems (a legacy prefix, a crash before the anchor update)

    def __str__(self) -> str:
        macs = "MACs checked" if self.macs_checked else "MACs NOT checked (plain hash chain only)"
        if self.ok:
            return f"chain OK: {self.n_records} records, head {self.head}; {macs}"
        return "\n".join([f"chain BROKEN: {len(self.problems)} problem(s) in {self.n_records} records; {macs}",
                          *(f"  {p}" for p in self.problems)])


def _read_lines(path: Path) -> list[tuple[int, bytes, bool]]:
    """(line number, raw bytes, terminated by newline) for every line of the file."""
    data = Path(path).read_bytes()
    parts = data.split(b"\n")
    last_terminated = parts[-1] == b""
    if last_terminated:
        parts.pop()
    return [(i + 1, raw, i < len(parts) - 1 or last_terminated) for i, raw in enumerate(parts)]


def _structure_problems(rec: dict) -> list[str]:
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        return [f"not a chained audit record (missing {', '.join(missing)})"]
    bad = []
    if isinstance(rec["seq"], bool) or not isinstance(rec["seq"], int) or rec["seq"] < 0:
        bad.append(f"bad seq {rec['seq']!r}")
    for k in ("hash", "prev", "payload_sha256"):
        if not isinstance(rec[k], str) or len(rec[k]) != 64:
            bad.append(f"bad {k} {rec[k]!r}")
    if not isinstance(rec["arrays"], dict) or not all(
            isinstance(a, dict) and {"shape", "values", "dtype"} <= set(a) for a in rec["arrays"].values()):
        bad.append("bad arrays field")
    return bad


def verify_audit(path: str | Path, key_path: str | Path | None = None, *, check_mac: bool = True) -> AuditReport:
    """Check the chain, the MACs and the anchor of an audit log; every problem is one line naming what is wrong.

    Detects: an edited record (``hash``, ``payload_sha256`` or ``mac`` mismatch, ``shapes``/``n_values`` not
    matching the arrays), dropped/inserted/reordered records (``seq`` gap or repeat, ``prev`` not the preceding
    record's ``hash``, first record not ``seq`` 0 with ``prev`` 0...0), a truncated last line, lines that are
    not JSON or not records, a log rewritten with recomputed hashes (``mac`` mismatch), records cut off the end
    or a log emptied or deleted (the anchor names a later record), a missing, forged or damaged anchor, a
    missing key. ``key_path``: default ``audit.key`` next to the log. ``check_mac=False`` checks only the plain
    hash chain and the (then unauthenticated) anchor; ``macs_checked`` says which happened. Raises
    ``FileNotFoundError`` if the log does not exist and no anchor or key says it should.
    """
    path = Path(path)
    kpath = Path(key_path) if key_path is not None else default_key_path(path)
    apath = anchor_path(path)
    problems: list[str] = []
    notes: list[str] = []
    anchor, anchor_problem = None, None
    try:
        anchor = read_anchor(apath)
    except AuditLogError as exc:
        anchor_problem = str(exc)
    key, key_problem = None, None
    if check_mac:
        try:
            key = load_key(kpath)
        except AuditLogError as exc:
            key_problem = str(exc)
    if path.exists():
        lines = _read_lines(path)
    elif anchor is not None or anchor_problem is not None or _orphan_key_means_deleted(path, kpath):
        lines = []
        what = (f"its anchor {apath.name} says it held records up to #{anchor['seq']} sha256 {anchor['hash']}"
                if anchor is not None else f"its anchor {apath.name} exists" if anchor_problem is not None
                else f"the audit key {kpath} created with it exists")
        problems.append(f"log missing: {path} does not exist but {what} (deleted or moved)")
    else:
        raise FileNotFoundError(f"audit log {path} not found")

    parsed: list[tuple[int, dict | None, list[str]]] = []
    for lineno, raw, terminated in lines:
        if not raw.strip():
            parsed.append((lineno, None, ["blank line (fedrad never writes one)"]))
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            if not terminated:
                parsed.append((lineno, None, ["truncated last line (incomplete JSON, no final newline)"]))
            else:
                parsed.append((lineno, None, ["not JSON"]))
            continue
        if not isinstance(rec, dict):
            parsed.append((lineno, None, ["not a JSON object"]))
            continue
        probs = _structure_problems(rec)
        if not terminated:
            probs.append("no final newline (truncated write?)")
        parsed.append((lineno, rec if not _structure_problems(rec) else None, probs))

    has_macs = any(rec is not None and "mac" in rec for _, rec, _ in parsed)
    if key_problem is not None:
        problems.append(f"key: {key_problem}")
    elif check_mac and key is None and (has_macs or anchor is not None or anchor_problem is not None):
        problems.append(f"key missing: {kpath} does not exist, so no MAC can be checked (key deleted or moved? give "
                        "its path, or check only the plain hash chain without it)")
    macs_checked = key is not None
    if macs_checked:
        mac_status = f"MACs: checked with key {kpath} (HMAC-SHA256 over every record and the anchor)"
    elif not check_mac:
        mac_status = ("MACs: NOT checked (verified without the key): only the plain SHA-256 chain was verified; a "
                      "log rewritten with recomputed hashes would pass this check")
    else:
        mac_status = (f"MACs: NOT checked (no key at {kpath}): only the plain SHA-256 chain was verified; a log "
                      "rewritten with recomputed hashes would pass this check")
    # records from mac_from on must carry a MAC (None: a log that never had one, nothing to require)
    mac_from = anchor["mac_from"] if anchor is not None else 0 if has_macs else None
    legacy: list[int] = []

    seen: dict[int, int] = defaultdict(int)
    for _, rec, _ in parsed:
        if rec is not None:
            seen[rec["seq"]] += 1
    n_records = 0
    expected, prev_hash, prev_label = 0, GENESIS, "0...0 (it is the first line of the log)"
    head, last = None, None
    for lineno, rec, probs in parsed:
        if rec is None:
            label = f"line {lineno}"
            problems.append(f"{label}: {'; '.join(probs)}")
            prev_hash, prev_label = None, label  # what follows cannot be linked to a known hash
            continue
        n_records += 1
        seq = rec["seq"]
        label = f"record {seq} (line {lineno})"
        if record_digest(rec) != rec["hash"]:
            probs.append("edited: hash mismatch (content changed after it was written)")
        try:
            if payload_digest(rec["payload"], rec["arrays"]) != rec["payload_sha256"]:
                probs.append("edited: payload_sha256 does not match payload + arrays")
        except (ValueError, TypeError):
            probs.append("edited: payload is not canonical JSON")
        try:
            if rec["shapes"] != {k: a["shape"] for k, a in rec["arrays"].items()}:
                probs.append("shapes do not match arrays")
            if rec["n_values"] != _array_count(rec["arrays"]) + _count_numbers(rec["payload"]):
                probs.append("n_values does not match payload + arrays")
        except (TypeError, ValueError, AttributeError):
            probs.append("shapes/n_values unreadable")
        if seq > expected:
            gone = [s for s in range(expected, seq) if s not in seen]
            later = [s for s in range(expected, seq) if s in seen]
            if gone:
                probs.append(f"record(s) {_span(gone)} dropped before it (seq jumps from {expected - 1} to {seq})"
                             if expected > 0 else f"record(s) {_span(gone)} dropped before it (log starts at {seq})")
            if later:
                probs.append(f"out of order: record(s) {_span(later)} appear later in the file")
        elif seq < expected:
            if seen[seq] > 1:
                probs.append(f"seq {seq} appears {seen[seq]} times (duplicated or inserted record)")
            else:
                probs.append(f"out of order: seq {seq} after seq {expected - 1} (reordered)")
        if prev_hash is not None and rec["prev"] != prev_hash:
            probs.append(f"prev does not match {prev_label} "
                         "(a record was dropped, inserted, reordered or edited before it)")
        if "mac" in rec and not (isinstance(rec["mac"], str) and len(rec["mac"]) == 64):
            probs.append(f"bad mac {rec['mac']!r}")
        elif macs_checked:
            if "mac" in rec:
                try:
                    good = _mac_ok(rec, key, record_mac)
                except (ValueError, TypeError):
                    good = False
                if not good:
                    probs.append("MAC mismatch (written or rewritten without the site's audit key, or checked with "
                                 "a different key)")
            elif mac_from is None:
                pass
            elif seq >= mac_from:
                probs.append("no MAC (the log is MAC'd from record "
                             f"{mac_from}; this record was added or rewritten without the key)")
            else:
                legacy.append(seq)
        if probs:
            problems.append(f"{label}: {'; '.join(probs)}")
        expected = max(expected, seq + 1)
        prev_hash, prev_label, head, last = rec["hash"], f"the hash of the preceding {label}", rec["hash"], rec
    if legacy:
        notes.append(f"record(s) {_span(legacy)} predate the audit key (no MAC): they are pinned only by record "
                     f"{mac_from}'s MAC over its prev")

    # the anchor: the chain's head as of the last append
    if anchor_problem is not None:
        problems.append(f"anchor: {anchor_problem}")
    elif anchor is None:
        if has_macs or _orphan_key_means_deleted(path, kpath):
            problems.append(f"anchor missing: {apath} does not exist although the log "
                            + ("has MAC'd records" if has_macs else "has an audit key next to it")
                            + " (deleted? records cut off the end can no longer be detected here: compare the last "
                            "record's hash with the copy held elsewhere)")
        elif lines:
            notes.append("no anchor and no MACs: a log written before the audit key (the next append adds both)")
    else:
        a_seq, a_hash = anchor["seq"], anchor["hash"]
        anchor_trusted = True
        if macs_checked:
            if not _mac_ok(anchor, key, anchor_mac):
                problems.append(f"anchor: {apath.name}'s MAC does not verify (anchor forged or rewritten without the "
                                "key, or checked with a different key)")
                anchor_trusted = False
        else:
            notes.append(f"anchor {apath.name} not authenticated (MACs not checked)")
        if anchor_trusted and path.exists():
            if last is None:
                problems.append(f"truncated: the log has no records but its anchor says the last record is #{a_seq} "
                                f"sha256 {a_hash} (the log was emptied)")
            elif last["seq"] == a_seq and last["hash"] == a_hash:
                pass
            elif last["seq"] > a_seq and any(r is not None and r["seq"] == a_seq and r["hash"] == a_hash
                                             for _, r, _ in parsed):
                # the anchored record is there; what follows it is checked record by record (MAC, prev) above
                if last["seq"] == a_seq + 1:
                    notes.append(f"record {last['seq']} was written after the anchor's last update (a crash between "
                                 "the two writes; the next append updates the anchor)")
                else:
                    problems.append(f"anchor behind: it names record #{a_seq} as the last but the log goes on to "
                                    f"#{last['seq']} (the anchor was restored from an older copy?)")
            elif last["seq"] < a_seq:
                problems.append(f"truncated: the log ends at record {last['seq']} but its anchor says the last record "
                                f"is #{a_seq} sha256 {a_hash} (record(s) {_span(list(range(last['seq'] + 1, a_seq + 1)))}"
                                " cut off the end)")
            else:
                problems.append(f"anchor mismatch: the log's last record is #{last['seq']} sha256 {last['hash']} but "
                                f"its anchor says #{a_seq} sha256 {a_hash} (records replaced or the log rewritten)")
    return AuditReport(path=path, ok=not problems, n_records=n_records, problems=problems, head=head,
                       last_seq=last["seq"] if last is not None else None, macs_checked=macs_checked,
                       mac_status=mac_status, notes=notes)


def _span(seqs: list[int]) -> str:
    if len(seqs) == 1:
        return str(seqs[0])
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        return f"{seqs[0]}-{seqs[-1]}"
    return ", ".join(map(str, seqs))


def _shape_text(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _attempts(records: list[dict]) -> dict[tuple[str | None, int], list[dict]]:
    """Records grouped by (plan id, attempt), in log order. A plan's attempt is counted by its
    ``study_prepare`` records (each study attempt starts with one; the coordinator restarts from it when a site
    drops out); a harmonization or fit plan has one attempt. Records without a plan id share the key None."""
    groups: dict[tuple[str | None, int], list[dict]] = {}
    prepares: dict[str | None, int] = defaultdict(int)
    for r in records:
        plan = r.get("plan") if isinstance(r.get("plan"), str) else None
        if r.get("request") == "study_prepare":
            prepares[plan] += 1
        groups.setdefault((plan, max(1, prepares[plan])), []).append(r)
    return groups


def _request_lines(by_request: dict[str, list[dict]], indent: str) -> list[str]:
    """Per request type (in the order they first appear): messages sent and refused, first/last time, contents,
    numbers released, largest array, each refusal's reason."""
    out = []
    for request in by_request:
        recs = by_request[request]
        sent = [r for r in recs if r.get("status", "sent") != "refused"]
        refused = [r for r in recs if r.get("status") == "refused"]
        rtimes = [str(r.get("time", "")) for r in recs if r.get("time")]
        known = REQUESTS.get(request)
        out.append(f"{indent}{request}: {len(sent)} message(s) sent" + (f", {len(refused)} refused" if refused else "")
                   + (f"; first {min(rtimes)}, last {max(rtimes)}" if rtimes else ""))
        if known:
            out.append(f"{indent}  contents: {known.aggregates}")
        out.append(f"{indent}  numbers released: {sum(_record_values(r) for r in sent):,}")
        largest = _largest_array(sent)
        out.append(f"{indent}  largest array: {largest[0]} {_shape_text(largest[1])} "
                   f"({_n_elements(largest[1]):,} values)" if largest else
                   f"{indent}  largest array: none (single numbers only)")
        for r in refused:
            body = r.get("payload") if isinstance(r.get("payload"), dict) else {}
            reason = body.get("refused") or (f"{body['message']} [{body.get('error', '?')}]" if body.get("message")
                                             else "?")
            out.append(f"{indent}  refused at {r.get('time', '?')}: {reason}")
    return out


def summarize_audit(path: str | Path, key_path: str | Path | None = None, *, check_mac: bool = True,
                    report: AuditReport | None = None) -> str:
    """Human summary of what left the site, per plan and study attempt, and whether the chain verifies.

    Releases are grouped by the plan id each record carries and by attempt (a study attempt starts with its
    ``study_prepare`` request: a study restarted without a lost site is a second attempt of the same plan);
    records written without a plan id form one group of their own. Per group: messages sent and refused, numbers
    released, first/last time; within it, per request type: messages, numbers released, largest array (name,
    shape; numpy arrays and rectangular numeric lists inside the payload alike), refusals with their reasons.
    Unreadable lines are left out of the counts (they are listed as chain problems). Then the verification
    (``report``, or :func:`verify_audit` with ``key_path``/``check_mac``), the last record's seq and hash (to
    compare with a copy held elsewhere), and whether MACs were checked.
    """
    path = Path(path)
    if report is None:
        report = verify_audit(path, key_path, check_mac=check_mac)
    records = []
    for _, raw, _ in (_read_lines(path) if path.exists() else []):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "request" in rec:
            records.append(rec)
    sites = sorted({str(r.get("site")) for r in records})
    times = [str(r.get("time", "")) for r in records if r.get("time")]
    groups = _attempts(records)
    plans = {plan for plan, _ in groups if plan is not None}
    out = [f"Audit log {path}",
           f"site(s): {', '.join(sites) or '-'}; {len(records)} record(s)"
           + (f", {min(times)} to {max(times)}" if times else "")
           + (f"; {len(plans)} plan(s)" if plans else "")]
    n_attempts = defaultdict(int)
    for plan, _ in groups:
        n_attempts[plan] += 1
    total_sent = total_values = total_refused = 0
    for (plan, attempt), recs in groups.items():
        sent = [r for r in recs if r.get("status", "sent") != "refused"]
        refused = [r for r in recs if r.get("status") == "refused"]
        values = sum(_record_values(r) for r in sent)
        total_sent, total_values, total_refused = total_sent + len(sent), total_values + values, \
            total_refused + len(refused)
        gtimes = [str(r.get("time", "")) for r in recs if r.get("time")]
        title = (f"plan {plan}, attempt {attempt} of {n_attempts[plan]}" if plan is not None else
                 "records without a plan id")
        out.append("")
        out.append(f"{title}: {len(sent)} message(s) sent, {values:,} numbers released"
                   + (f", {len(refused)} refused" if refused else "")
                   + (f"; first {min(gtimes)}, last {max(gtimes)}" if gtimes else ""))
        by_request: dict[str, list[dict]] = defaultdict(list)
        for r in recs:
            by_request[str(r["request"])].append(r)
        out.extend(_request_lines(by_request, "  "))
    out.append("")
    out.append(f"Total: {total_sent} message(s) sent, {total_values:,} numbers released, {total_refused} refused.")
    if report.ok:
        out.append(f"Chain: VERIFIED ({report.n_records} records; head hash {report.head or GENESIS}). "
                   "Note the last record's hash outside this host: it also reveals a log, anchor and key replaced "
                   "together.")
    else:
        out.append(f"Chain: NOT VERIFIED ({len(report.problems)} problem(s)); the log was altered or damaged:")
        out.extend(f"  {p}" for p in report.problems)
    out.append(f"last record: #{report.last_seq} sha256 {report.head}" if report.last_seq is not None
               else "last record: none (no records)")
    out.append(report.mac_status)
    out.extend(f"note: {n}" for n in report.notes)
    return "\n".join(out)


def _record_values(rec: dict) -> int:
    n = rec.get("n_values")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    try:  # pre-chain records: count from the content
        return _array_count(rec.get("arrays", {})) + _count_numbers(rec.get("payload"))
    except (TypeError, ValueError, AttributeError):
        return 0


def _numeric_shape(obj) -> list[int] | None:
    """Shape of a number or a rectangular nested list of numbers, else None."""
    if isinstance(obj, bool):
        return None
    if isinstance(obj, (int, float)):
        return []
    if isinstance(obj, list) and obj:
        inner = [_numeric_shape(v) for v in obj]
        if inner[0] is not None and all(s == inner[0] for s in inner):
            return [len(obj), *inner[0]]
    return None


def _payload_lists(obj, prefix: str = ""):
    """(path, shape) of every maximal numeric list inside a payload (numbers sent as JSON lists)."""
    shape = _numeric_shape(obj) if isinstance(obj, list) else None
    if shape:
        yield prefix or "_", shape
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _payload_lists(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _payload_lists(v, f"{prefix}/{i}")


def _largest_array(records: list[dict]) -> tuple[str, list[int]] | None:
    """Largest array, or numeric list inside the payload, over ``records`` (by number of values)."""
    best = None
    for r in records:
        arrays = r.get("arrays") if isinstance(r.get("arrays"), dict) else {}
        candidates = [(name, a.get("shape") if isinstance(a, dict) else None) for name, a in arrays.items()]
        candidates += list(_payload_lists(r.get("payload")))
        for name, shape in candidates:
            try:
                shape = [int(d) for d in shape]
                size = _n_elements(shape)
            except (TypeError, ValueError):
                continue
            if best is None or size > best[0]:
                best = (size, name, shape)
    return (best[1], best[2]) if best else None


def find_audit_log(path: str | Path | None = None) -> Path:
    """The log to check: ``path`` itself, ``path/audit.jsonl`` for a directory, or with no argument
    ``./audit.jsonl``, ``./fedrad-site/audit.jsonl`` (``fedrad site join``'s default work directory), then
    ``./.fedrad-site/audit.jsonl`` (the work directory of a site.toml without ``workdir``, next to its table).

    A log that is missing while its anchor (or, for ``audit.jsonl``, the key next to it) exists is returned
    all the same, so that :func:`verify_audit` reports the deletion instead of "not found"."""
    def traces(p: Path) -> bool:
        return anchor_path(p).exists() or _orphan_key_means_deleted(p, default_key_path(p))

    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        if not p.is_file() and not traces(p):
            raise FileNotFoundError(f"audit log {p} not found")
        return p
    candidates = tuple(Path(d) / FILENAME for d in DEFAULT_WORKDIRS)
    for p in candidates:
        if p.is_file():
            return p
    for p in candidates:
        if traces(p):
            return p
    raise FileNotFoundError(f"no {FILENAME} in the current directory, fedrad-site/ or .fedrad-site/; give the log's "
                            "path, the site's work directory or --config site.toml")
