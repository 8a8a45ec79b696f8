"""Tests for fedrad.common.smooth: the B-spline basis and penalty against statsmodels' BSplines, the
penalized fit against statsmodels' GLMGam, the federated fit (sites' square-root forms) against the
pooled fit with the explicit hat matrix, GCV's choice on a known smooth, the k-anonymous histogram
knots, and neuroHarmonize's ComBat-GAM covariate fit reproduced at the alpha it selected.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from fedrad.common import smooth as sm
from fedrad.common.combat import _sqrt_regression

statsmodels_gam = pytest.importorskip("statsmodels.gam.api")
BSplines, GLMGam = statsmodels_gam.BSplines, statsmodels_gam.GLMGam

TOL = 1e-8
SHIFT = np.array([0.0, 0.8, -0.5, 1.2])


def truth(age):
    """Known nonlinear age effect (one sine period over 20-80 years)."""
    return 1.5 * np.sin((age - 20.0) / 60.0 * 2.0 * np.pi)


def make_data(seed=0, n=160, n_batches=4, features=2, ranges=None):
    """Synthetic ComBat-GAM data: batch shifts, sine age effect, a linear sex effect, noise 0.5.

    ``ranges`` gives each batch its own age range (sites with different case mixes)."""
    rng = np.random.default_rng(seed)
    batch = np.sort(rng.integers(0, n_batches, n))
    if ranges is None:
        age = rng.uniform(20, 80, n)
    else:
        age = np.array([rng.uniform(*ranges[b]) for b in batch])
    age = np.round(age, 1)
    sex = rng.integers(0, 2, n).astype(float)
    onehot = np.eye(n_batches)[batch]
    y = np.column_stack([
        truth(age) * (1 + 0.5 * j) + (0.4 - 0.2 * j) * sex + onehot @ (SHIFT[:n_batches] * (j + 1))
        + rng.normal(0, 0.5, n) for j in range(features)])
    return age, sex, batch, onehot, y


def quantile_knots(x, df=10, degree=3):
    """statsmodels' default knots, computed independently: np.percentile at equally spaced levels, data range."""
    n_inner = df - degree - 1
    inner = np.percentile(x, 100 * np.linspace(0, 1, n_inner + 2)[1:-1])
    return sm.full_knots(inner, x.min(), x.max(), degree)


def sm_bsplines(x, knots, degree=3):
    return BSplines(x, df=len(knots) - degree - 1, degree=degree, knot_kwds=[{"all_knots": knots}])


def design_and_penalty(age, sex, knots):
    basis = sm.bspline_basis(age, knots)
    design = np.column_stack([sex, basis])
    return design, sm.embed_penalty(sm.penalty_matrix(knots), 1, design.shape[1])


def site_messages(design, y, batch):
    """What the sites send (combat.site_combat_stats' R, Z, rss): per-batch square-root forms of the
    batch-centred design and features, stacked by the server."""
    rs, zs, rho2 = [], [], 0.0
    for b in np.unique(batch):
        m = batch == b
        xc = design[m] - design[m].mean(axis=0)
        yc = y[m] - y[m].mean(axis=0)
        r, z, rss = _sqrt_regression(xc, yc)
        rs.append(r)
        zs.append(z)
        rho2 = rho2 + rss
    return np.vstack(rs), np.vstack(zs), rho2


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(b), 1e-300)))


# ------------------------------------------------------------------------------------------------
# basis and penalty
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("kind", ["quantile", "plan", "uneven"])
def test_basis_and_penalty_equal_statsmodels(kind, degree):
    age, *_ = make_data(seed=1)
    if kind == "quantile":
        knots = quantile_knots(age, degree=degree)
    elif kind == "plan":
        knots = sm.full_knots([30, 40, 50, 60, 70], 15, 90, degree)
    else:
        knots = sm.full_knots([21, 22.5, 47, 79], 20, 80, degree)
    ref = sm_bsplines(np.clip(age, knots[0], knots[-1]), knots, degree)
    x = np.concatenate([age, knots[[0, -1]]])          # the boundary knots themselves included
    ref_x = ref.smoothers[0].transform(np.clip(x, knots[0], knots[-1]))
    assert sm.bspline_basis(x, knots, degree).shape == ref_x.shape == (x.size, len(knots) - degree - 2)
    assert np.abs(sm.bspline_basis(x, knots, degree) - ref_x).max() < 1e-10
    assert np.abs(sm.bspline_basis_der2(age, knots, degree) - ref.smoothers[0].der2_basis).max() < 1e-10
    s_ref = ref.penalty_matrices[0]
    assert np.abs(sm.penalty_matrix(knots, degree) - s_ref).max() < 1e-10 * np.abs(s_ref).max()
    assert sm.basis_names("age", knots, degree) == [c.replace("x0", "age") for c in ref.col_names]


def test_penalty_is_the_knot_integral_not_a_data_sum():
    """statsmodels' cov_der2 does not depend on the data (so nothing is federated): equal for two data sets
    with the same knots, unlike the data sums of B''B''^T, and equal to the exact integral (Gauss-Legendre
    on each knot interval, exact for the piecewise-quadratic integrand)."""
    knots = sm.full_knots([30, 41, 50, 66], 20, 80)
    rng = np.random.default_rng(3)
    x1, x2 = rng.uniform(20, 80, 300), rng.uniform(40, 60, 25)
    s1, s2 = sm_bsplines(x1, knots).penalty_matrices[0], sm_bsplines(x2, knots).penalty_matrices[0]
    assert np.abs(s1 - s2).max() == 0.0
    d1, d2 = sm.bspline_basis_der2(x1, knots), sm.bspline_basis_der2(x2, knots)
    assert np.abs(d1.T @ d1 - s1).max() > np.abs(s1).max()        # the data sums differ from it (~5x here)
    assert np.abs(d2.T @ d2 - s2).max() > 0.5 * np.abs(s2).max()  # and from each other
    nodes, weights = np.polynomial.legendre.leggauss(3)
    u = np.unique(knots)
    exact = 0.0
    for lo, hi in zip(u[:-1], u[1:]):
        t = (hi - lo) / 2 * nodes + (hi + lo) / 2
        b = sm.bspline_basis_der2(t, knots)
        exact = exact + (hi - lo) / 2 * (b.T * weights) @ b
    assert np.abs(sm.penalty_matrix(knots) - exact).max() < 1e-12 * np.abs(exact).max()
    assert np.abs(s1 - exact).max() < 1e-12 * np.abs(exact).max()


def test_clipping_to_the_boundary_knots():
    knots = sm.full_knots([40, 60], 30, 70)
    x = np.array([10.0, 29.99, 30.0, 50.0, 70.0, 70.5, 95.0])
    basis, n_clipped = sm.bspline_basis(x, knots, return_clipped=True)
    assert n_clipped == 4
    inside = sm.bspline_basis(np.array([30.0, 30.0, 30.0, 50.0, 70.0, 70.0, 70.0]), knots)
    assert np.array_equal(basis, inside)
    assert np.array_equal(sm.bspline_basis(x, knots), basis)
    # B-splines with the first dropped: row sums are 1 - B_0(x); B_0(lower) = 1, B_0 = 0 from the first interior knot
    assert basis[0].sum() == pytest.approx(0.0, abs=1e-15) and basis[-1].sum() == pytest.approx(1.0, abs=1e-15)


def test_knot_and_value_guards():
    with pytest.raises(sm.SmoothError, match="strictly between"):
        sm.full_knots([10, 50], 20, 80)
    with pytest.raises(sm.SmoothError, match="repeated degree"):
        sm.bspline_basis([1.0], [0, 0, 0, 1, 2, 2, 2, 2, 2])
    with pytest.raises(sm.SmoothError, match=r"'age' has 1 missing"):
        sm.bspline_basis([30.0, np.nan], sm.full_knots([50], 20, 80), name="age")
    with pytest.raises(sm.SmoothError, match="shape"):
        sm.pooled_penalized_fit(np.ones((4, 2)), np.ones(4), np.eye(3), 1.0, np.eye(2)[[0, 0, 1, 1]])


# ------------------------------------------------------------------------------------------------
# penalized fit against statsmodels GLMGam
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.5, 30.0, 2e4])
def test_pooled_fit_equals_glmgam(alpha):
    age, sex, batch, onehot, y = make_data(seed=2, features=1)
    knots = quantile_knots(age)
    design, pen = design_and_penalty(age, sex, knots)
    fit = sm.pooled_penalized_fit(design, y[:, 0], pen, alpha, onehot)
    res = GLMGam(y[:, 0], exog=np.column_stack([onehot, sex]), smoother=sm_bsplines(age, knots), alpha=alpha).fit()
    ours = np.concatenate([fit.batch_coef[:, 0], fit.beta[:, 0]])
    assert rel(ours, res.params) < TOL
    assert np.abs(fit.fitted[:, 0] - res.fittedvalues).max() < TOL * np.abs(res.fittedvalues).max()
    n, edf = len(age), fit.edf[0]
    assert edf == pytest.approx(res.edf.sum(), rel=TOL)
    assert fit.rss[0] == pytest.approx(((y[:, 0] - res.fittedvalues) ** 2).sum(), rel=TOL)
    # statsmodels' gcv = scale / (1 - edf/n)^2 = n^2 RSS / (n - edf)^3; ours is n RSS / (n - edf)^2
    assert fit.gcv[0] == pytest.approx(res.gcv * (n - edf) / n, rel=TOL)


def test_two_smooth_terms_with_their_own_alphas_equal_glmgam():
    age, sex, batch, onehot, y = make_data(seed=4, features=1)
    rng = np.random.default_rng(4)
    bmi = np.round(rng.uniform(18, 40, len(age)), 1)
    k_age, k_bmi = quantile_knots(age, df=8), quantile_knots(bmi, df=6)
    b_age, b_bmi = sm.bspline_basis(age, k_age), sm.bspline_basis(bmi, k_bmi)
    design = np.column_stack([sex, b_age, b_bmi])
    p = design.shape[1]
    pens = [sm.embed_penalty(sm.penalty_matrix(k_age), 1, p),
            sm.embed_penalty(sm.penalty_matrix(k_bmi), 1 + b_age.shape[1], p)]
    yy = y[:, 0] + 0.05 * (bmi - 28) ** 2
    fit = sm.pooled_penalized_fit(design, yy, pens, [[3.0, 250.0]], onehot)
    smoother = BSplines(np.column_stack([age, bmi]), df=[8, 6], degree=[3, 3],
                        knot_kwds=[{"all_knots": k_age}, {"all_knots": k_bmi}])
    res = GLMGam(yy, exog=np.column_stack([onehot, sex]), smoother=smoother, alpha=[3.0, 250.0]).fit()
    assert rel(np.concatenate([fit.batch_coef[:, 0], fit.beta[:, 0]]), res.params) < TOL
    assert fit.alpha.shape == (1, 2) and list(fit.alpha[0]) == [3.0, 250.0]


# ------------------------------------------------------------------------------------------------
# federated == pooled
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranges", [None, [(20, 80), (20, 45), (40, 80), (55, 80)]],
                         ids=["same-ages", "different-age-ranges"])
def test_federated_equals_pooled(ranges):
    """Sites' square-root forms (a site with ages 20-45 has spline columns that are zero after centring,
    which its QR drops) give the pooled penalized fit: beta, chosen alpha, edf, RSS and the whole GCV
    curve; the GCV from sufficient statistics equals the one from the explicit n x n hat matrix."""
    age, sex, batch, onehot, y = make_data(seed=5, n=200, features=3, ranges=ranges)
    y[:, 2] = y[:, 2] * 1e4 + 1e5                          # a large-valued feature (volume-like)
    knots = sm.full_knots([30, 38, 46, 54, 62, 70], 20, 80)
    design, pen = design_and_penalty(age, sex, knots)
    a, z, rho2 = site_messages(design, y, batch)
    names = ["sex"] + sm.basis_names("age", knots)
    fed = sm.penalized_within_fit(a, z, rho2, len(age), onehot.shape[1], pen, sm.DEFAULT_ALPHAS, names=names)
    pool = sm.pooled_penalized_fit(design, y, pen, sm.DEFAULT_ALPHAS, onehot)
    assert np.array_equal(fed.alpha, pool.alpha)
    assert 1.0 < fed.alpha.min() and fed.alpha.max() < 1e7       # interior of the grid
    scale = np.abs(pool.beta).max(axis=0)
    assert np.max(np.abs(fed.beta - pool.beta) / scale) < TOL
    assert rel(fed.edf_path, pool.edf_path) < TOL
    assert rel(fed.gcv_path, pool.gcv_path) < TOL
    assert rel(fed.rss, pool.rss) < TOL and rel(fed.gcv, pool.gcv) < TOL
    # GCV from the explicit hat matrix, recomputed here at the chosen alpha of feature 0
    full = np.hstack([onehot, design])
    s = np.zeros((full.shape[1],) * 2)
    s[onehot.shape[1]:, onehot.shape[1]:] = pen
    hat = full @ np.linalg.solve(full.T @ full + 2 * fed.alpha[0] * s, full.T)
    resid = y[:, 0] - hat @ y[:, 0]
    n = len(age)
    assert fed.gcv[0] == pytest.approx(n * (resid @ resid) / (n - np.trace(hat)) ** 2, rel=TOL)


def test_singular_design_is_named_and_the_penalty_fixes_it():
    """A spline column with no patient in its support is zero: unidentified at alpha = 0 (named in the
    error), determined by the penalty at alpha > 0."""
    age, sex, batch, onehot, y = make_data(seed=6, ranges=[(20, 60)] * 4)
    knots = sm.full_knots([30, 40, 50, 65, 72], 20, 80)
    design, pen = design_and_penalty(age, sex, knots)
    a, z, rho2 = site_messages(design, y, batch)
    names = ["sex"] + sm.basis_names("age", knots)
    with pytest.raises(sm.SingularPenalizedDesignError, match=r"alpha 0.*'age_s7'"):
        sm.penalized_within_fit(a, z, rho2, len(age), 4, pen, [0.0, 10.0], names=names)
    fed = sm.penalized_within_fit(a, z, rho2, len(age), 4, pen, [10.0], names=names)
    pool = sm.pooled_penalized_fit(design, y, pen, [10.0], onehot)
    assert np.max(np.abs(fed.beta - pool.beta) / np.abs(pool.beta).max(axis=0)) < TOL


# ------------------------------------------------------------------------------------------------
# GCV chooses a sensible alpha
# ------------------------------------------------------------------------------------------------

def test_gcv_recovers_the_sine_better_than_unpenalized_and_linear():
    """20 interior knots on 160 rows: the unpenalized fit (alpha 0, 28 edf) chases noise, the maximal
    alpha is nearly linear; GCV's choice recovers the sine on a held-out grid and predicts held-out rows best."""
    age, sex, batch, onehot, y = make_data(seed=0, features=1)
    knots = sm.full_knots(np.linspace(20, 80, 22)[1:-1], 20, 80)
    design, pen = design_and_penalty(age, sex, knots)
    grid_age = np.linspace(20, 80, 301)
    b_grid = sm.bspline_basis(grid_age, knots)
    t_age, t_sex, t_batch, t_onehot, t_y = make_data(seed=100, features=1)
    t_design = np.column_stack([t_sex, sm.bspline_basis(t_age, knots)])
    curve_err, heldout = {}, {}
    for label, alphas in [("gcv", sm.DEFAULT_ALPHAS), ("none", [0.0]), ("linear", [1e9])]:
        fit = sm.pooled_penalized_fit(design, y, pen, alphas, onehot)
        f_hat, f_true = b_grid @ fit.beta[1:, 0], truth(grid_age)
        curve_err[label] = np.sqrt(np.mean(((f_hat - f_hat.mean()) - (f_true - f_true.mean())) ** 2))
        pred = t_onehot @ fit.batch_coef[:, 0] + t_design @ fit.beta[:, 0]
        heldout[label] = np.mean((t_y[:, 0] - pred) ** 2)
        if label == "gcv":
            chosen, edf = float(fit.alpha[0]), float(fit.edf[0])
    # seen: alpha 188.4, edf 11.0; curve RMSE 0.075 (gcv), 0.183 (none, 28 edf), 0.674 (linear, 6 edf);
    # held-out MSE 0.261 (gcv), 0.300 (none), 0.780 (linear); noise variance 0.25
    assert 10 < chosen < 1e4 and 8 < edf < 15
    assert curve_err["gcv"] < 0.1
    assert curve_err["gcv"] < 0.5 * curve_err["none"] and curve_err["gcv"] < 0.2 * curve_err["linear"]
    assert heldout["gcv"] < 0.9 * heldout["none"] and heldout["gcv"] < 0.4 * heldout["linear"]


# ------------------------------------------------------------------------------------------------
# knots from k-anonymous histograms
# ------------------------------------------------------------------------------------------------

PLAN_EDGES = np.arange(15.0, 91.0, 2.5)


@pytest.mark.parametrize("release_empty", [False, True])
def test_histogram_never_releases_a_bin_under_k(release_empty):
    rng = np.random.default_rng(7)
    n_zero = 0
    for trial in range(300):
        k = int(rng.integers(1, 12))
        n = int(rng.integers(k, 120))
        lo = rng.uniform(10, 70)
        v = np.round(rng.uniform(lo, lo + rng.uniform(1, 40), n), 1)
        h = sm.site_histogram(v, PLAN_EDGES, k, release_empty=release_empty)
        small = (h.counts < k) & ~((h.counts == 0) & release_empty)
        assert not small.any(), (k, h.counts)
        n_zero += int((h.counts == 0).sum())
        assert h.counts.sum() == n
        assert h.edges[0] == PLAN_EDGES[0] and h.edges[-1] == PLAN_EDGES[-1]
        assert np.isin(h.edges, PLAN_EDGES).all() and np.all(np.diff(h.edges) > 0)
        assert set(h.message()) == {"edges", "counts"}
        # the released counts are the exact counts of the released (merged) bins
        exact, _ = np.histogram(np.clip(v, PLAN_EDGES[0], PLAN_EDGES[-1]), bins=h.edges)
        assert np.array_equal(exact, h.counts)
    assert (n_zero > 100) if release_empty else (n_zero == 0)
    with pytest.raises(sm.SmallCellError, match="fewer than the minimum cell size 5"):
        sm.site_histogram([40.0, 41.0, 42.0, 43.0], PLAN_EDGES, 5, name="age")


def test_histogram_clipping_counts():
    v = np.array([3.0, 14.9, 15.0, 40.0, 41.0, 42.0, 90.0, 90.1, 120.0, 55.5])
    h = sm.site_histogram(v, PLAN_EDGES, 1)
    assert (h.n_below, h.n_above) == (2, 2)
    assert h.counts[0] == 3 and h.counts[-1] == 3 and h.counts.sum() == 10


@pytest.mark.parametrize("release_empty", [False, True])
def test_pooled_cdf_is_exact_at_common_edges_and_knots_near_quantiles(release_empty):
    rng = np.random.default_rng(8)
    sites = [rng.normal(62, 9, 140), rng.uniform(35, 75, 60), 45 + rng.gamma(2.0, 6.0, 90), rng.normal(50, 12, 35)]
    sites = [np.round(s, 1) for s in sites]
    pooled = np.clip(np.concatenate(sites), PLAN_EDGES[0], PLAN_EDGES[-1])
    q = np.quantile(pooled, np.arange(1, 7) / 7)
    worst = {}
    for k in (1, 5, 10):
        hists = [sm.site_histogram(s, PLAN_EDGES, k, release_empty=release_empty) for s in sites]
        common = hists[0].edges
        for h in hists[1:]:
            common = np.intersect1d(common, h.edges)
        assert common.size >= (10 if k == 1 else 2)
        exact = np.array([(pooled < e).mean() for e in common[:-1]] + [1.0])
        assert np.abs(sm.pooled_cdf(hists, common) - exact).max() < 1e-12
        for h, v in zip(hists, sites):   # each site's CDF is exact at its own released edges
            own = np.array([(np.clip(v, 15, 90) < e).mean() for e in h.edges[:-1]] + [1.0])
            assert np.abs(sm.pooled_cdf([h], h.edges) - own).max() < 1e-12
        knots = sm.pooled_quantile_knots([h.message() for h in hists], 6)
        interior = knots[4:-4]
        assert knots[0] == PLAN_EDGES[0] and knots[-1] == PLAN_EDGES[-1] and interior.size == 6
        assert np.all(np.diff(interior) > 0)
        for t, qj in zip(interior, q):   # within the widest released bin (any site) holding the knot or quantile
            width = max(np.diff(h.edges)[np.clip(np.searchsorted(h.edges, x, side="right") - 1, 0, h.counts.size - 1)]
                        for h in hists for x in (t, qj))
            assert abs(t - qj) <= width, (k, t, qj, width)
        # they are the pooled CDF's quantiles
        assert np.abs(sm.pooled_cdf(hists, interior) - np.arange(1, 7) / 7).max() < 1e-12
        worst[k] = np.abs(interior - q).max()
    # seen (years, plan bins of 2.5): k=1 0.47, k=5 0.52 in both modes; k=10 9.1 (a 35-patient site's lower
    # tail merged down to the plan edge 15) or 1.5 with release_empty
    assert worst[1] < 0.6 and worst[5] < 0.6
    assert worst[10] < (2.0 if release_empty else 10.0)


def test_pooled_knots_refuse_mismatched_plans():
    a = sm.site_histogram(np.linspace(30, 60, 20), PLAN_EDGES, 5)
    b = sm.site_histogram(np.linspace(30, 60, 20), PLAN_EDGES[1:], 5)
    with pytest.raises(sm.SmoothError, match="plan's bin edges"):
        sm.pooled_quantile_knots([a, b], 6)


# ------------------------------------------------------------------------------------------------
# neuroHarmonize ComBat-GAM at the alpha it selected
# ------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_neuroharmonize_covariate_fit_at_its_selected_alpha(monkeypatch):
    """neuroHarmonize 2.5.2 ``harmonizationLearn(..., smooth_terms=["age"])`` fits every feature with
    GLMGam on statsmodels' default knots (df 10, cubic) at an alpha chosen by random 5-fold CV.  With
    those knots and the alpha it selected (recorded by wrapping ``select_penweight_kfold``), our pooled
    and federated fits give its ``B_hat`` (batch, linear and spline coefficients) and ``mod_mean``
    (covariate effect) to 1e-8 relative: the only difference left is how alpha is chosen."""
    nh = pytest.importorskip("neuroHarmonize")
    pd = pytest.importorskip("pandas")
    gam_module = pytest.importorskip("statsmodels.gam.generalized_additive_model")
    age, sex, batch, onehot, y = make_data(seed=9, n=180, n_batches=3, features=3)
    covars = pd.DataFrame({"SITE": [f"site{b}" for b in batch], "age": age, "sex": sex})
    selected = []
    original = gam_module.GLMGam.select_penweight_kfold

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        selected.append(float(np.asarray(out[0]).ravel()[0]))
        return out

    monkeypatch.setattr(gam_module.GLMGam, "select_penweight_kfold", spy)
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = nh.harmonizationLearn(y, covars, smooth_terms=["age"], seed=0)
    assert len(selected) == 3
    knots = quantile_knots(age, df=10, degree=3)
    assert np.array_equal(model["smooth_model"]["bsplines_constructor"].smoothers[0].knots, knots)
    design, pen = design_and_penalty(age, sex, knots)
    a, z, rho2 = site_messages(design, y, batch)
    b_hat = model["B_hat"]                                   # rows: site0..2, sex, age_s0..age_s8
    for j, alpha in enumerate(selected):
        pool = sm.pooled_penalized_fit(design, y[:, j], pen, alpha, onehot)
        fed = sm.penalized_within_fit(a, z[:, [j]], rho2[[j]], len(age), 3, pen, alpha)
        ours = np.concatenate([pool.batch_coef[:, 0], pool.beta[:, 0]])
        assert rel(ours, b_hat[:, j]) < TOL
        assert np.max(np.abs(fed.beta[:, 0] - b_hat[3:, j])) < TOL * np.abs(b_hat[3:, j]).max()
        assert np.abs(design @ fed.beta[:, 0] - model["mod_mean"][j]).max() < TOL * np.abs(model["mod_mean"][j]).max()
