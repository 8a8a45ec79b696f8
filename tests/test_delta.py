import numpy as np
import pandas as pd
import pytest

from fedrad.common.delta import delta_features


def _long():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        base = rng.normal(10, 2, 3)
        for tp, x in (("pre", base), ("post", base * 0.8 + 1)):
            rows.append({"case_id": f"c{i}", "timepoint": tp, "f1": x[0], "f2": x[1], "f3": x[2], "age": 50 + i})
    rows.append({"case_id": "lonely", "timepoint": "pre", "f1": 1.0, "f2": 1.0, "f3": 1.0, "age": 70})
    return pd.DataFrame(rows)


def test_difference_and_relative_change():
    df = _long()
    res = delta_features(df, ["f1", "f2", "f3"], order=["pre", "post"])
    t = res.table.set_index("case_id")
    pre = df[df.timepoint == "pre"].set_index("case_id")
    post = df[df.timepoint == "post"].set_index("case_id")
    np.testing.assert_allclose(t.loc["c3", "delta_f2"], post.loc["c3", "f2"] - pre.loc["c3", "f2"])
    assert list(res.skipped_cases) == ["lonely"] and len(t) == 6 and t.loc["c2", "age"] == 52
    rel = delta_features(df, ["f1", "f2"], order=["pre", "post"], mode="relative").table.set_index("case_id")
    np.testing.assert_allclose(rel["rel_f1"], (post.loc[rel.index, "f1"] - pre.loc[rel.index, "f1"])
                               / pre.loc[rel.index, "f1"].abs())


def test_zero_baseline_feature_is_dropped_not_inf():
    df = _long()
    df.loc[(df.case_id == "c1") & (df.timepoint == "pre"), "f3"] = 0.0
    res = delta_features(df, ["f1", "f3"], order=["pre", "post"], mode="relative")
    assert "f3" in res.dropped_features and "rel_f3" not in res.table
    assert np.isfinite(res.table["rel_f1"]).all()


def test_needs_two_timepoints():
    df = _long()
    df.loc[0, "timepoint"] = "mid"
    with pytest.raises(ValueError, match="exactly two timepoints"):
        delta_features(df, ["f1"])
