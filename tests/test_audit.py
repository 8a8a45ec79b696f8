"""The site's hash-chained, MAC'd audit log (client/audit.py): verification, tampering, anchor, key, file modes,
concurrent appends, summary, `fedrad site audit`."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import stat

import numpy as np
import pytest

from fedrad.client.audit import (GENESIS, AuditLog, AuditLogError, anchor_mac, anchor_path, canonical_json,
                                 find_audit_log, load_key, payload_digest, read_anchor, record_digest, record_mac,
                                 summarize_audit, verify_audit)


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
    """Copy a log and its anchor (the key, audit.key next to both, is shared)."""
    dst = tmp_path / name
    shutil.copy(src, dst)
    if anchor_path(src).exists():
        shutil.copy(anchor_path(src), anchor_path(dst))
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
    # before MACs this was the only problem; now the rewritten record itself fails its MAC (no key to recompute it)
    assert len(report.problems) == 2
    assert report.problems[0].startswith("record 1 (line 2): MAC mismatch"), report.problems


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
    # the anchor (last record #4) now also shows that record 4 is gone
    assert report.n_records == 4 and len(report.problems) == 2
    assert report.problems[1].startswith("truncated: the log ends at record 3 but its anchor says the last record "
                                          "is #4"), report.problems
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
    harmonize_table(df, "site", feats, ["age", "sex"], ["sex"], federated=True, workdir=tmp_path,
                    min_cell_size=5)  # hospA/hospB have < 10 patients of one sex
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


# ------------------------------------------------------------------------------------------- MAC, anchor, key
def _key_and_anchor(log):
    return log.parent / "audit.key", log.parent / "audit.anchor"


def test_records_carry_macs_and_anchor(log5):
    key_file, anchor_file = _key_and_anchor(log5)
    key = load_key(key_file)
    assert isinstance(key, bytes) and len(key) == 32 and key != bytes(32)
    entries = AuditLog(log5).entries()
    for e in entries:
        assert e["mac"] == record_mac(e, key)
        assert e["mac"] != record_mac(e, bytes(32))  # keyed: another key gives another MAC
        assert e["mac"] != e["hash"]
    anchor = read_anchor(anchor_file)
    assert (anchor["seq"], anchor["hash"], anchor["mac_from"]) == (4, entries[-1]["hash"], 0)
    assert anchor["mac"] == anchor_mac(anchor, key)
    report = verify_audit(log5)
    assert report.ok and report.macs_checked and report.last_seq == 4 and report.notes == []
    assert "MACs checked" in str(report)


def test_file_modes_0600(tmp_path):
    work = tmp_path / "new" / "work"
    log = work / "audit.jsonl"
    AuditLog(log).record("s", "combat_stats", {"n": 12})
    for p in (log, work / "audit.key", work / "audit.anchor"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert stat.S_IMODE(os.stat(work).st_mode) == 0o700
    AuditLog(log).record("s", "combat_stats", {"n": 13})  # the anchor is rewritten: still 0600
    assert stat.S_IMODE(os.stat(work / "audit.anchor").st_mode) == 0o600
    assert not [p.name for p in work.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind
    # a log (or key) left 0644 by older versions is tightened on the next append
    os.chmod(log, 0o644)
    os.chmod(work / "audit.key", 0o644)
    AuditLog(log).record("s", "combat_stats", {"n": 14})
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(work / "audit.key").st_mode) == 0o600
    assert verify_audit(log).ok and verify_audit(log).n_records == 3


def test_truncated_tail_detected(log5, tmp_path):
    path = _copy(log5, tmp_path, "cut.jsonl")
    path.write_text("".join(_lines(path)[:3]))  # records 3 and 4 cut off: a valid shorter chain
    report = _only_problem(path, "truncated: the log ends at record 2 but its anchor says the last record is #4")
    assert "record(s) 3-4 cut off the end" in report.problems[0] and len(report.problems) == 1
    # the plain chain alone (no key) still sees the unauthenticated anchor
    assert not verify_audit(path, check_mac=False).ok
    with pytest.raises(AuditLogError, match="cut off the end"):
        AuditLog(path).record("hospA", "combat_stats", {"n": 1})
    assert len(_lines(path)) == 3  # nothing appended
    emptied = _copy(log5, tmp_path, "emptied.jsonl")
    emptied.write_text("")
    _only_problem(emptied, "truncated: the log has no records but its anchor says the last record is #4")
    with pytest.raises(AuditLogError, match="emptied"):
        AuditLog(emptied).record("hospA", "combat_stats", {"n": 1})


def test_deleted_log_detected_and_refused(log5):
    head = verify_audit(log5).head
    log5.unlink()  # key and anchor remain
    report = _only_problem(log5, "log missing")
    assert f"records up to #4 sha256 {head}" in report.problems[0]
    assert find_audit_log(log5.parent) == log5  # reported as deleted, not "not found"
    with pytest.raises(AuditLogError, match="missing but its anchor"):
        AuditLog(log5).record("hospA", "combat_stats", {"n": 1})
    assert not log5.exists()  # no new chain started at record 0
    # log and anchor deleted, the key next to them remains
    (log5.parent / "audit.anchor").unlink()
    _only_problem(log5, "log missing")
    with pytest.raises(AuditLogError, match="key"):
        AuditLog(log5).record("hospA", "combat_stats", {"n": 1})
    assert not log5.exists()


def _rewrite_plain(path, edit):
    """What someone without the key can do: edit records, then recompute every payload_sha256/hash/prev."""
    prev = GENESIS
    out = []
    for line in _lines(path):
        rec = json.loads(line)
        edit(rec)
        rec["payload_sha256"] = payload_digest(rec["payload"], rec["arrays"])
        rec["prev"] = prev
        rec["hash"] = record_digest(rec)
        prev = rec["hash"]
        out.append(json.dumps(rec) + "\n")
    path.write_text("".join(out))


def _more_patients(rec):
    if rec["payload"].get("n") == 40:
        rec["payload"]["n"] = 400


def _forge_anchor(path):
    """Point the anchor at the rewritten log's new head (its MAC cannot be recomputed without the key)."""
    forged = read_anchor(anchor_path(path))
    forged["hash"] = AuditLog(path).entries()[-1]["hash"]
    anchor_path(path).write_text(json.dumps(forged))


def test_rewrite_with_recomputed_hashes_fails(log5, tmp_path):
    path = _copy(log5, tmp_path, "rewritten.jsonl")
    _rewrite_plain(path, _more_patients)
    report = verify_audit(path)
    assert not report.ok and report.macs_checked
    assert [p.split(":")[0] for p in report.problems] == [f"record {i} (line {i + 1})" for i in range(5)] + [
        "anchor mismatch"]
    assert all("MAC mismatch" in p for p in report.problems[:5])
    # even without the key the (unauthenticated) anchor still names the old head
    assert not verify_audit(path, check_mac=False).ok
    # forging the anchor too: the plain chain alone is then consistent, the MACs are not
    _forge_anchor(path)
    plain = verify_audit(path, check_mac=False)
    assert plain.ok and not plain.macs_checked and "MACs NOT checked" in str(plain)
    report = verify_audit(path)
    assert not report.ok and sum("MAC mismatch" in p for p in report.problems) == 5
    assert report.problems[-1].startswith("anchor: rewritten.anchor's MAC does not verify"), report.problems
    with pytest.raises(AuditLogError, match="MAC does not verify"):
        AuditLog(path).record("hospA", "combat_stats", {"n": 1})
    # dropping the mac fields instead does not help
    stripped = _copy(log5, tmp_path, "stripped.jsonl")
    _rewrite_plain(stripped, lambda rec: (_more_patients(rec), rec.pop("mac")))
    _only_problem(stripped, "record 0 (line 1): no MAC")


def test_missing_or_wrong_key(log5, tmp_path):
    key_file = log5.parent / "audit.key"
    moved = tmp_path / "elsewhere" / "site.key"
    moved.parent.mkdir()
    key_file.rename(moved)
    _only_problem(log5, "key missing")
    with pytest.raises(AuditLogError, match="key .* is missing"):
        AuditLog(log5).record("hospA", "combat_stats", {"n": 1})
    assert verify_audit(log5, moved).ok  # an explicit key path
    assert AuditLog(log5, key_path=moved).record("hospA", "combat_stats", {"n": 1})["seq"] == 5
    assert verify_audit(log5, moved).ok and verify_audit(log5, moved).n_records == 6
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    report = verify_audit(log5, other)
    assert not report.ok and sum("MAC mismatch" in p for p in report.problems) == 6
    assert any("anchor" in p and "MAC does not verify" in p for p in report.problems)


def test_anchor_deleted(log5):
    (log5.parent / "audit.anchor").unlink()
    _only_problem(log5, "anchor missing")
    with pytest.raises(AuditLogError, match="anchor .* is missing"):
        AuditLog(log5).record("hospA", "combat_stats", {"n": 1})


def test_crash_between_log_and_anchor_write(log5):
    anchor_file = log5.parent / "audit.anchor"
    before = anchor_file.read_bytes()
    AuditLog(log5).record("hospA", "combat_stats", {"n": 42})
    anchor_file.write_bytes(before)  # as if the process died after the log's fsync, before the anchor rename
    report = verify_audit(log5)
    assert report.ok and any("record 5 was written after the anchor's last update" in n for n in report.notes)
    assert AuditLog(log5).record("hospA", "combat_stats", {"n": 43})["seq"] == 6
    assert read_anchor(anchor_file)["seq"] == 6 and verify_audit(log5).ok and verify_audit(log5).notes == []


def test_pre_mac_log_is_adopted(log5, tmp_path):
    """A log written before MACs (no mac fields, no key, no anchor) gets a key and an anchor on the next append;
    its old records are then pinned by the first MAC'd record's prev."""
    work = tmp_path / "old"
    work.mkdir()
    path = work / "audit.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "mac"}) + "\n"
                            for line in _lines(log5)))
    report = verify_audit(path)
    assert report.ok and not report.macs_checked and report.notes
    assert AuditLog(path).record("hospA", "combat_stats", {"n": 1})["seq"] == 5
    assert read_anchor(work / "audit.anchor")["mac_from"] == 5
    report = verify_audit(path)
    assert report.ok and report.macs_checked and any("record(s) 0-4 predate the audit key" in n for n in report.notes)
    _rewrite_plain(path, _more_patients)
    _only_problem(path, "record 5 (line 6): MAC mismatch")


# ------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    from typer.testing import CliRunner

    from fedrad.cli import app

    return CliRunner().invoke(app, ["site", "audit", *map(str, args)])


def test_cli_last_hash_and_exit_codes(log5, tmp_path):
    head = AuditLog(log5).entries()[-1]["hash"]
    ok = _cli(log5)
    assert ok.exit_code == 0, ok.output
    assert f"last record: #4 sha256 {head}" in ok.output
    assert "Chain: VERIFIED (5 records" in ok.output and "MACs: checked with key" in ok.output

    cut = _copy(log5, tmp_path, "cut.jsonl")
    cut.write_text("".join(_lines(cut)[:4]))
    res = _cli(cut)
    assert res.exit_code == 1 and "truncated: the log ends at record 3" in res.output
    assert f"last record: #3 sha256 {AuditLog(cut).entries()[-1]['hash']}" in res.output

    rewritten = _copy(log5, tmp_path, "rewritten.jsonl")
    _rewrite_plain(rewritten, _more_patients)
    _forge_anchor(rewritten)
    res = _cli(rewritten)
    assert res.exit_code == 1 and "MAC mismatch" in res.output and "MAC does not verify" in res.output
    res = _cli(rewritten, "--no-key")  # the plain chain verifies, and the output says what was not checked
    assert res.exit_code == 0, res.output
    assert "MACs: NOT checked (verified without the key)" in res.output
    assert "a log rewritten with recomputed hashes would pass this check" in res.output
    assert f"last record: #4 sha256 {AuditLog(rewritten).entries()[-1]['hash']}" in res.output
    assert head not in res.output  # the operator's external copy of the head shows the rewrite

    edited = _copy(log5, tmp_path, "edited.jsonl")
    lines = _lines(edited)
    lines[1] = lines[1].replace('"n": 40', '"n": 41')
    edited.write_text("".join(lines))
    res = _cli(edited)
    assert res.exit_code == 1 and "record 1 (line 2): edited" in res.output

    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    res = _cli(log5, "--key", other)
    assert res.exit_code == 1 and "MAC mismatch" in res.output

    log5.unlink()  # deleted: key and anchor remain
    res = _cli(log5.parent)
    assert res.exit_code == 1 and "log missing" in res.output and "last record: none" in res.output


def test_site_audit_config_default_path_and_releases_by_plan_and_attempt(tmp_path):
    """A study restarted without a lost site, through the real site agent: every record carries the plan id, and
    `fedrad site audit --config site.toml` (the real command) finds the log in the work directory `site join
    --config` uses and groups the releases by plan and attempt; without arguments it finds `site join`'s
    default work directory ./fedrad-site."""
    import subprocess

    from fedrad.client.client_app import app as client_app
    from fedrad.common.plan import plan_id, study_plan
    from fedrad.local import approve_at_sites
    from fedrad.server.federation import Federation, LocalGrid
    from fedrad.server.runtime import BIN
    from fedrad.server.study import Study
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path, survival=False, seed=2)

    def flaky(msg, context):
        if context.node_config["site-name"] == "hosp3" and msg.metadata.message_type == "query.study_select":
            raise ConnectionError("site hosp3: the hospital's network went down")
        return client_app(msg, context)

    approve_at_sites(study_plan(cfg), nodes)
    res = Study(Federation(LocalGrid(flaky, nodes)), cfg).run()
    assert list(res["missing_sites"]) == ["hosp3"]
    pid = plan_id(study_plan(cfg))
    records = AuditLog(tmp_path / "hosp0" / "work" / "audit.jsonl").entries()
    assert records and all(r.get("plan") == pid for r in records)
    assert [r["request"] for r in records].count("study_prepare") == 2

    (tmp_path / "hosp0" / "site.toml").write_text('[site]\nname = "hosp0"\ntable = "features.parquet"\n'
                                                  'workdir = "work"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def audit(*args, cwd=elsewhere):
        return subprocess.run([str(BIN / "fedrad"), "site", "audit", *args], capture_output=True, text=True,
                              cwd=cwd, timeout=120)

    out = audit("--config", str(tmp_path / "hosp0" / "site.toml"))
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert f"Audit log {tmp_path / 'hosp0' / 'work' / 'audit.jsonl'}" in text and "; 1 plan(s)" in text
    first, second = text.index(f"plan {pid}, attempt 1 of 2: "), text.index(f"plan {pid}, attempt 2 of 2: ")
    assert first < second and "records without a plan id" not in text
    # attempt 1 ended at selection (hosp3 was lost there); attempt 2 ran to the evaluation
    assert "study_prepare: 1 message(s) sent" in text[first:second] and "study_evaluate" not in text[first:second]
    assert "study_prepare: 1 message(s) sent" in text[second:] and "study_evaluate: 1 message(s)" in text[second:]
    assert "Chain: VERIFIED" in text

    # no argument: site join's default work directory, ./fedrad-site
    import shutil

    shutil.copytree(tmp_path / "hosp0" / "work", elsewhere / "fedrad-site")
    out = audit()
    assert out.returncode == 0 and "Audit log fedrad-site/audit.jsonl" in out.stdout, out.stdout + out.stderr
    out = audit("fedrad-site", "--config", str(tmp_path / "hosp0" / "site.toml"))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"fedrad: error: pass either the log (fedrad-site) or --config {tmp_path / 'hosp0' / 'site.toml'}, not both"]
    out = audit(cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("fedrad: error: no audit.jsonl in the current directory, "
                                                         "fedrad-site/ or .fedrad-site/")
