"""The site's audit log: every outgoing payload is appended here *before* it is sent; the log is hash-chained.

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
``prev``            the previous record's ``hash`` (``"0" * 64`` for the first record)
``hash``            SHA-256 (hex) of ``canonical_json(record without "hash")``

``canonical_json(x)`` = ``json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False)`` encoded as ASCII. Floats are written with Python's shortest round-trip ``repr`` and read
back bit for bit, so re-serializing a parsed line reproduces the hashed bytes (the line itself may be
formatted differently; only its parsed content counts).

Editing any field of a record breaks its ``hash``; dropping, inserting or reordering records breaks ``seq``
and ``prev``; a crash mid-write leaves an unterminated last line. :func:`verify_audit` reports each.
What a chain cannot show on its own: someone able to rewrite the whole file can recompute every hash, and
cutting records off the *end* leaves a valid shorter chain. Note the head (``n_records`` + last ``hash``,
printed by :func:`summarize_audit`) somewhere else (the DPO's records, a ticket) to pin it.

Concurrency: each Flower message may run in a fresh process, so two appends can race. ``record`` takes an
exclusive ``fcntl.flock`` on the log, reads the last record's ``seq`` and ``hash``, appends one line with a
single ``O_APPEND`` write, ``fsync``\\ s, then unlocks. If the last line is incomplete or not a chained
record, ``record`` refuses (``AuditLogError``) instead of starting a broken chain: the site sends nothing until
the log is checked (``fedrad site audit``) and moved aside.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fedrad.common.messages import REQUESTS, split_payload

GENESIS = "0" * 64
FILENAME = "audit.jsonl"
#: Fields every chained record carries (``hash`` last).
FIELDS = ("seq", "time", "site", "request", "status", "n_values", "shapes", "payload_sha256", "payload",
          "arrays", "prev", "hash")


class AuditLogError(RuntimeError):
    """The audit log cannot be appended to safely (damaged tail, not a chained log)."""


# ------------------------------------------------------------------------------------------- hashing
def canonical_json(obj) -> bytes:
    """The byte string that is hashed: sorted keys, no whitespace, ASCII escapes, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def payload_digest(payload, arrays) -> str:
    """``payload_sha256`` of a record: SHA-256 of ``canonical_json({"arrays": arrays, "payload": payload})``."""
    return hashlib.sha256(canonical_json({"arrays": arrays, "payload": payload})).hexdigest()


def record_digest(record: dict) -> str:
    """``hash`` of a record: SHA-256 of the canonical JSON of every field except ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _listify(arrays: dict) -> dict:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.tolist()} for k, v in arrays.items()}


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


# ------------------------------------------------------------------------------------------- writing
def _read_tail(fd: int, path: Path) -> tuple[int, str]:
    """(next seq, previous hash) from the last line of the open log (caller holds the lock)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) != b"\n":
        raise AuditLogError(f"{path}: the last line is incomplete (crash or edit during a write); nothing is "
                            "sent until the log is checked: run `fedrad site audit` and move the log aside")
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
    try:
        last = json.loads(tail)
        seq, prev = last["seq"], last["hash"]
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(prev, str) or len(prev) != 64:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AuditLogError(f"{path}: the last line is not a chained audit record (an old-format or damaged log); "
                            "run `fedrad site audit` and move the log aside to start a new chain") from None
    return seq + 1, prev


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class AuditLog:
    """Append-only, hash-chained JSON-lines log of everything a site sends (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _open_locked(self) -> int:
        """Open (creating) the log and take an exclusive lock on the file that is at ``path`` right now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)  # the log was moved aside while we waited: lock the new file instead

    def record(self, site: str, request: str, payload: dict, status: str = "sent") -> dict:
        """Append one record for ``payload`` (flushed and fsynced before returning); returns the record."""
        skeleton, arrays = split_payload(payload)
        body = json.loads(skeleton)
        listed = _listify(arrays)
        try:
            digest = payload_digest(body, listed)
        except ValueError:
            bad = [k for k, v in arrays.items() if v.dtype.kind in "fc" and not _all_finite(v)]
            raise ValueError(f"audit: {request} payload has non-finite values in array(s) {', '.join(bad)}; "
                             "refusing to send") from None
        fd = self._open_locked()
        try:
            seq, prev = _read_tail(fd, self.path)
            entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                     "site": site, "request": request, "status": status,
                     "n_values": _array_count(listed) + _count_numbers(body),
                     "shapes": {k: v["shape"] for k, v in listed.items()}, "payload_sha256": digest,
                     "payload": body, "arrays": listed, "prev": prev}
            entry["hash"] = record_digest(entry)
            _write_all(fd, (json.dumps(entry, allow_nan=False) + "\n").encode("utf-8"))
            os.fsync(fd)
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

    def verify(self) -> "AuditReport":
        return verify_audit(self.path)

    def summary(self) -> str:
        return summarize_audit(self.path)


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
    head: str | None = None  # hash of the last record (pin it elsewhere to detect a cut-off tail)

    def __str__(self) -> str:
        if self.ok:
            return f"chain OK: {self.n_records} records, head {self.head}"
        return "\n".join([f"chain BROKEN: {len(self.problems)} problem(s) in {self.n_records} records",
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


def verify_audit(path: str | Path) -> AuditReport:
    """Check the chain of an audit log; every problem is one line naming the record and what is wrong.

    Detects: an edited record (``hash`` or ``payload_sha256`` mismatch, ``shapes``/``n_values`` not matching
    the arrays), dropped/inserted/reordered records (``seq`` gap or repeat, ``prev`` not the preceding record's
    ``hash``, first record not ``seq`` 0 with ``prev`` 0...0), a truncated last line, lines that are not JSON
    or not records. Raises ``FileNotFoundError`` if the log does not exist.
    """
    path = Path(path)
    lines = _read_lines(path)
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

    seen: dict[int, int] = defaultdict(int)
    for _, rec, _ in parsed:
        if rec is not None:
            seen[rec["seq"]] += 1
    problems: list[str] = []
    n_records = 0
    expected, prev_hash, prev_label = 0, GENESIS, "0...0 (it is the first line of the log)"
    head = None
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
        if probs:
            problems.append(f"{label}: {'; '.join(probs)}")
        expected = max(expected, seq + 1)
        prev_hash, prev_label, head = rec["hash"], f"the hash of the preceding {label}", rec["hash"]
    return AuditReport(path=path, ok=not problems, n_records=n_records, problems=problems, head=head)


def _span(seqs: list[int]) -> str:
    if len(seqs) == 1:
        return str(seqs[0])
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        return f"{seqs[0]}-{seqs[-1]}"
    return ", ".join(map(str, seqs))


def _shape_text(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def summarize_audit(path: str | Path) -> str:
    """Human summary of what left the site, per request type, and whether the chain verifies.

    Per request type: messages sent, first/last time, numbers released, largest array (name, shape; numpy
    arrays and rectangular numeric lists inside the payload alike); refusals
    with their reasons. Unreadable lines are left out of the counts (they are listed as chain problems).
    """
    path = Path(path)
    report = verify_audit(path)
    records = []
    for _, raw, _ in _read_lines(path):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "request" in rec:
            records.append(rec)
    sites = sorted({str(r.get("site")) for r in records})
    times = [str(r.get("time", "")) for r in records if r.get("time")]
    out = [f"Audit log {path}",
           f"site(s): {', '.join(sites) or '-'}; {len(records)} record(s)"
           + (f", {min(times)} to {max(times)}" if times else "")]
    by_request: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_request[str(r["request"])].append(r)
    total_sent = total_values = total_refused = 0
    for request in sorted(by_request):
        recs = by_request[request]
        sent = [r for r in recs if r.get("status", "sent") != "refused"]
        refused = [r for r in recs if r.get("status") == "refused"]
        values = sum(_record_values(r) for r in sent)
        total_sent, total_values, total_refused = total_sent + len(sent), total_values + values, \
            total_refused + len(refused)
        rtimes = [str(r.get("time", "")) for r in recs if r.get("time")]
        out.append("")
        known = REQUESTS.get(request)
        out.append(f"{request}: {len(sent)} message(s) sent" + (f", {len(refused)} refused" if refused else "")
                   + (f"; first {min(rtimes)}, last {max(rtimes)}" if rtimes else ""))
        if known:
            out.append(f"  contents: {known.aggregates}")
        out.append(f"  numbers released: {values:,}")
        largest = _largest_array(sent)
        out.append(f"  largest array: {largest[0]} {_shape_text(largest[1])} ({_n_elements(largest[1]):,} values)"
                   if largest else "  largest array: none (single numbers only)")
        for r in refused:
            reason = r.get("payload", {}).get("refused", "?") if isinstance(r.get("payload"), dict) else "?"
            out.append(f"  refused at {r.get('time', '?')}: {reason}")
    out.append("")
    out.append(f"Total: {total_sent} message(s) sent, {total_values:,} numbers released, {total_refused} refused.")
    if report.ok:
        out.append(f"Chain: VERIFIED ({report.n_records} records; head hash {report.head or GENESIS}). "
                   "Note the head hash elsewhere to detect records cut off the end later.")
    else:
        out.append(f"Chain: NOT VERIFIED ({len(report.problems)} problem(s)); the log was altered or damaged:")
        out.extend(f"  {p}" for p in report.problems)
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
    ``./audit.jsonl`` then ``./.fedrad-site/audit.jsonl`` (the site agent's default work directory)."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        if not p.is_file():
            raise FileNotFoundError(f"audit log {p} not found")
        return p
    for p in (Path(FILENAME), Path(".fedrad-site") / FILENAME):
        if p.is_file():
            return p
    raise FileNotFoundError(f"no {FILENAME} in the current directory or in .fedrad-site/; give the log's path")
