"""Wide tables at a site: table metadata never reaches a request, candidate features are computed once per table
and plan, and the faster paths (Arrow conversion, midranks, payload decoding, audit appends) give exactly what the
plain ones give."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.stats

from fedrad.client.audit import AuditLog, verify_audit
from fedrad.client.site import Site, frame_to_arrow, read_table
from fedrad.common.messages import join_payload, split_payload


def _wide(n: int = 30, p: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"original_glcm_F{i}" for i in range(p)])
    df["case_id"] = [f"c{i}" for i in range(n)]
    df["sex"], df["stage"], df["flag"] = rng.choice(["F", "M"], n), rng.integers(1, 5, n), True
    df["grade"] = pd.Categorical(rng.choice(["a", "b"], n))
    df["count"] = pd.array([1, None] * (n // 2), dtype="Int64")
    df.loc[3, "original_glcm_F2"] = np.nan
    return df


def test_read_table_drops_attrs(tmp_path):
    df = _wide()
    df.attrs = {"provenance": "x" * 100_000}
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    assert pd.read_parquet(path).attrs  # pandas keeps them through parquet...
    got = read_table(path, pd.read_parquet)
    assert got.attrs == {} and read_table(path, pd.read_parquet).attrs == {}  # ...a site's table does not
    assert got.equals(pd.read_parquet(path))


def test_frame_to_arrow_is_pyarrows_table(tmp_path):
    df = _wide()
    df.index = np.arange(100, 130)
    fast, slow = frame_to_arrow(df), pa.Table.from_pandas(df, preserve_index=False)
    assert fast.equals(slow, check_metadata=True)
    site = Site.from_node_config({"site-name": "s", "workdir": str(tmp_path / "w")})
    site.save_table("h-final", df)
    cached = site.table("h-final")
    from_file = pd.read_parquet(tmp_path / "w" / "harmonized" / "h-final.parquet")
    assert cached.equals(from_file) and cached.dtypes.equals(from_file.dtypes)
    assert from_file.equals(df.reset_index(drop=True))


def test_candidates_once_per_table_and_plan(tmp_path, monkeypatch):
    import fedrad.client.guard as guard

    site = Site.from_node_config({"site-name": "s", "workdir": str(tmp_path / "w")})
    site.save_table("raw", _wide())
    calls = []
    real = guard.candidate_features
    monkeypatch.setattr(guard, "candidate_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    from fedrad.common.plan import study_plan
    from fedrad.server.study_config import _merge, validate

    cfg = validate(_merge({"study": {"name": "t", "min_sites": 3}, "endpoint": {"type": "response", "outcome": "y"},
                           "harmonization": {"covariates": [], "categorical": []}, "model": {"clinical": ["stage"]}}))
    study = study_plan(cfg)["study"]
    first = guard._site_candidates(site, study, {})
    again = guard._site_candidates(site, study, {})
    assert first == again and len(calls) == 1 and "original_glcm_F0" in first
    site.save_table("raw", _wide(seed=1))  # a new table version: computed again
    guard._site_candidates(site, study, {})
    assert len(calls) == 2


def test_midranks_equal_scipy():
    from fedrad.common.metrics import _midranks

    rng = np.random.default_rng(0)
    for _ in range(300):
        a = np.round(rng.normal(size=(int(rng.integers(1, 3)), int(rng.integers(1, 80)))), int(rng.integers(0, 2)))
        assert np.array_equal(_midranks(a), scipy.stats.rankdata(a, axis=1))


def test_payload_decoding_equals_the_hook():
    payload = {"a/b": {"c": np.arange(3)}, "x": [np.zeros(2), {"y": np.ones((2, 2))}], "n": 1.5,
               "tasks": [{"id": "t", "beta": [0.1, 0.2], "g": np.arange(4.0)}]}
    skeleton, arrays = split_payload(payload)

    def hook(obj):
        return arrays[obj["__array__"]] if len(obj) == 1 and "__array__" in obj else obj

    want, got = json.loads(skeleton, object_hook=hook), join_payload(skeleton, arrays)
    assert split_payload(got)[0] == split_payload(want)[0]
    assert all(np.array_equal(a, b) for a, b in zip(split_payload(got)[1].values(), split_payload(want)[1].values()))


def test_audit_appends_after_large_records_verify(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(3):
        log.record("s", "fit_round", {"results": {f"t{j}": {"g": np.arange(5.0) + i, "n": 40} for j in range(50)}})
    log.record("s", "study_select", {"n": 40, "name": "é\"x"})
    anchor = json.loads(log.anchor_path.read_text())
    assert "line_sha256" in anchor
    assert verify_audit(log.path).ok
    assert [e["seq"] for e in log.entries()] == [0, 1, 2, 3]
    assert log.entries()[-1]["payload"] == {"n": 40, "name": "é\"x"}
