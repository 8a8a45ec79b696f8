"""Requests signed by the coordinator the approved plan names (fedrad.common.signing, fedrad.client.signed).

Every attack goes through the real site agent (``Site.answer`` with the signature the ClientApp hands it): the
request is refused with code ``unsigned``, nothing is released, the refusal is audited, and the site's ledger
(attempts, tasks) is exactly what it was. An honest study signed end to end equals the same study unsigned."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedrad.client.audit import AuditLog
from fedrad.client.client_app import _ALL_STEPS
from fedrad.client.site import Site, SiteFailure
from fedrad.common.messages import attach_signature, from_record, payload_digest, request_signature, to_record
from fedrad.common.plan import plan_id, study_plan
from fedrad.common.signing import Signer, fingerprint, new_session, signed_fields, verify
from fedrad.local import approve_at_sites, run_study_in_process
from tests.test_study import make_sites

NODE = 1000


def signed_record(signer, pid: str, request: str, node: int, payload: dict, session: str, seq: int):
    record = to_record({**payload, "plan": pid})
    fields = signed_fields(pid, request, node, session, seq, payload_digest(record))
    attach_signature(record, signer.sign(fields), session, seq)
    return record


def deliver(node_cfg: dict, request: str, record, node: int = NODE) -> dict:
    """What the ClientApp does with a message: decode, hand the signature and the site's own node id over."""
    site = Site.from_node_config(node_cfg)
    return site.answer(request, from_record(record), _ALL_STEPS[request], auth=request_signature(record), node=node)


def ledger_bytes(node_cfg: dict, pid: str) -> bytes | None:
    path = Site.from_node_config(node_cfg).workdir / "ledger" / f"{pid}.json"
    return path.read_bytes() if path.is_file() else None


def refused_unsigned(node_cfg: dict, request: str, record, pid: str, node: int = NODE) -> None:
    before = ledger_bytes(node_cfg, pid)
    n_audit = len(AuditLog(Site.from_node_config(node_cfg).workdir / "audit.jsonl").entries())
    with pytest.raises(SiteFailure) as info:
        deliver(node_cfg, request, record, node)
    assert "[unsigned]" in str(info.value), str(info.value)
    entries = AuditLog(Site.from_node_config(node_cfg).workdir / "audit.jsonl").entries()
    assert len(entries) == n_audit + 1 and entries[-1]["status"] == "refused"
    assert entries[-1]["request"] == request and "error" in json.dumps(entries[-1])
    assert ledger_bytes(node_cfg, pid) == before  # no attempt used, no task recorded


@pytest.fixture
def keyed(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    signer = Signer.generate()
    cfg["coordinator"] = {"key": signer.public}
    pid = approve_at_sites(study_plan(cfg), nodes)
    return cfg, nodes, signer, pid


def test_signatures_verify_only_the_fields_they_cover():
    signer = Signer.generate()
    fields = signed_fields("p" * 64, "fit_round", 7, "a" * 32, 3, "d" * 64)
    sig = signer.sign(fields)
    assert verify(signer.public, fields, sig)
    for other in (signed_fields("p" * 64, "fit_round", 8, "a" * 32, 3, "d" * 64),
                  signed_fields("p" * 64, "fit_round", 7, "a" * 32, 4, "d" * 64),
                  signed_fields("p" * 64, "study_evaluate", 7, "a" * 32, 3, "d" * 64),
                  signed_fields("p" * 64, "fit_round", 7, "a" * 32, 3, "e" * 64)):
        assert not verify(signer.public, other, sig)
    assert not verify(Signer.generate().public, fields, sig)
    assert fingerprint(signer.public).startswith("SHA256:") and len(fingerprint(signer.public)) == 50


def test_the_coordinators_signed_request_is_answered_and_only_once(keyed):
    cfg, nodes, signer, pid = keyed
    session = new_session()
    rec = signed_record(signer, pid, "study_prepare", NODE, {}, session, 1)
    reply = deliver(nodes[0], "study_prepare", rec)
    assert reply["site"] == nodes[0]["site-name"] and reply["n"] > 0
    refused_unsigned(nodes[0], "study_prepare", rec, pid)  # the same message again: a replay
    earlier = signed_record(signer, pid, "study_prepare", NODE, {}, session, 0)
    refused_unsigned(nodes[0], "study_prepare", earlier, pid)  # an older round of the same session
    reply = deliver(nodes[0], "study_prepare", signed_record(signer, pid, "study_prepare", NODE, {}, session, 2))
    assert reply["n"] > 0


def test_unsigned_forged_altered_or_misaddressed_requests_are_refused_before_the_ledger(keyed):
    cfg, nodes, signer, pid = keyed
    session = new_session()
    site = nodes[1]
    # no signature at all (an outsider's run of fedrad's app with the approved plan)
    refused_unsigned(site, "study_prepare", to_record({"plan": pid}), pid)
    # signed by another key (anyone can make one)
    refused_unsigned(site, "study_prepare", signed_record(Signer.generate(), pid, "study_prepare", NODE, {},
                                                          session, 1), pid)
    # a genuine signature for another site's node
    refused_unsigned(site, "study_prepare", signed_record(signer, pid, "study_prepare", NODE + 1, {}, session, 1),
                     pid)
    # a genuine signature for another request type
    refused_unsigned(site, "study_prepare", signed_record(signer, pid, "combat_stats", NODE, {}, session, 1), pid)
    # one value of a signed request changed after signing
    rec = signed_record(signer, pid, "study_prepare", NODE, {"table": "raw"}, session, 1)
    tampered = to_record({"table": "h-final", "plan": pid})
    tampered["auth"] = rec["auth"]
    refused_unsigned(site, "study_prepare", tampered, pid)
    # malformed signature fields
    bad = signed_record(signer, pid, "study_prepare", NODE, {}, session, 1)
    bad["auth"]["session"] = "../../etc"
    refused_unsigned(site, "study_prepare", bad, pid)
    # none of them used an attempt: the ledger does not exist yet; the genuine request still works
    assert ledger_bytes(site, pid) is None
    assert deliver(site, "study_prepare", signed_record(signer, pid, "study_prepare", NODE, {}, session, 1))["n"] > 0
    assert json.loads(ledger_bytes(site, pid))["attempts"] == 1
    refused = [e for e in AuditLog(Site.from_node_config(site).workdir / "audit.jsonl").entries()
               if e["status"] == "refused"]
    assert len(refused) == 6


def _timeless(results: dict) -> str:
    """The results without what differs between two honest runs: plan id and config (the key is part of the
    plan; the two runs' folders differ), wall-clock times and the per-round log."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("plan_id", "seconds", "phases", "rounds", "config", "finished_utc")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return json.dumps(strip(results), sort_keys=True, default=str)


def test_a_signed_study_equals_the_same_study_unsigned(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path / "plain", survival=False)
    plain = run_study_in_process(cfg, nodes)
    cfg2, nodes2, _ = make_sites(tmp_path / "signed", survival=False)
    signer = Signer.generate()
    cfg2["coordinator"] = {"key": signer.public}
    signed = run_study_in_process(cfg2, nodes2, signer=signer)
    assert signed["plan_id"] == plan_id(study_plan(cfg2)) != plain["plan_id"]
    assert _timeless(signed) == _timeless(plain)  # every metric, model, selection and count, to the last bit
    assert signed["external"] and signed["signature"]
    # every site answered signed requests only: its sessions folder holds the last round it answered
    for node in nodes2:
        sessions = list((Site.from_node_config(node).workdir / "sessions").glob("*.json"))
        assert len(sessions) == 1 and json.loads(sessions[0].read_text())["seq"] >= 8


def test_a_coordinator_without_the_plans_key_stops_before_asking(tmp_path):
    from fedrad.client.client_app import app
    from fedrad.server.federation import Federation, LocalGrid
    from fedrad.server.study import Study, StudyError

    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    cfg["coordinator"] = {"key": Signer.generate().public}
    approve_at_sites(study_plan(cfg), nodes)
    for signer in (None, Signer.generate()):
        with pytest.raises(StudyError, match="names coordinator key SHA256:"):
            Study(Federation(LocalGrid(app, nodes), signer=signer), cfg)
    assert not any((Site.from_node_config(n).workdir / "audit.jsonl").exists() for n in nodes)
    assert np.all([not (Site.from_node_config(n).workdir / "ledger").exists() for n in nodes])
