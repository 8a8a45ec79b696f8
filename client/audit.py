"""The site's audit log: every outgoing payload is appended here *before* it is sent.

One JSON object per line (``audit.jsonl`` in the site's work directory): UTC time, request type, phase, and
the full payload as sent (arrays as nested lists), so a site's data-protection officer can see exactly what
left the hospital. Appends are flushed and fsynced before the reply is handed to Flower.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from fedrad.common.messages import split_payload


def _listify(arrays: dict) -> dict:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.tolist()} for k, v in arrays.items()}


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def record(self, site: str, request: str, payload: dict, status: str = "sent") -> None:
        skeleton, arrays = split_payload(payload)
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "site": site,
                 "request": request, "status": status, "payload": json.loads(skeleton),
                 "arrays": _listify(arrays)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
