"""The site answers only requests its approved plan's coordinator signed (:mod:`fedrad.common.signing`).

:func:`check_signature` runs first for every request, before the plan's ledger is read or written: a request
without a valid signature by the key the approved plan names (``[coordinator] key``) is refused with code
``unsigned`` and audited, and changes nothing else at the site (no attempt used, no task recorded). A valid
signature covers this site's own node id (from its Flower context, not the message), so a request signed for
another site is refused too, and each (session, round) is answered once: a replayed request is refused.
Plans that name no key (single-machine rehearsals, ``fedrad fit/harmonize --federated``) are not checked here;
``fedrad site approve`` refuses such a study plan unless its operator says otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fedrad.common.files import atomic_write_bytes
from fedrad.common.signing import SESSION, signed_fields, verify


class Unsigned(PermissionError):
    """A request lacks a valid signature by the plan's coordinator key, or repeats an answered round."""

    code = "unsigned"


def plan_key(plan: dict) -> str | None:
    """The coordinator key a plan names (study plans: ``[coordinator] key``), else None."""
    coord = (plan.get("study") or {}).get("coordinator") if isinstance(plan, dict) else None
    return coord.get("key") if isinstance(coord, dict) else None


def check_signature(site, request: str, payload: dict, auth: dict | None, node: int | None) -> None:
    from fedrad.client.approval import load_approved

    record = load_approved(site.workdir, payload.get("plan"), site.approved_plans)
    key = plan_key(record["plan"])
    if not key:
        return
    if auth is None:
        raise Unsigned("the request carries no coordinator signature, but the approved plan names a coordinator key")
    if node is None:
        raise Unsigned("the site cannot tell its own node id, so it cannot check whom the request was signed for")
    session, seq = auth.get("session", ""), auth.get("seq", -1)
    if not (isinstance(session, str) and SESSION.match(session)) or not isinstance(seq, int) or seq < 0:
        raise Unsigned("the request's signature fields are malformed")
    fields = signed_fields(record["plan_id"], request, int(node), session, seq, auth.get("digest", ""))
    if not verify(key, fields, auth.get("signature", b"")):
        raise Unsigned("the request's signature does not verify with the approved plan's coordinator key (forged, "
                       "altered, or signed for another site, plan, request or round)")
    path = Path(site.workdir) / "sessions" / f"{session}.json"
    last = json.loads(path.read_text())["seq"] if path.is_file() else -1
    if seq <= last:
        raise Unsigned(f"round {seq} of coordinator session {session[:8]} was answered already (a replayed request)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, json.dumps({"seq": seq, "plan": record["plan_id"]}).encode())
    os.chmod(path, 0o600)
