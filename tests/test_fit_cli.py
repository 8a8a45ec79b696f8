"""`fedrad fit` / `fedrad predict` on tables: pooled and federated (Flower message layer in-process) agree,
and equal scikit-learn; bad input gives one clear line."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from fedrad.cli import app

RUNNER = CliRunner()


def _table(seed=2):
    rng = np.random.default_rng(seed)
    rows = []
    for k, n in enumerate([80, 60, 120]):
        X = rng.normal(size=(n, 4)) + 0.3 * k
        lp = X @ np.array([1.0, -0.5, 0.0, 0.3]) - 0.2
        y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
        d = pd.DataFrame(X, columns=[f"original_glcm_f{i}" for i in range(4)])
        d["age"] = rng.normal(60, 9, n)
        d["response"], d["site"], d["case_id"] = y, f"s{k}", [f"s{k}-{i}" for i in range(n)]
        rows.append(d)
    return pd.concat(rows, ignore_index=True)


def _fit(tmp_path, df, *args):
    src = tmp_path / "t.csv"
    df.to_csv(src, index=False, float_format="%.17g")
    return RUNNER.invoke(app, ["fit", str(src), "--site-col", "site", *args])


def _fit_pooled_and_federated(tmp_path, df, base):
    """The same `fedrad fit` pooled (pooled.json) and --federated (fed.json); both must succeed."""
    r1 = _fit(tmp_path, df, *base, "--out", str(tmp_path / "pooled.json"))
    r2 = _fit(tmp_path, df, *base, "--federated", "--out", str(tmp_path / "fed.json"))
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    return json.loads((tmp_path / "pooled.json").read_text()), json.loads((tmp_path / "fed.json").read_text())


@pytest.mark.parametrize("penalty", [["--penalty", "l2", "--C", "0.5"], ["--penalty", "l1", "--C", "0.2"],
                                     ["--penalty", "elasticnet", "--l1-ratio", "0.5", "--C", "0.3"]])
def test_logistic_federated_equals_pooled_equals_sklearn(tmp_path, penalty):
    df = _table()
    base = ["--model", "logistic", "--outcome", "response", *penalty]
    pooled, fed = _fit_pooled_and_federated(tmp_path, df, base)
    assert fed["fit"]["mode"] == "federated" and fed["fit"]["round_trips"] <= 8
    np.testing.assert_allclose(fed["params"]["coef"], pooled["params"]["coef"], atol=1e-10)
    feats = pooled["features"]
    assert feats == [f"original_glcm_f{i}" for i in range(4)]  # radiomic columns by default, not age
    z = StandardScaler().fit_transform(df[feats])
    C = float(penalty[penalty.index("--C") + 1])
    l1 = {"l2": 0.0, "l1": 1.0, "elasticnet": 0.5}[penalty[1]]
    ref = LogisticRegression(C=C, l1_ratio=l1, solver="saga" if l1 else "lbfgs", tol=1e-12, max_iter=100000)
    ref.fit(z, df["response"])
    np.testing.assert_allclose(fed["params"]["coef_std"], ref.coef_[0], atol=1e-6)


def test_composite_model_and_predict(tmp_path):
    df = _table()
    r = _fit(tmp_path, df, "--model", "logistic", "--outcome", "response", "--federated",
             "--features", "original_glcm_f0,original_glcm_f1,age", "--out", str(tmp_path / "m.json"))
    assert r.exit_code == 0, r.output
    src = tmp_path / "site.csv"
    df[df.site == "s1"].to_csv(src, index=False)
    r = RUNNER.invoke(app, ["predict", str(tmp_path / "m.json"), str(src), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    scores = pd.read_csv(tmp_path / "p.csv")
    assert list(scores.columns) == ["case_id", "probability", "linear_predictor"] and len(scores) == 60
    assert ((scores.probability > 0) & (scores.probability < 1)).all()
    np.testing.assert_allclose(scores.probability, 1 / (1 + np.exp(-scores.linear_predictor)), rtol=1e-12)


def test_bad_inputs_give_clear_errors(tmp_path):
    df = _table()
    one_class = df.copy()
    one_class.loc[one_class.site == "s2", "response"] = 0  # one site with one class only: fine
    r = _fit(tmp_path, one_class, "--model", "logistic", "--outcome", "response", "--federated",
             "--out", str(tmp_path / "a.json"))
    assert r.exit_code == 0, r.output
    missing = df.copy()
    missing.loc[missing.index[missing.site == "s1"][:3], "original_glcm_f2"] = np.nan
    r = _fit(tmp_path, missing, "--model", "logistic", "--outcome", "response", "--federated",
             "--out", str(tmp_path / "b.json"))
    assert r.exit_code == 1 and "s1" in r.output and "original_glcm_f2" in r.output and "3" in r.output
    small = df[(df.site != "s1") | df.index.isin(df.index[df.site == "s1"][:7])]
    r = _fit(tmp_path, small, "--model", "logistic", "--outcome", "response", "--federated",
             "--out", str(tmp_path / "c.json"))
    assert r.exit_code == 1 and "s1" in r.output and "minimum cell size" in r.output
    const = df.assign(original_glcm_f3=1.0)
    r = _fit(tmp_path, const, "--model", "logistic", "--outcome", "response", "--federated",
             "--out", str(tmp_path / "d.json"))
    assert r.exit_code == 0, r.output
    assert "original_glcm_f3" in json.loads((tmp_path / "d.json").read_text())["params"]["excluded_features"]
    r = _fit(tmp_path, df, "--model", "logistic", "--out", str(tmp_path / "e.json"))
    assert r.exit_code == 1 and "needs --outcome" in r.output
    r = _fit(tmp_path, df, "--model", "tree", "--outcome", "response", "--out", str(tmp_path / "e.json"))
    assert r.exit_code == 1 and "use logistic, cox or linear" in r.output


def _survival_table(seed=4):
    rng = np.random.default_rng(seed)
    rows = []
    for k, n in enumerate([90, 70, 40]):
        X = rng.normal(size=(n, 3))
        hazard = np.exp(X @ np.array([0.7, -0.4, 0.0]) + 0.3 * k)
        t = np.round(rng.exponential(1 / hazard) * 10, 1) + 0.1  # rounded: tied times
        c = rng.uniform(2, 20, n)
        d = pd.DataFrame(X, columns=[f"original_shape_f{i}" for i in range(3)])
        d["os_time"], d["os_event"] = np.minimum(t, c), (t <= c).astype(int)
        d["site"], d["case_id"] = f"h{k}", [f"h{k}-{i}" for i in range(n)]
        rows.append(d)
    return pd.concat(rows, ignore_index=True)


def test_cox_federated_equals_pooled_equals_lifelines(tmp_path):
    from lifelines import CoxPHFitter

    df = _survival_table()
    base = ["--model", "cox", "--time", "os_time", "--event", "os_event", "--C", "0.05"]
    pooled, fed = _fit_pooled_and_federated(tmp_path, df, base)
    assert fed["fit"]["round_trips"] <= 10
    np.testing.assert_allclose(fed["params"]["coef_"], pooled["params"]["coef_"], atol=1e-10)
    feats = fed["features"]
    cph = CoxPHFitter(penalizer=0.05).fit(df[feats + ["os_time", "os_event", "site"]], "os_time", "os_event",
                                          strata=["site"], fit_options={"precision": 1e-12, "r_precision": 1e-15})
    np.testing.assert_allclose(fed["params"]["coef_"], cph.params_[feats].to_numpy(), atol=1e-6)
    src = tmp_path / "site.csv"
    df[df.site == "h2"].to_csv(src, index=False)
    r = RUNNER.invoke(app, ["predict", str(tmp_path / "fed.json"), str(src)])
    assert r.exit_code == 0 and "log_partial_hazard" in r.output


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_fedavg_option_is_approximate_but_close(tmp_path, strategy):
    """Flower's own FedAvg/FedProx strategies as the approximate option: near the exact fit, not equal to it."""
    df = _table()
    base = ["--model", "logistic", "--outcome", "response", "--federated"]
    r1 = _fit(tmp_path, df, *base, "--out", str(tmp_path / "exact.json"))
    r2 = _fit(tmp_path, df, *base, "--strategy", strategy, "--rounds", "40", "--out", str(tmp_path / "avg.json"))
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    assert "(approximate), 41 round trips" in r2.output
    exact = np.array(json.loads((tmp_path / "exact.json").read_text())["params"]["coef_std"])
    approx = np.array(json.loads((tmp_path / "avg.json").read_text())["params"]["coef_std"])
    gap = np.abs(approx - exact).max()
    assert 1e-6 < gap < 0.15, gap
    r3 = _fit(tmp_path, df, "--model", "cox", "--time", "response", "--event", "response", "--federated",
              "--strategy", strategy, "--out", str(tmp_path / "x.json"))
    assert r3.exit_code == 1 and "logistic --penalty l2 --federated only" in r3.output


def test_linear_fit_federated_equals_pooled_and_scikit_learn_and_predicts(tmp_path):
    """`fedrad fit --model linear`: a continuous outcome, federated (2 round trips) equal to pooled and to
    scikit-learn's ElasticNet on the standardized pooled rows; `fedrad predict` writes each row's prediction."""
    from sklearn.linear_model import ElasticNet
    from sklearn.preprocessing import StandardScaler

    df = _table()
    df["score"] = df["original_glcm_f0"] * 2.0 - df["original_glcm_f1"] + 0.05 * df["age"] + \
        np.random.default_rng(3).normal(size=len(df))
    base = ["--model", "linear", "--outcome", "score", "--penalty", "elasticnet", "--l1-ratio", "0.5",
            "--C", "0.05", "--features", "original_glcm_f0,original_glcm_f1,original_glcm_f2,age"]
    r = _fit(tmp_path, df, *base, "--federated", "--out", str(tmp_path / "fed.json"))
    assert r.exit_code == 0, r.output
    assert "federated, 2 round trips" in r.output
    r = _fit(tmp_path, df, *base, "--out", str(tmp_path / "pooled.json"))
    assert r.exit_code == 0, r.output
    fed = json.loads((tmp_path / "fed.json").read_text())
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    np.testing.assert_allclose(fed["params"]["coef"], pooled["params"]["coef"], rtol=1e-9, atol=1e-12)
    feats = fed["features"]
    z = StandardScaler().fit_transform(df[feats])
    ref = ElasticNet(alpha=0.05, l1_ratio=0.5, tol=1e-14, max_iter=1_000_000).fit(z, df["score"])
    np.testing.assert_allclose(fed["params"]["coef_std"], ref.coef_, atol=1e-8)
    src = tmp_path / "site.csv"
    df[df.site == "s1"].to_csv(src, index=False)
    r = RUNNER.invoke(app, ["predict", str(tmp_path / "fed.json"), str(src), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    scores = pd.read_csv(tmp_path / "p.csv")
    assert list(scores.columns) == ["case_id", "prediction"] and len(scores) == 60
    want = ref.predict(StandardScaler().fit(df[feats]).transform(df[df.site == "s1"][feats]))
    np.testing.assert_allclose(scores["prediction"], want, atol=1e-6)
