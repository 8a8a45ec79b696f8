"""The site's hash-chained audit log (client/audit.py): verification, tampering, concurrent appends, summary."""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import numpy as np
import pytest

from fedrad.client.audit import (GENESIS, AuditLog, AuditLogError, canonical_json, find_audit_log, payload_digest,
                                 record_digest, summarize_audit, verify_audit)


def _write_five(path):
    log = AuditLog(path)
    rng = np.random.default_rng(0)
    log.record("hospA", "combat_stats", {"n": 40, "xtx": rng.normal(size=(3, 3)), "sums": rng.normal(size=4)})
    log.record("hospA", "combat_apply", {"n": 40, "counts": np.arange(4)})
    log.record("hospA", "combat_stats", {"refused": "request not allowed by site policy"}, status="refused")
    log.record("hospA", "combat_stats", {"n": 41, "xtx": rng.normal(size=(3, 3)), "sums": rng.normal(size=4),
                                         "meta": {"features": ["a", "b"], "ok": True}})
    log.record("hospA", "combat_apply", {"n": 41, "counts": np.arange(4), "rss": [1.5, 2.5]})
    return log


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


@pytest.fixture
def log5(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_five(path)
    return path


def test_records_are_chained(log5):
    entries = AuditLog(log5).entries()
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    for a, b in zip(entries, entries[1:]):
        assert b["prev"] == a["hash"]
    for e in entries:
        assert e["hash"] == record_digest(e)
        assert e["payload_sha256"] == payload_digest(e["payload"], e["arrays"])
    first = entries[0]
    assert first["shapes"] == {"xtx": [3, 3], "sums": [4]}
    assert first["n_values"] == 9 + 4 + 1  # arrays + the scalar n
    assert first["payload"]["xtx"] == {"__array__": "xtx"}
    assert np.asarray(first["arrays"]["xtx"]["values"]).shape == (3, 3)
    assert entries[2]["status"] == "refused" and entries[2]["n_values"] == 0
    assert entries[3]["n_values"] == 9 + 4 + 1  # strings and booleans are not numbers
    # the documented canonical form
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == b'{"a":[1.5,"\\u00e9"],"b":1}'


def test_verify_ok(log5):
    report = verify_audit(log5)
    assert report.ok and report.n_records == 5 and report.problems == []
    assert report.head == AuditLog(log5).entries()[-1]["hash"]
    assert AuditLog(log5).verify().ok
    empty = log5.parent / "empty.jsonl"
    empty.write_text("")
    assert verify_audit(empty).ok and verify_audit(empty).n_records == 0


def test_float_values_exact(tmp_path):
    path = tmp_path / "a.jsonl"
    x = np.array([0.1, 1 / 3, 1e-300, -0.0, 2.0 ** 60, np.pi * 1e17])
    AuditLog(path).record("s", "combat_stats", {"x": x, "y": np.float32(0.1)})
    e = AuditLog(path).entries()[0]
    assert np.array_equal(np.asarray(e["arrays"]["x"]["values"]), x)
    assert verify_audit(path).ok


def _only_problem(path, needle):
    report = verify_audit(path)
    assert not report.ok
    assert any(needle in p for p in report.problems), report.problems
    for p in report.problems:
        assert "\n" not in p
    return report


def test_edit_a_number(log5, tmp_path):
    path = _copy(log5, tmp_path, "edited.jsonl")
    lines = _lines(path)
    rec = json.loads(lines[3])
    rec["arrays"]["xtx"]["values"][1][2] += 1e-9
    lines[3] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))
    report = _only_problem(path, "record 3 (line 4): edited")
    assert len(report.problems) == 1
    assert "hash mismatch" in report.problems[0] and "payload_sha256" in report.problems[0]


def test_edit_with_recomputed_hash_breaks_next_link(log5, tmp_path):
    path = _copy(log5, tmp_path, "rehashed.jsonl")
    lines = _lines(path)
    rec = json.loads(lines[1])
    rec["payload"]["n"] = 400
    rec["payload_sha256"] = payload_digest(rec["payload"], rec["arrays"])
    rec["hash"] = record_digest(rec)
    lines[1] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))
    report = _only_problem(path, "record 2 (line 3): prev does not match")
    assert len(report.problems) == 1


def test_delete_a_record(log5, tmp_path):
    path = _copy(log5, tmp_path, "dropped.jsonl")
    lines = _lines(path)
    del lines[2]
    path.write_text("".join(lines))
    report = _only_problem(path, "record 3 (line 3): record(s) 2 dropped")
    assert "prev does not match" in report.problems[0]
    assert len(report.problems) == 1


def test_delete_the_first_record(log5, tmp_path):
    path = _copy(log5, tmp_path, "dropped0.jsonl")
    path.write_text("".join(_lines(path)[1:]))
    report = _only_problem(path, "record 1 (line 1): record(s) 0 dropped")
    assert "prev does not match 0...0" in report.problems[0]


def test_swap_two_records(log5, tmp_path):
    path = _copy(log5, tmp_path, "swapped.jsonl")
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    report = _only_problem(path, "record 2 (line 2): out of order")
    assert any(p.startswith("record 1 (line 3): out of order") for p in report.problems), report.problems
    assert not any("dropped before it" in p for p in report.problems)


def test_truncated_mid_line(log5, tmp_path):
    path = _copy(log5, tmp_path, "truncated.jsonl")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    report = _only_problem(path, "line 5: truncated last line")
    assert report.n_records == 4 and len(report.problems) == 1
    # appending to a damaged log is refused (nothing would be sent)
    with pytest.raises(AuditLogError, match="incomplete"):
        AuditLog(path).record("hospA", "combat_stats", {"n": 1})


def test_forged_record_wrong_prev(log5, tmp_path):
    path = _copy(log5, tmp_path, "forged.jsonl")
    entries = AuditLog(path).entries()
    forged = dict(entries[-1], seq=5, prev="f" * 64, time="2030-01-01T00:00:00.000+00:00")
    forged["hash"] = record_digest(forged)
    with open(path, "a") as f:
        f.write(json.dumps(forged) + "\n")
    report = _only_problem(path, "record 5 (line 6): prev does not match the hash of the preceding record 4")
    assert len(report.problems) == 1


def test_not_json_and_blank_lines(log5, tmp_path):
    path = _copy(log5, tmp_path, "junk.jsonl")
    lines = _lines(path)
    lines.insert(2, "hello\n")
    path.write_text("".join(lines))
    report = _only_problem(path, "line 3: not JSON")
    assert report.n_records == 5
    path2 = _copy(log5, tmp_path, "blank.jsonl")
    path2.write_text("".join(_lines(log5)[:2] + ["\n"] + _lines(log5)[2:]))
    _only_problem(path2, "line 3: blank line")


def test_old_format_log_refuses_append(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text(json.dumps({"time": "t", "site": "s", "request": "combat_stats", "status": "sent",
                                "payload": {}, "arrays": {}}) + "\n")
    with pytest.raises(AuditLogError, match="not a chained audit record"):
        AuditLog(path).record("s", "combat_stats", {"n": 1})
    _only_problem(path, "line 1: not a chained audit record")


def _append_many(path: str, worker: int, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.record(f"site{worker}", "combat_stats", {"worker": worker, "i": i, "x": np.full((2, 3), float(i))})


def test_concurrent_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    report = verify_audit(path)
    assert report.ok, report.problems
    assert report.n_records == 100
    entries = AuditLog(path).entries()
    assert [e["seq"] for e in entries] == list(range(100))
    for w in range(4):
        assert [e["payload"]["i"] for e in entries if e["payload"]["worker"] == w] == list(range(25))
    times = [e["time"] for e in entries]
    assert times == sorted(times)


def test_summary(log5, tmp_path):
    text = summarize_audit(log5)
    assert "combat_stats: 2 message(s) sent, 1 refused" in text
    assert "combat_apply: 2 message(s) sent" in text
    assert "request not allowed by site policy" in text
    assert "numbers released: 28" in text  # combat_stats: 2 x (9 + 4 + 1)
    assert "numbers released: 12" in text  # combat_apply: (4 + 1) + (4 + 1 + 2)
    assert "largest array: xtx 3x3 (9 values)" in text
    assert "Total: 4 message(s) sent, 40 numbers released, 1 refused." in text
    assert "Chain: VERIFIED (5 records" in text
    assert "hospA" in text
    bad = _copy(log5, tmp_path, "bad.jsonl")
    lines = _lines(bad)
    del lines[1]
    bad.write_text("".join(lines))
    text = summarize_audit(bad)
    assert "Chain: NOT VERIFIED" in text and "record 2 (line 2)" in text


def test_find_audit_log(tmp_path, monkeypatch, log5):
    assert find_audit_log(log5) == log5
    assert find_audit_log(log5.parent) == log5
    with pytest.raises(FileNotFoundError):
        find_audit_log(tmp_path / "nope.jsonl")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(FileNotFoundError):
        find_audit_log()
    (cwd / ".fedrad-site").mkdir()
    shutil.copy(log5, cwd / ".fedrad-site" / "audit.jsonl")
    assert find_audit_log().resolve() == (cwd / ".fedrad-site" / "audit.jsonl").resolve()
    shutil.copy(log5, cwd / "audit.jsonl")
    assert find_audit_log().resolve() == (cwd / "audit.jsonl").resolve()


def test_nonfinite_array_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match="non-finite"):
        AuditLog(path).record("s", "combat_stats", {"x": np.array([1.0, np.nan])})
    assert not path.exists() or path.read_text() == ""


def test_site_agent_logs_verify(tmp_path):
    """The logs the real site agent writes during federated ComBat (Flower message layer) verify and summarize."""
    from tests.test_harmonize_flower import SIZES, _table

    from fedrad.local import harmonize_table

    df = _table(seed=5)
    feats = [c for c in df.columns if c.startswith("original_")]
    harmonize_table(df, "site", feats, ["age", "sex"], ["sex"], federated=True, workdir=tmp_path)
    for site in SIZES:
        path = tmp_path / site / "audit.jsonl"
        report = verify_audit(path)
        assert report.ok and report.n_records == 2, report.problems
        text = summarize_audit(path)
        assert "combat_stats: 1 message(s) sent" in text and "combat_apply: 1 message(s) sent" in text
        assert site in text and "Chain: VERIFIED" in text


def test_summary_counts_numeric_lists_in_payload(tmp_path):
    path = tmp_path / "a.jsonl"
    AuditLog(path).record("s", "combat_stats", {"stats": {"batches": [{"Z": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
                                                                       "mean": [1.0, 2.0], "n": 3}]}})
    text = summarize_audit(path)
    assert "largest array: stats/batches/0/Z 2x3 (6 values)" in text
    assert "numbers released: 9" in text
