"""Privacy options: SecAgg+ for the exact logistic fit, central DP for FedAvg (docs/PRIVACY.md).

References are independent of fedrad's code: exact rational sums (fractions), Flower's own quantiser,
scikit-learn's LogisticRegression, numerical integration of the Gaussian hockey-stick divergence; the Flower
tests run the real ClientApp through the in-process LocalGrid and inspect what the coordinator received.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.stats
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from fedrad.common.glm import fit_federated, fit_pooled
from fedrad.common.privacy import (
    SecureAggregationError,
    clip_update,
    decode_sums,
    digit_bits,
    digits_to_wire,
    encode_digits,
    fit_secure_federated,
    gaussian_delta,
    gaussian_epsilon,
    noise_multiplier_for,
    rdp_epsilon,
)

FEATS = [f"f{i}" for i in range(4)]


def _table(seed=2, sizes=(80, 60, 120), offset=False):
    rng = np.random.default_rng(seed)
    rows = []
    for k, n in enumerate(sizes):
        z = rng.normal(size=(n, 4)) + 0.3 * k
        y = (rng.random(n) < 1 / (1 + np.exp(-(z @ np.array([1.0, -0.5, 0.0, 0.3]) - 0.2)))).astype(int)
        x = z * [1.0, 10.0, 1e3, 1e-3] + ([0.0, 5.0, 1e6, 0.0] if offset else 0.0)  # units of radiomic features
        d = pd.DataFrame(x, columns=FEATS)
        d["y"], d["site"] = y, f"s{k}"
        rows.append(d)
    return pd.concat(rows, ignore_index=True)


def _sites(df):
    return {s: (d[FEATS].to_numpy(), d["y"].to_numpy()) for s, d in df.groupby("site")}


def _sklearn(df, C, l1_ratio=0.0):
    z = StandardScaler().fit_transform(df[FEATS])
    ref = LogisticRegression(C=C, l1_ratio=l1_ratio, solver="saga" if l1_ratio else "lbfgs", tol=1e-12,
                             max_iter=100000).fit(z, df["y"])
    return ref.coef_[0], ref.intercept_[0]


# ---------------------------------------------------------------------------------------------------------------
# exact integer encoding
# ---------------------------------------------------------------------------------------------------------------
def test_digit_sums_are_exact_sums():
    """Five sites' values over 40 orders of magnitude, both signs: the decoded sum is the exact rational sum
    rounded once to float64 (bit for bit), and Flower's own quantiser maps the wire floats onto the digits."""
    from flwr.common.secure_aggregation.quantization import quantize

    rng = np.random.default_rng(0)
    k = 5
    h = digit_bits(k)
    layout = [{"name": "v", "shape": [200], "exp": 128, "digits": 9},
              {"name": "n", "shape": [], "exp": 40, "digits": 2}]
    values = [{"v": rng.normal(size=200) * 10.0 ** rng.integers(-20, 25, 200), "n": float(rng.integers(10, 900))}
              for _ in range(k)]
    digits = [encode_digits(v, layout, h) for v in values]
    for d in digits:
        assert d.min() >= 0 and d.max() <= 2 ** h
        wire = digits_to_wire(d, h)
        assert np.all(np.abs(wire) <= 1.0)
        np.testing.assert_array_equal(quantize([wire], 1.0, 2 ** h)[0], d)  # Flower's stochastic rounding: exact
    total = decode_sums(sum(digits), layout, h, k)
    exact = [float(sum(Fraction(float(v["v"][i])) for v in values)) for i in range(200)]
    np.testing.assert_array_equal(total["v"], exact)
    assert total["n"] == sum(v["n"] for v in values)


def test_values_outside_the_agreed_range_are_refused_not_clipped():
    layout = [{"name": "grad", "shape": [3], "exp": 10, "digits": 3}]
    with pytest.raises(SecureAggregationError, match=r"grad\[1\] = 2000 at site 'h2' is outside the agreed range ±2\^10"):
        encode_digits({"grad": [1.0, 2000.0, 3.0]}, layout, 29, site="h2")
    with pytest.raises(SecureAggregationError, match=r"grad\[2\] is nan"):
        encode_digits({"grad": [1.0, 2.0, np.nan]}, layout, 29)
    with pytest.raises(SecureAggregationError, match="at least 3 sites"):
        digit_bits(2)


@pytest.mark.parametrize("penalty,C,l1", [("l2", 0.5, 0.0), ("l1", 0.2, 1.0), (None, 1.0, None)])
def test_secure_fit_equals_plain_fit_and_sklearn(penalty, C, l1):
    """Pure form: sums of integer digits, as SecAgg+ computes them. Features 1e6 +- 1e3 and 1e-3 in scale."""
    df = _table(offset=True)
    sites = _sites(df)
    plain = fit_federated(sites, feature_names=FEATS, penalty=penalty, C=C)
    secure = fit_secure_federated(sites, feature_names=FEATS, penalty=penalty, C=C)
    np.testing.assert_allclose(secure.coef_std_, plain.coef_std_, rtol=0, atol=1e-12)
    assert secure.n_rounds_ == plain.n_rounds_ + 1 and secure.n_per_site_ == {}
    if penalty is not None:
        coef, _ = _sklearn(df, C, l1)
        np.testing.assert_allclose(secure.coef_std_, coef, atol=1e-6)
    else:
        pooled = fit_pooled(df[FEATS], df["y"], penalty=None)
        np.testing.assert_allclose(secure.coef_std_, pooled.coef_std_, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# SecAgg+ over Flower (LocalGrid: the real ClientApp in-process)
# ---------------------------------------------------------------------------------------------------------------
def _masked_vectors(messages):
    """(site node, int vector) of every masked vector the coordinator received."""
    from flwr.common import bytes_to_ndarray

    out = []
    for m in messages:
        if m.has_error() or "secaggplus_configs" not in m.content.config_records:
            continue
        cfg = m.content.config_records["secaggplus_configs"]
        if "masked_params" in cfg:
            arrays = [bytes_to_ndarray(b) for b in cfg["masked_params"]]
            out.append((m.metadata.src_node_id, np.concatenate([a.reshape(-1) for a in arrays[1:]])))
    return out


def test_secure_fit_over_flower_sums_only(tmp_path):
    from fedrad.common.plan import fit_plan
    from fedrad.client.audit import AuditLog
    from fedrad.local import split_into_sites
    from fedrad.server.secure import secure_logistic_fit

    df = _table()
    C = 0.5
    sites = split_into_sites(df, "site", tmp_path)
    fed = sites.federation(plan=fit_plan({"model": "logistic", "features": FEATS, "outcome": "y"}, secure=True))
    keep = []
    model, info = secure_logistic_fit(fed, FEATS, {"model": "logistic", "features": FEATS, "outcome": "y"},
                                      C=C, keep=keep)
    plain = fit_federated(_sites(df), feature_names=FEATS, C=C)
    coef, intercept = _sklearn(df, C)
    np.testing.assert_allclose(model.coef_std_, plain.coef_std_, rtol=0, atol=1e-12)  # measured: <= 3e-16
    np.testing.assert_allclose(model.coef_std_, coef, atol=1e-6)
    assert abs(model.intercept_std_ - intercept) < 1e-6
    assert info["secure_rounds"] == plain.n_rounds_ + 1 == len(keep)
    assert info["round_trips"] == 4 * info["secure_rounds"] and info["sites"] == ["s0", "s1", "s2"]

    h = digit_bits(3)
    for i, (request, rnd) in enumerate(keep):
        # each site's audit record holds its sums in the clear, with the note; their digits add up to exactly
        # what the coordinator unmasked
        plain_digits = {}
        for s in sites.tables:
            recs = [r for r in AuditLog(tmp_path / s / "audit.jsonl").entries() if r["request"] == "secure_fit_round"]
            rec = recs[i]
            assert rec["status"] == "sent" and "left masked by SecAgg+" in rec["payload"]["secure_aggregation"]["note"]
            assert rec["payload"]["secure_aggregation"]["stage"] == request["stage"]
            sums = {k: np.asarray(v["values"]) for k, v in rec["arrays"].items() if k.startswith("sums/")}
            sums = {k.split("/", 1)[1]: v for k, v in sums.items()}
            sums.update({k: v for k, v in rec["payload"]["sums"].items() if not isinstance(v, dict)})
            plain_digits[s] = encode_digits(sums, request["layout"], h)
        np.testing.assert_array_equal(sum(plain_digits.values()), rnd.digit_sums)
        # what reached the coordinator: one masked vector per site, none of them a site's digits, each spread
        # over the 2**32 modulus (plain digits are <= 2**h), and no plain parameters in any reply
        masked = _masked_vectors(rnd.received)
        assert len(masked) == 3
        for _node, vec in masked:
            assert vec.size == plain_digits["s0"].size
            for d in plain_digits.values():
                assert np.mean(vec == d) < 0.01
            assert np.mean(vec > 2 ** (h + 1)) > 0.5
        for m in rnd.received:
            if not m.has_error():
                assert all(len(rec) == 0 for rec in m.content.array_records.values())


def test_secure_refusal_names_the_site_and_nothing_is_unmasked(tmp_path):
    from fedrad.common.plan import fit_plan
    from fedrad.client.audit import AuditLog
    from fedrad.local import split_into_sites
    from fedrad.server.federation import SiteError
    from fedrad.server.secure import secure_logistic_fit

    df = _table()
    df.loc[df.site == "s1", "f2"] *= 1e37  # sum beyond ±2**128: would be clipped
    sites = split_into_sites(df, "site", tmp_path)
    fed = sites.federation(plan=fit_plan({"model": "logistic", "features": FEATS, "outcome": "y"}, secure=True))
    stages = []
    inner = fed.grid.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if "secaggplus_configs" in m.content.config_records:
                stages.append(m.content.config_records["secaggplus_configs"]["stage"])
        return inner(messages, timeout=timeout)

    fed.grid.send_and_receive = spy
    with pytest.raises(SiteError) as err:
        secure_logistic_fit(fed, FEATS, {"model": "logistic", "features": FEATS, "outcome": "y"})
    assert list(err.value.failures) == ["s1"]
    # the reply names the site and the rule, never the value; the site's local log has the details
    assert err.value.failures["s1"].endswith("[policy]") and "e+" not in err.value.failures["s1"]
    log = (tmp_path / "s1" / "site.log").read_text()
    assert "sum_x[2]" in log and "outside the agreed range ±2^128" in log
    assert "unmask" not in stages and stages.count("collect_masked_vectors") == 3
    refused = [r for r in AuditLog(tmp_path / "s1" / "audit.jsonl").entries() if r["status"] == "refused"]
    assert len(refused) == 1 and refused[0]["request"] == "secure_fit_round"


def _fit_cli(tmp_path, df, *args):
    from fedrad.cli import app

    src = tmp_path / "t.csv"
    df.to_csv(src, index=False, float_format="%.17g")
    return CliRunner().invoke(app, ["fit", str(src), "--site-col", "site", "--model", "logistic",
                                    "--outcome", "y", "--features", ",".join(FEATS), *args])


def test_cli_secure_aggregation(tmp_path):
    df = _table()
    r1 = _fit_cli(tmp_path, df, "--federated", "--C", "0.5", "--out", str(tmp_path / "plain.json"))
    r2 = _fit_cli(tmp_path, df, "--federated", "--C", "0.5", "--secure-aggregation", "--out", str(tmp_path / "s.json"))
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    secure = json.loads((tmp_path / "s.json").read_text())
    n = plain["fit"]["round_trips"] + 1  # one extra round: the global mean before the centred sums
    assert f"federated with SecAgg+, {n} secure rounds = {4 * n} round trips" in r2.output
    np.testing.assert_allclose(secure["params"]["coef"], plain["params"]["coef"], rtol=1e-12)
    assert secure["fit"]["secure_aggregation"] == "SecAgg+" and secure["params"]["n_per_site"] == {}
    r3 = _fit_cli(tmp_path, df[df.site != "s2"], "--federated", "--secure-aggregation", "--out", str(tmp_path / "x"))
    assert r3.exit_code == 1 and "needs at least 3 sites, got 2" in r3.output
    r4 = _fit_cli(tmp_path, df, "--secure-aggregation", "--out", str(tmp_path / "x"))
    assert r4.exit_code == 1 and "exact federated logistic fit only" in r4.output
    r5 = _fit_cli(tmp_path, df, "--federated", "--dp-noise", "1", "--out", str(tmp_path / "x"))
    assert r5.exit_code == 1 and "apply to --strategy fedavg" in r5.output


# ---------------------------------------------------------------------------------------------------------------
# differential privacy: accounting
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu,eps", [(0.3, 0.1), (1.0, 0.5), (1.0, 2.0), (3.0, 4.0), (0.05, 0.0)])
def test_gaussian_delta_equals_hockey_stick_integral(mu, eps):
    """δ(ε) = ∫ (p − e^ε q)+ for p = N(μ, 1), q = N(0, 1) (the definition), by numerical integration."""
    p, q = scipy.stats.norm(mu, 1.0), scipy.stats.norm(0.0, 1.0)
    x0 = eps / mu + mu / 2  # p > e^eps q to the right of x0
    ref, _ = scipy.integrate.quad(lambda x: p.pdf(x) - math.exp(eps) * q.pdf(x), x0, np.inf, epsabs=1e-14)
    assert gaussian_delta(mu, eps) == pytest.approx(ref, rel=1e-7, abs=1e-13)


def test_epsilon_composition_calibration_and_rdp():
    # T releases at noise z = one release at z / sqrt(T)
    assert gaussian_epsilon(2.0, 16, 1e-5) == pytest.approx(gaussian_epsilon(0.5, 1, 1e-5), rel=1e-9)
    eps = gaussian_epsilon(3.0, 20, 1e-5)
    assert gaussian_delta(math.sqrt(20) / 3.0, eps) == pytest.approx(1e-5, rel=1e-8)
    assert noise_multiplier_for(eps, 1e-5, 20) == pytest.approx(3.0, rel=1e-8)
    # the Rényi-DP conversion is an upper bound, and not a loose one
    for z, t in [(0.8, 10), (3.0, 20), (10.0, 100)]:
        exact, rdp = gaussian_epsilon(z, t, 1e-5), rdp_epsilon(z, t, 1e-5)
        assert exact < rdp < 1.6 * exact
    assert gaussian_epsilon(0.0, 5, 1e-5) == math.inf and gaussian_epsilon(1.0, 0, 1e-5) == 0.0


def test_rdp_matches_google_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    for z, t in [(1.0, 20), (5.0, 20)]:
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(dp_event.GaussianDpEvent(z), t)
        assert rdp_epsilon(z, t, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert dp_accounting


# ---------------------------------------------------------------------------------------------------------------
# differential privacy: FedAvg over Flower
# ---------------------------------------------------------------------------------------------------------------
def test_clip_update_is_flowers_flatclip():
    from flwr.supercore.differential_privacy import compute_clip_model_update

    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 30.0):
        w, w0 = rng.normal(size=7) * scale, rng.normal(size=7)
        ours, norm = clip_update(w, w0, 0.5)
        theirs = [w.copy()]
        compute_clip_model_update(theirs, [w0], 0.5)
        np.testing.assert_array_equal(ours, theirs[0])
        assert norm == pytest.approx(np.linalg.norm(w - w0), rel=1e-12)
        assert np.linalg.norm(ours - w0) <= 0.5 * (1 + 1e-12)


class _Recorder:
    """Wraps a LocalGrid's send_and_receive: every message the coordinator sent and every reply it received."""

    def __init__(self, grid):
        self.sent, self.received = [], []
        self._inner = grid.send_and_receive
        grid.send_and_receive = self

    def __call__(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        replies = list(self._inner(messages, timeout=timeout))
        self.received.append(replies)
        return replies


def test_dp_fedavg_clips_at_site_audits_what_is_sent_and_adds_calibrated_noise(tmp_path, monkeypatch):
    from fedrad.client.audit import AuditLog
    from fedrad.local import LocalSites, fit_fedavg

    df = _table(sizes=(80, 60, 120, 90))
    recorders = []
    original = LocalSites.federation

    def federation(self, log=None, plan=None):
        fed = original(self, log, plan)
        recorders.append(_Recorder(fed.grid))
        return fed

    monkeypatch.setattr(LocalSites, "federation", federation)
    z, clip, rounds, k = 1.5, 0.3, 25, 4
    np.random.seed(7)
    model, info = fit_fedavg(df, "site", FEATS, "y", rounds=rounds, dp_noise=z, dp_clip=clip, workdir=tmp_path)
    rec = recorders[0]
    dp = info["dp"]
    assert dp["releases"] == rounds and dp["noise_sd"] == pytest.approx(z * clip / k)
    assert dp["epsilon"] == pytest.approx(gaussian_epsilon(z, rounds, 1e-5), rel=1e-9)
    train = [(s, r) for s, r in zip(rec.sent, rec.received) if s and s[0].metadata.message_type == "train"]
    assert len(train) == rounds
    noise = []
    audited = {s: [r for r in AuditLog(tmp_path / s / "audit.jsonl").entries() if r["request"] == "fedavg"]
               for s in ("s0", "s1", "s2", "s3")}
    for i, (sent, replies) in enumerate(train):
        w0 = sent[0].content["arrays"]["weights"].numpy()
        assert sent[0].content["config"]["clipping_norm"] == clip
        got = []
        for r in replies:
            w = r.content["arrays"]["weights"].numpy()
            assert np.linalg.norm(w - w0) <= clip * (1 + 1e-12)  # clipped at the site
            assert r.content["metrics"]["site-weight"] == 1
            got.append(w)
        # the audit logs hold exactly what left (fixedclipping_mod changed nothing on the way)
        logged = [np.asarray(audited[s][i]["arrays"]["weights"]["values"]) for s in audited]
        assert sorted(map(tuple, logged)) == sorted(map(tuple, got))
        assert all(audited[s][i]["payload"]["dp"]["clipping_norm"] == clip for s in audited)
        nxt = train[i + 1][0][0].content["arrays"]["weights"].numpy() if i + 1 < rounds else \
            np.concatenate([[model.intercept_std_], model.coef_std_])
        noise.append(nxt - np.mean(got, axis=0))  # equal weights; the rest is the coordinator's noise
    noise = np.concatenate(noise)
    assert noise.size == rounds * 5
    assert abs(noise.mean()) < 4 * z * clip / k / math.sqrt(noise.size)
    assert np.std(noise) == pytest.approx(z * clip / k, rel=0.25)


def test_dp_epsilon_target_sets_the_noise():
    from fedrad.local import fit_fedavg

    np.random.seed(3)
    _, info = fit_fedavg(_table(), "site", FEATS, "y", rounds=5, dp_epsilon=8.0, dp_delta=1e-6)
    assert info["dp"]["epsilon"] == pytest.approx(8.0, rel=1e-6)
    assert info["dp"]["noise_multiplier"] == pytest.approx(noise_multiplier_for(8.0, 1e-6, 5), rel=1e-12)


def test_cli_dp_options(tmp_path):
    df = _table()
    r = _fit_cli(tmp_path, df, "--federated", "--strategy", "fedavg", "--rounds", "4", "--dp-noise", "2",
                 "--dp-clip", "0.5", "--out", str(tmp_path / "dp.json"))
    assert r.exit_code == 0, r.output
    eps = gaussian_epsilon(2.0, 4, 1e-5)
    assert f"central DP: noise multiplier 2, clip 0.5, epsilon {eps:.3g} at delta 1e-05 (site level)" in r.output
    dp = json.loads((tmp_path / "dp.json").read_text())["fit"]["dp"]
    assert dp["epsilon"] == pytest.approx(eps) and dp["releases"] == 4 and dp["noise_sd"] == pytest.approx(2 * 0.5 / 3)
    r = _fit_cli(tmp_path, df, "--federated", "--strategy", "fedavg", "--dp-epsilon", "-1", "--out", str(tmp_path / "x"))
    assert r.exit_code == 1 and "--dp-epsilon > 0" in r.output
