"""Federated ComBat through Flower's message layer (in-process Grid, real site ClientApp) and `fedrad harmonize`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.client.audit import AuditLog
from fedrad.local import harmonize_table

RUNNER = CliRunner()
SIZES = {"hospA": 37, "hospB": 23, "hospC": 51, "hospD": 29}


def _table(seed: int = 0, n_features: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for k, (site, n) in enumerate(SIZES.items()):
        age = np.round(rng.normal(60 + 3 * k, 8, n))  # case mix differs by site
        sex = rng.choice(["F", "M"], n, p=[0.3 + 0.1 * k, 0.7 - 0.1 * k])
        bio = rng.normal(size=(n, n_features))
        x = (1 + 0.3 * k) * bio + 0.04 * age[:, None] + (sex == "M")[:, None] * 0.5 + 2.0 * k
        x[:, 0] = 1e5 + 3e3 * x[:, 0]  # a volume-like feature
        d = pd.DataFrame(x, columns=[f"original_firstorder_F{i}" for i in range(n_features)])
        d.insert(0, "case_id", [f"{site}-{i}" for i in range(n)])
        d["age"], d["sex"], d["site"] = age, sex, site
        parts.append(d)
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _neurocombat(df, feats, **kw):
    from neuroCombat import neuroCombat

    covars = df[["site", "age", "sex"]].copy()
    out = neuroCombat(dat=df[feats].to_numpy(float).T, covars=covars, batch_col="site", categorical_cols=["sex"],
                      continuous_cols=["age"], **kw)
    return out["data"].T


@pytest.mark.parametrize("opts,nc", [
    ({}, {}),
    ({"parametric": False}, {"parametric": False}),
    ({"mean_only": True}, {"mean_only": True}),
    ({"ref_batch": "hospB"}, {"ref_batch": "hospB"}),
])
def test_federated_equals_pooled_equals_neurocombat(opts, nc, monkeypatch):
    monkeypatch.setattr(np, "int", int, raising=False)  # neuroCombat 0.2.12 uses np.int in its ref_batch path
    df = _table()
    feats = [c for c in df.columns if c.startswith("original_")]
    pooled, _ = harmonize_table(df, "site", feats, ["age", "sex"], ["sex"], **opts)
    fed, info = harmonize_table(df, "site", feats, ["age", "sex"], ["sex"], federated=True, **opts)
    ref = _neurocombat(df, feats, **nc)
    scale = np.abs(ref).max(axis=0)
    assert np.max(np.abs(pooled[feats].to_numpy() - ref) / scale) < 1e-8
    assert np.max(np.abs(fed[feats].to_numpy() - pooled[feats].to_numpy()) / scale) < 1e-10
    assert info["round_trips"] == 2
    assert list(fed.columns) == list(df.columns) and (fed.case_id == df.case_id).all()
    if "ref_batch" in opts:
        b = df.site == "hospB"
        np.testing.assert_allclose(fed.loc[b, feats].to_numpy(), df.loc[b, feats].to_numpy(), rtol=1e-12)


def test_no_payload_has_a_patient_dimension(tmp_path):
    """Every array any site sent (read back from the sites' audit logs) is free of a patient axis."""
    df = _table(seed=3)
    feats = [c for c in df.columns if c.startswith("original_")]
    harmonize_table(df, "site", feats, ["age", "sex"], ["sex"], federated=True, workdir=tmp_path)
    n_arrays = 0
    for site, n in SIZES.items():
        entries = AuditLog(tmp_path / site / "audit.jsonl").entries()
        assert [e["request"] for e in entries] == ["combat_stats", "combat_apply"]
        raw = df.loc[df.site == site, feats].to_numpy().ravel()
        for e in entries:
            for key, arr in e["arrays"].items():
                n_arrays += 1
                assert n not in arr["shape"], f"{site} sent {key} with shape {arr['shape']} (n = {n})"
                values = np.asarray(arr["values"], dtype=float).ravel()
                assert not np.isin(raw, values).any(), f"{site} sent a raw feature value in {key}"

            def walk(obj):
                if isinstance(obj, list):
                    assert len(obj) != n or not all(isinstance(v, (int, float)) for v in obj), "patient list"
                    for v in obj:
                        walk(v)
                elif isinstance(obj, dict):
                    for v in obj.values():
                        walk(v)
            walk(e["payload"])
    assert n_arrays == 0 or n_arrays > 4


def test_site_below_min_cell_size_refuses_and_is_named():
    df = _table()
    small = df[(df.site != "hospB") | (df.index.isin(df.index[df.site == "hospB"][:6]))]
    feats = [c for c in df.columns if c.startswith("original_")]
    from fedrad.server.federation import SiteError

    with pytest.raises(SiteError) as info:
        harmonize_table(small, "site", feats, ["age"], federated=True)
    assert list(info.value.failures) == ["hospB"]
    assert "hospB" in str(info.value) and "6" in str(info.value)


def test_harmonize_cli_pooled_and_federated(tmp_path):
    df = _table(seed=5)
    src = tmp_path / "in.csv"
    df.to_csv(src, index=False, float_format="%.17g")
    base = ["harmonize", str(src), "--batch-col", "site", "--covariates", "age,sex", "--categorical", "sex"]
    r1 = RUNNER.invoke(app, base + ["--out", str(tmp_path / "pooled.csv")])
    # hospA / hospB have fewer than 10 patients of one sex: refused at the default k (a categorical level and its
    # complement must both reach k); the sites' operators allow k = 5 here
    r0 = RUNNER.invoke(app, base + ["--federated", "--out", str(tmp_path / "fed.parquet")])
    assert r0.exit_code == 1 and "[min-cell-size]" in r0.output and not (tmp_path / "fed.parquet").exists()
    r2 = RUNNER.invoke(app, base + ["--federated", "--min-cell-size", "5", "--out", str(tmp_path / "fed.parquet")])
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    assert "federated, 2 round trips" in r2.output and "6 features x 140 rows, 4 batches" in r2.output
    pooled = pd.read_csv(tmp_path / "pooled.csv", float_precision="round_trip")
    fed = pd.read_parquet(tmp_path / "fed.parquet")
    feats = [c for c in df.columns if c.startswith("original_")]
    assert list(pooled.columns) == list(df.columns) and list(fed.columns) == list(df.columns)
    np.testing.assert_allclose(fed[feats].to_numpy(), pooled[feats].to_numpy(), rtol=1e-10)
    # the site effect is gone: site means of a harmonized feature are far closer than before
    before = df.groupby("site")[feats[1]].mean().std()
    after = pooled.groupby("site")[feats[1]].mean().std()
    assert after < 0.2 * before
    bad = RUNNER.invoke(app, base[:-4] + ["--covariates", "nope", "--out", str(tmp_path / "x.csv")])
    assert bad.exit_code == 1 and "column 'nope' not in the table" in bad.output


def test_harmonize_cli_scanners_shared_across_sites_covbat_and_smooth_age(tmp_path):
    """`fedrad harmonize --federated --site-col site --batch-col scanner --covbat --smooth age=...`: through Flower's
    message layer in 2 round trips, equal to the pooled ComBat with the same batches, CovBat and knots."""
    from fedrad.common.combat import ComBat
    from fedrad.common.smooth import full_knots

    df = _table(seed=6)
    rng = np.random.default_rng(1)
    df["scanner"] = rng.choice(["GE", "Siemens"], len(df))
    feats = [c for c in df.columns if c.startswith("original_")]
    df.loc[df["scanner"] == "GE", feats] = df.loc[df["scanner"] == "GE", feats] * 1.3 + 1.0
    src = tmp_path / "in.parquet"
    df.to_parquet(src)
    args = ["harmonize", str(src), "--batch-col", "scanner", "--covariates", "sex", "--categorical", "sex",
            "--covbat", "--smooth", "age=45,63,85", "--min-cell-size", "3"]
    r = RUNNER.invoke(app, args + ["--federated", "--site-col", "site", "--out", str(tmp_path / "fed.parquet")])
    assert r.exit_code == 0, r.output
    assert "federated, 2 round trips" in r.output and "CovBat" in r.output and "ComBat-GAM smooth age" in r.output
    fed = pd.read_parquet(tmp_path / "fed.parquet")
    model = ComBat(["sex"], ["sex"], covbat=True, smooth={"age": list(full_knots([63], 45, 85))})
    want = model.fit_transform(df[feats].to_numpy(float), "scanner", df)
    np.testing.assert_allclose(fed[feats].to_numpy(), want, rtol=1e-9)
    pooled = RUNNER.invoke(app, args + ["--out", str(tmp_path / "pooled.parquet")])
    assert pooled.exit_code == 0, pooled.output
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "pooled.parquet")[feats].to_numpy(), want, rtol=1e-12)
    bad = RUNNER.invoke(app, args[:-2] + ["--smooth", "age=30", "--out", str(tmp_path / "x.csv")])
    assert bad.exit_code == 1 and "--smooth 'age=30'" in bad.output
    alone = RUNNER.invoke(app, args + ["--site-col", "site", "--out", str(tmp_path / "x.csv")])
    assert alone.exit_code == 1 and "--site-col needs --federated" in alone.output


def test_nested_combat_over_two_batch_columns_equals_sequential_neurocombat(tmp_path, monkeypatch):
    """Nested ComBat (Horng et al. 2022): manufacturer, then kernel, each pass on the previous output; federated
    (sites = hospitals, batch labels shared across them) equals neuroCombat applied twice in the same order, in
    2 round trips per column; the CLI takes --batch-col manufacturer,kernel."""
    from fedrad.local import harmonize_nested

    monkeypatch.setattr(np, "int", int, raising=False)
    df = _table(seed=8)
    rng = np.random.default_rng(3)
    df["manufacturer"] = rng.choice(["GE", "Siemens"], len(df))
    df["kernel"] = rng.choice(["soft", "sharp"], len(df))
    feats = [c for c in df.columns if c.startswith("original_")]
    df.loc[df["manufacturer"] == "GE", feats] += 1.5
    df.loc[df["kernel"] == "sharp", feats] *= 1.4
    expect = df.copy()
    for col in ("manufacturer", "kernel"):
        covars = expect[[col, "age", "sex"]].copy()
        from neuroCombat import neuroCombat
        expect[feats] = neuroCombat(dat=expect[feats].to_numpy(float).T, covars=covars, batch_col=col,
                                    categorical_cols=["sex"], continuous_cols=["age"])["data"].T
    fed, info = harmonize_nested(df, ["manufacturer", "kernel"], feats, ["age", "sex"], ["sex"], federated=True,
                                 site_col="site", min_cell_size=3)
    assert info["round_trips"] == 4 and [p["batch_col"] for p in info["passes"]] == ["manufacturer", "kernel"]
    scale = df[feats].to_numpy(float).std(axis=0)
    assert np.max(np.abs(fed[feats].to_numpy(float) - expect[feats].to_numpy(float)) / scale) < 1e-8
    src = tmp_path / "in.parquet"
    df.to_parquet(src)
    r = RUNNER.invoke(app, ["harmonize", str(src), "--batch-col", "manufacturer,kernel", "--covariates", "age,sex",
                            "--categorical", "sex", "--out", str(tmp_path / "nested.parquet")])
    assert r.exit_code == 0, r.output
    assert "nested ComBat: manufacturer (2 batches), then kernel (2 batches)" in r.output
    pooled = pd.read_parquet(tmp_path / "nested.parquet")
    np.testing.assert_allclose(pooled[feats].to_numpy(), fed[feats].to_numpy(), rtol=1e-10)


def test_harmonize_smooth_flags_features_at_the_edges_of_the_alpha_grid(tmp_path):
    """`fedrad harmonize --smooth`: features whose GCV alpha is the grid's largest (a straight age effect: the
    stiffest smooth is best) or smallest (a wiggly one under a grid of large alphas only) are counted and named,
    with what to do; the counts equal those of the pooled ComBat-GAM reference's per-feature alphas."""
    from fedrad.common.combat import ComBat
    from fedrad.common.smooth import DEFAULT_ALPHAS, full_knots

    rng = np.random.default_rng(5)
    n = 240
    age = rng.uniform(20, 80, n)
    df = pd.DataFrame({"site": np.repeat(["a", "b", "c"], n // 3), "age": age})
    for i in range(3):  # straight in age
        df[f"original_firstorder_Lin{i}"] = 0.05 * age + rng.normal(0, 1, n) + (df["site"] == "b") * 0.8
    for i in range(3):  # a sine of age
        df[f"original_firstorder_Sin{i}"] = 2 * np.sin((age - 50) / 5.0) + rng.normal(0, 0.5, n)
    src = tmp_path / "in.parquet"
    df.to_parquet(src)
    knots = [20, 30, 40, 50, 60, 70, 80]
    base = ["harmonize", str(src), "--batch-col", "site", "--smooth", "age=" + ",".join(map(str, knots)),
            "--out", str(tmp_path / "h.parquet")]
    feats = [c for c in df.columns if c.startswith("original_")]

    def alphas(grid):
        model = ComBat([], smooth={"age": list(full_knots(knots[1:-1], 20, 80))}, smooth_alphas=grid)
        model.fit(df[feats].to_numpy(float), df["site"], df)
        return np.array(model.reference_.smooth_alpha)

    r = RUNNER.invoke(app, base)
    assert r.exit_code == 0, r.output
    top = [f for f, a in zip(feats, alphas(None)) if a == DEFAULT_ALPHAS.max()]
    assert top and all("Lin" in f for f in top)
    assert (f"warning: {len(top)} of 6 features sit at the top of the GCV alpha grid (1e+07: the stiffest smooth "
            "the grid allows") in r.output
    assert ", ".join(top[:3]) in r.output and "widen the grid with larger values (--smooth-alphas" in r.output
    assert "at the bottom" not in r.output
    r = RUNNER.invoke(app, base + ["--federated", "--min-cell-size", "5", "--smooth-alphas", "1e5,1e6,1e7"])
    assert r.exit_code == 0, r.output
    got = alphas([1e5, 1e6, 1e7])
    bottom = [f for f, a in zip(feats, got) if a == 1e5]
    assert {f for f in feats if "Sin" in f} <= set(bottom)  # every wiggly feature wants a smaller alpha
    assert f"warning: {len(bottom)} of 6 features sit at the bottom of the GCV alpha grid (1e+05" in r.output
    assert "widen the grid with smaller values" in r.output
    bad = RUNNER.invoke(app, base[:4] + ["--smooth-alphas", "1,x", "--out", str(tmp_path / "x.csv")])
    assert bad.exit_code == 1 and "fedrad: error: --smooth-alphas" in bad.output


def test_federated_smooth_harmonize_exits_cleanly(tmp_path):
    """`fedrad harmonize --federated --smooth` as a process, three times: exit 0 and no native thread outliving the
    interpreter (C++'s "terminate called without an active exception" on stderr)."""
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    n = 120
    age = rng.uniform(20, 80, n)
    df = pd.DataFrame({"site": np.repeat(["a", "b", "c"], n // 3), "age": age})
    for i in range(4):
        df[f"original_firstorder_F{i}"] = 0.05 * age + rng.normal(0, 1, n)
    df.to_parquet(tmp_path / "in.parquet")
    for run in range(3):
        p = subprocess.run([sys.executable, "-m", "fedrad.cli", "harmonize", str(tmp_path / "in.parquet"),
                            "--batch-col", "site", "--smooth", "age=20,50,80", "--federated", "--min-cell-size", "5",
                            "--out", str(tmp_path / f"h{run}.parquet")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "terminate called" not in p.stderr, p.stderr
