r"""Privacy options for federated fits, as pure math (numpy/scipy, Flower-free).

Two independent options, see ``docs/PRIVACY.md`` for what each protects against and what it costs.

1. Secure aggregation of the exact logistic fit (Flower's SecAgg+)
------------------------------------------------------------------
SecAgg+ adds integer vectors modulo :math:`2^{32}` under pairwise masks: the coordinator learns the sum over
sites, never one site's vector.  Flower's mod (``secaggplus_mod``) turns floats into integers by clipping to
``±clipping_range`` and rounding *stochastically* onto ``quantization_range`` levels, and returns a weighted
*mean*; used as is, a 13-feature Newton step would lose ~7 significant digits.  fedrad therefore hands the mod
numbers that are already exact integers (*digits*), so its quantisation is the identity and the sum is exact:

* Each value :math:`v` of a block (``n``, ``loss``, ``grad``, ...) has a range :math:`|v|\le 2^E` agreed in
  advance (sent by the coordinator in the request; a site whose value lies outside refuses, naming the value,
  instead of letting it be clipped).  :math:`u = v/2^E \in [-1, 1]` is written with ``digits`` base-:math:`2^h`
  digits: a signed leading digit :math:`d_0 = \lfloor u\,2^{h-1}\rfloor` (shifted by :math:`2^{h-1}` to be
  non-negative) and :math:`d_i = \lfloor r_{i-1} 2^h\rfloor` for the remainders, the last one rounded to
  nearest.  Every step is exact in float64 (power-of-two scaling, Sterbenz subtraction), so
  :math:`v = 2^E\,[ (d_0 - 2^{h-1}) 2^{-(h-1)} + \sum_i d_i 2^{-(h-1) - h i} ]` up to half a unit of the last
  digit: a resolution of :math:`2^{E-(h-1)-h(\text{digits}-1)}`.
* Digit :math:`d\in[0, 2^h]` travels as the float :math:`x = d\,2^{-(h-1)} - 1 \in [-1, 1]`, which Flower's
  quantiser (``clipping_range=1``, ``quantization_range=2^h``, weight 1, ``max_weight=1``) maps back onto
  exactly :math:`d` (its stochastic rounding of an integer is the integer).  With :math:`k` sites and
  Flower's ``num_shares`` :math:`s > k` (:func:`secagg_shares`), :math:`h = 32 - \lceil\log_2 s\rceil` (at most 30:
  Flower quantises into int32) keeps every digit sum and Flower's weight element below the modulus.
* The coordinator receives Flower's mean :math:`\bar x = (\sum_k q_k\,2^{-(h-1)} - k)/k`, recovers the integer
  digit sums :math:`S = (k\bar x + k)\,2^{h-1}` (float error < 2^-18, checked), and assembles each block sum
  with Python integers: exact up to one rounding to float64.

What the coordinator learns beyond the sum: the digit-wise sums, i.e. at most :math:`\log_2 k` bits of carry
per digit about the sites' lowest-order bits.  Ranges: counts use :math:`2^{40}` with resolution 1/4; the two
standardisation rounds, whose magnitudes nobody knows in advance, use :math:`2^{128}` with resolution
:math:`2^{-128}` (9 digits: float64 precision for any sum between 1e-22 and 3e38); Newton rounds use ranges
that follow from quantities the coordinator already has (:func:`newton_layout`: with globally standardised
features :math:`\sum_{\text{all rows}} z_j^2 = N`, so by Cauchy-Schwarz :math:`|\text{grad}_j| \le N`,
:math:`|H_{jl}| \le N/4`, :math:`\sum\ell \le N(\log 2 + |b| + \lVert w\rVert_1)`; a factor 2 covers rounding).

The secure fit (:class:`SecureLogisticServer`, :func:`site_secure_logistic`) is the exact fit of
:mod:`fedrad.common.glm` with sums instead of per-site replies: round 1 ``counts`` (``n``, ``n_pos``,
:math:`\sum x`) gives the global mean μ; round 2 ``centred`` (:math:`\sum(x-\mu)`, the upper triangle of
:math:`\sum(x-\mu)(x-\mu)^\top`, :math:`\sum y(x-\mu)`) is exactly the round-1 reply of a single site centred at
μ, which :func:`~fedrad.common.glm.combine_logistic_stats` turns into the scale and the first Newton step; then
the same Newton rounds (``n``, ``loss``, ``grad``, upper ``hess``).  One round more than the plain fit.

2. Differential privacy of FedAvg (central DP, fixed clipping)
-------------------------------------------------------------
Each round every site's model update :math:`\Delta_k` is clipped to L2 norm ``clipping_norm`` :math:`c`
(:func:`clip_update`, Flower's "FlatClip" arithmetic), the coordinator averages the :math:`k` clipped updates
with equal weights and adds Gaussian noise of SD :math:`z c / k` (:func:`noise_std`; :math:`z` = noise
multiplier).  Adding or removing one *site* changes the sum by at most :math:`c`, so each round is a Gaussian
mechanism with :math:`\mu = 1/z` in Gaussian-DP terms (Dong, Roth & Su 2022); :math:`T` rounds compose to
:math:`\mu = \sqrt{T}/z` exactly, and :math:`(\varepsilon, \delta)` follow from the exact conversion
:math:`\delta(\varepsilon) = \Phi(-\varepsilon/\mu + \mu/2) - e^{\varepsilon}\Phi(-\varepsilon/\mu - \mu/2)`
(Balle & Wang 2018) (:func:`gaussian_epsilon`).  No sampling amplification: every site takes part in every
round.  :func:`rdp_epsilon` gives the (looser) Rényi-DP figure that RDP accountants report, for comparison.
The guarantee is *site-level* (a whole hospital's data), which is why it is expensive with few sites.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special

from fedrad.common.glm import (
    GLMError,
    LogisticModel,
    LogisticServer,
    _site_rows,
    site_logistic_newton,
)

__all__ = [
    "SecureAggregationError",
    "MOD_BITS",
    "MIN_SITES",
    "secagg_shares",
    "digit_bits",
    "layout_size",
    "encode_digits",
    "digits_to_wire",
    "wire_to_digits",
    "digit_sums_from_mean",
    "decode_sums",
    "counts_layout",
    "centred_layout",
    "newton_layout",
    "site_secure_logistic",
    "SecureLogisticServer",
    "fit_secure_federated",
    "clip_update",
    "noise_std",
    "gaussian_delta",
    "gaussian_epsilon",
    "noise_multiplier_for",
    "rdp_epsilon",
]

#: Flower's SecAgg+ adds masked vectors modulo 2**32 (``modulus_range``; larger is not supported).
MOD_BITS = 32
#: SecAgg+ needs at least 3 sites (Flower: ``num_shares`` > 2 and > the reconstruction threshold >= 2).
MIN_SITES = 3
#: Flower's quantiser rounds into int32: digits up to 2**30.
_MAX_DIGIT_BITS = 30
#: Range and digits of the standardisation rounds (magnitudes unknown in advance).
WIDE_EXP, WIDE_DIGITS = 128, 9
#: Counts: |n| <= 2**40, resolution 1/4.
COUNT_EXP, COUNT_DIGITS = 40, 2
#: Newton rounds: 3 digits (>= 89 bits below the range).
NEWTON_DIGITS = 3
SECURE_KIND = "fedrad.privacy.secure_logistic"


class SecureAggregationError(GLMError):
    """A value cannot be aggregated securely (outside the agreed range, non-finite) or the sum is inconsistent."""


# ----------------------------------------------------------------------------------------------
# Exact integer encoding for SecAgg+
# ----------------------------------------------------------------------------------------------
def secagg_shares(n_sites: int) -> int:
    """Flower ``num_shares`` for ``n_sites``: odd and above the reconstruction threshold ``n_sites`` (Flower
    requires threshold < shares), so every site's mask can only be removed with *all* sites' shares: the
    coordinator unmasks the sum over all sites or nothing (no partial sums after a refusal or dropout)."""
    k = int(n_sites)
    if k < MIN_SITES:
        raise SecureAggregationError(f"secure aggregation (SecAgg+) needs at least {MIN_SITES} sites, got {k}")
    return k + 1 if (k + 1) % 2 else k + 2


def digit_bits(n_sites: int) -> int:
    """Bits per digit ``h`` for ``n_sites``: the largest h with ``shares * 2**h <= 2**32`` (at most 30), so the sum
    of the sites' digits and Flower's weight element (``n_sites * 2**h``) stay below the 2**32 modulus."""
    shares = secagg_shares(n_sites)
    h = min(MOD_BITS - int(math.ceil(math.log2(shares))), _MAX_DIGIT_BITS)
    if h < 8:
        raise SecureAggregationError(f"{n_sites} sites: too many for exact sums in Flower's 32-bit SecAgg+")
    assert int(n_sites) * 2 ** h < 2 ** MOD_BITS and shares * 2 ** h <= 2 ** MOD_BITS
    return h


def _block(name: str, shape: Sequence[int], exp: int, digits: int) -> dict:
    return {"name": str(name), "shape": [int(s) for s in shape], "exp": int(exp), "digits": int(digits)}


def _size(block: Mapping) -> int:
    return int(np.prod(block["shape"], dtype=np.int64)) if block["shape"] else 1


def layout_size(layout: Sequence[Mapping]) -> int:
    """Length of the digit vector of a layout."""
    return sum(_size(b) * int(b["digits"]) for b in layout)


def encode_digits(values: Mapping[str, Any], layout: Sequence[Mapping], bits: int, *, site: Any = None) -> np.ndarray:
    """A site's sums as one vector of integer digits in ``[0, 2**bits]`` (int64), block after block.

    Raises :class:`SecureAggregationError` (naming the block, element and range) for a value outside
    ``±2**exp`` or not finite: such a value would be clipped, and the sum silently wrong.
    """
    h = int(bits)
    out = []
    for b in layout:
        name, exp, nd = b["name"], int(b["exp"]), int(b["digits"])
        v = np.asarray(values[name], dtype=np.float64).reshape(-1)
        if v.size != _size(b):
            raise SecureAggregationError(f"block {name!r} has {v.size} values, the layout expects {_size(b)}")
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SecureAggregationError(f"secure aggregation: {name}[{i}] is {v[i]}; refusing to send")
        u = np.ldexp(v, -exp)
        over = np.abs(u) > 1.0
        if over.any():
            i = int(np.flatnonzero(over)[0])
            where = f" at site {site!r}" if site is not None else ""
            raise SecureAggregationError(
                f"secure aggregation: {name}[{i}] = {v[i]:.6g}{where} is outside the agreed range ±2^{exp} "
                f"(= {2.0 ** exp:.3g}); it would be clipped, so nothing was sent")
        # digits of |u| (floor of a non-negative float minus itself is exact), the last one rounded
        digits = np.empty((v.size, nd), dtype=np.int64)
        t = np.ldexp(np.abs(u), h - 1)
        for i in range(nd):
            d = np.rint(t) if i == nd - 1 else np.floor(t)
            digits[:, i] = d.astype(np.int64)
            t = np.ldexp(t - d, h)
        neg = u < 0
        digits[neg] = -digits[neg]                 # -|u|: negate every digit, then borrow
        for i in range(nd - 1, 0, -1):             # normalise digits 1.. into [0, 2**h)
            carry = np.floor_divide(digits[:, i], 2 ** h)
            digits[:, i] -= carry * 2 ** h
            digits[:, i - 1] += carry
        digits[:, 0] += 2 ** (h - 1)               # signed leading digit in [-2**(h-1), 2**(h-1)] -> [0, 2**h]
        out.append(digits.reshape(-1))
    vec = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    assert vec.size == 0 or (vec.min() >= 0 and vec.max() <= 2 ** h)
    return vec


def digits_to_wire(digits: np.ndarray, bits: int) -> np.ndarray:
    """Digits as the floats handed to ``secaggplus_mod`` (``clipping_range=1``): ``d * 2**-(h-1) - 1``."""
    return np.ldexp(np.asarray(digits, dtype=np.float64), -(int(bits) - 1)) - 1.0


def wire_to_digits(x: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`digits_to_wire` (what Flower's quantiser computes from the floats)."""
    return np.rint(np.ldexp(np.asarray(x, dtype=np.float64) + 1.0, int(bits) - 1)).astype(np.int64)


def digit_sums_from_mean(mean: np.ndarray, n_sites: int, bits: int) -> np.ndarray:
    """Integer digit sums from the vector Flower's ``SecAggPlusWorkflow`` returns (its weight-1 mean).

    Flower dequantises to :math:`(\\sum q\\,2^{-(h-1)} - k)/k`; this inverts it and checks the result is an
    integer combination (masks that did not cancel, or a wrapped sum, would not be).
    """
    k, h = int(n_sites), int(bits)
    s = (np.asarray(mean, dtype=np.float64) * k + k) * 2.0 ** (h - 1)
    r = np.rint(s)
    err = float(np.max(np.abs(s - r))) if s.size else 0.0
    if err > 0.25 or (r.size and (r.min() < 0 or r.max() > k * 2 ** h)):
        raise SecureAggregationError(f"the secure sum is not a sum of {k} sites' digits (off by {err:.3g}, range "
                                     f"{r.min() if r.size else 0:.0f}..{r.max() if r.size else 0:.0f}); "
                                     "masks did not cancel or a site dropped out")
    return r.astype(np.int64)


def decode_sums(digit_sums: np.ndarray, layout: Sequence[Mapping], bits: int, n_sites: int) -> dict[str, np.ndarray]:
    """Block sums over ``n_sites`` sites from the integer digit sums (exact integers, one rounding to float)."""
    h, k = int(bits), int(n_sites)
    s = np.asarray(digit_sums, dtype=np.int64)
    if s.size != layout_size(layout):
        raise SecureAggregationError(f"secure sum has {s.size} digits, the layout expects {layout_size(layout)}")
    out, pos = {}, 0
    for b in layout:
        m, nd, exp = _size(b), int(b["digits"]), int(b["exp"])
        block = s[pos:pos + m * nd].reshape(m, nd)
        pos += m * nd
        shift = exp - (h - 1) - h * (nd - 1)
        vals = np.empty(m)
        for j in range(m):
            t = int(block[j, 0]) - k * 2 ** (h - 1)
            for i in range(1, nd):
                t = (t << h) + int(block[j, i])
            vals[j] = _ldexp_int(t, shift)
        out[b["name"]] = vals.reshape(b["shape"]) if b["shape"] else vals[0]
    return out


def _ldexp_int(t: int, shift: int) -> float:
    """``t * 2**shift`` correctly rounded to float64 (``t`` a Python int; int true division rounds correctly)."""
    return float(t << shift) if shift >= 0 else t / (1 << -shift)


# ----------------------------------------------------------------------------------------------
# Layouts of the secure logistic protocol
# ----------------------------------------------------------------------------------------------
def _triu(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(m)


def _sym_from_triu(v: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((m, m))
    iu = _triu(m)
    out[iu] = v
    out[(iu[1], iu[0])] = v
    return out


def counts_layout(p: int) -> list[dict]:
    """Round 1: ``n``, ``n_pos``, ``sum_x`` (p)."""
    return [_block("n", [], COUNT_EXP, COUNT_DIGITS), _block("n_pos", [], COUNT_EXP, COUNT_DIGITS),
            _block("sum_x", [p], WIDE_EXP, WIDE_DIGITS)]


def centred_layout(p: int) -> list[dict]:
    """Round 2 (about the global mean μ): ``n``, ``resid_sum`` Σ(x-μ), ``cross`` (upper triangle), ``cross_y``."""
    return [_block("n", [], COUNT_EXP, COUNT_DIGITS), _block("resid_sum", [p], WIDE_EXP, WIDE_DIGITS),
            _block("cross", [p * (p + 1) // 2], WIDE_EXP, WIDE_DIGITS),
            _block("cross_y", [p], WIDE_EXP, WIDE_DIGITS)]


def _exp_above(x: float) -> int:
    """Smallest integer e with ``2**e >= x`` (x > 0)."""
    return int(math.ceil(math.log2(max(float(x), 1e-300))))


def newton_layout(m: int, n_total: int, beta: np.ndarray) -> list[dict]:
    """Newton round with ``m`` = 1 + kept features, ``N`` rows in all and coefficients β = (b, w).

    Ranges from what the coordinator already knows (module docstring), with a factor 2 for rounding in the
    global standardisation: Σℓ ≤ N(log 2 + |b| + √2‖w‖₁), |grad| ≤ √2 N, |H| ≤ N/2.
    """
    n = float(n_total)
    beta = np.asarray(beta, dtype=np.float64)
    loss_bound = n * (math.log(2.0) + abs(beta[0]) + math.sqrt(2.0) * float(np.abs(beta[1:]).sum()))
    return [_block("n", [], COUNT_EXP, COUNT_DIGITS),
            _block("loss", [], _exp_above(2 * loss_bound), NEWTON_DIGITS),
            _block("grad", [m], _exp_above(2 * math.sqrt(2.0) * n), NEWTON_DIGITS),
            _block("hess", [m * (m + 1) // 2], _exp_above(n), NEWTON_DIGITS)]


# ----------------------------------------------------------------------------------------------
# Site and coordinator of the secure logistic fit
# ----------------------------------------------------------------------------------------------
def site_secure_logistic(rows: Any, request: Mapping, *, site: Any = None) -> dict:
    """A site's sums for one secure round (before encoding), keyed by the request's layout blocks.

    ``rows`` = (X, y) as for :func:`fedrad.common.glm.site_logistic`.  Stages: ``counts`` (``n``, ``n_pos``,
    ``sum_x``), ``centred`` (about the request's ``mean``), ``newton`` (the glm Newton request in ``inner``).
    """
    if request.get("kind") != SECURE_KIND:
        raise GLMError(f"not a secure logistic request (kind={request.get('kind')!r})")
    stage = request["stage"]
    if stage == "newton":
        r = site_logistic_newton(rows, request["inner"], site=site)
        m = len(r["grad"])
        return {"n": float(r["n"]), "loss": float(r["loss"]), "grad": np.asarray(r["grad"]),
                "hess": np.asarray(r["hess"])[_triu(m)]}
    x, y = _site_rows(rows, list(request["features"]), site)
    if stage == "counts":
        return {"n": float(x.shape[0]), "n_pos": float(y.sum()), "sum_x": x.sum(axis=0)}
    if stage == "centred":
        mean = np.asarray(request["mean"], dtype=np.float64)
        xc = x - mean
        cross = xc.T @ xc
        cross = 0.5 * (cross + cross.T)
        return {"n": float(x.shape[0]), "resid_sum": xc.sum(axis=0), "cross": cross[_triu(x.shape[1])],
                "cross_y": xc.T @ y}
    raise GLMError(f"unknown secure logistic stage {stage!r}")


class SecureLogisticServer:
    """Coordinator of the exact logistic fit from secure sums (no I/O, no Flower).

    ``start() -> request``; ``receive(sums) -> next request | None`` where ``sums`` are the decoded block sums
    over all sites (:func:`decode_sums`); ``model()``.  Each request carries its ``layout`` and digit ``bits``:
    the ranges every site checks its values against.  Wraps :class:`~fedrad.common.glm.LogisticServer`.
    """

    def __init__(self, features: Sequence[str], n_sites: int, *, penalty: str | None = "l2", C: float = 1.0,
                 l1_ratio: float | None = None, tol: float = 1e-8, max_rounds: int = 30):
        self.features = [str(f) for f in features]
        self.n_sites = int(n_sites)
        self.bits = digit_bits(self.n_sites)
        self.inner = LogisticServer(self.features, penalty=penalty, C=C, l1_ratio=l1_ratio, tol=tol,
                                    max_rounds=max_rounds)
        self.round_trips = 0
        self._request: dict | None = None
        self._counts: dict | None = None

    def _wrap(self, stage: str, layout: list[dict], **extra) -> dict:
        self._request = {"kind": SECURE_KIND, "version": 1, "stage": stage, "bits": self.bits,
                         "n_sites": self.n_sites, "layout": layout, **extra}
        return self._request

    def start(self) -> dict:
        self.inner.start()  # validates the feature list
        return self._wrap("counts", counts_layout(len(self.features)), features=self.features)

    def receive(self, sums: Mapping[str, Any]) -> dict | None:
        if self._request is None:
            raise GLMError("receive() called without an outstanding request")
        self.round_trips += 1
        stage = self._request["stage"]
        p = len(self.features)
        if stage == "counts":
            n, n_pos = float(sums["n"]), float(sums["n_pos"])
            self._counts = {"n": int(round(n)), "n_pos": int(round(n_pos))}
            if self._counts["n"] <= 0:
                raise GLMError("the sites have no rows")
            mean = np.asarray(sums["sum_x"], dtype=np.float64) / self._counts["n"]
            return self._wrap("centred", centred_layout(p), features=self.features, mean=mean)
        n = int(round(float(sums["n"])))
        if n != self._counts["n"]:
            raise GLMError(f"the sites summed {n} rows in this round but {self._counts['n']} in round 1; "
                           "site data changed during the fit")
        if stage == "centred":
            aggregate = {"site": "all sites (secure sum)", "n": n, "n_pos": self._counts["n_pos"],
                         "mean": np.asarray(self._request["mean"]), "resid_sum": np.asarray(sums["resid_sum"]),
                         "cross": _sym_from_triu(np.asarray(sums["cross"]), p), "cross_y": np.asarray(sums["cross_y"])}
            nxt = self.inner.receive([aggregate])
        else:
            m = len(self._request["inner"]["beta"])
            nxt = self.inner.receive([{"n": n, "loss": float(sums["loss"]), "grad": np.asarray(sums["grad"]),
                                       "hess": _sym_from_triu(np.asarray(sums["hess"]), m)}])
        if nxt is None:
            self._request = None
            return None
        return self._wrap("newton", newton_layout(len(nxt["beta"]), n, nxt["beta"]),
                          features=list(nxt["features"]), inner=nxt, n_total=n)

    @property
    def done(self) -> bool:
        return self.inner.done

    def model(self) -> LogisticModel:
        """The fitted model; per-site counts are unknown to the coordinator (empty)."""
        m = self.inner.model(fit="federated-secagg")
        m.n_per_site_, m.n_pos_per_site_ = {}, {}
        m.n_rounds_ = self.round_trips
        return m


def fit_secure_federated(site_data: Mapping[str, tuple], *, feature_names: Sequence[str] | None = None,
                         penalty: str | None = "l2", C: float = 1.0, l1_ratio: float | None = None,
                         tol: float = 1e-8, max_rounds: int = 30, transcript: list | None = None) -> LogisticModel:
    """In-process secure fit: every site encodes its sums into digits, the digit vectors are added as integers
    (what SecAgg+ computes under its masks), the coordinator decodes.  Same protocol as the Flower path."""
    if not site_data:
        raise GLMError("no sites")
    features = list(feature_names) if feature_names is not None else None
    if features is None:
        first = next(iter(site_data.values()))[0]
        features = [str(c) for c in getattr(first, "columns", [f"x{j}" for j in range(np.shape(first)[1])])]
    server = SecureLogisticServer(features, len(site_data), penalty=penalty, C=C, l1_ratio=l1_ratio, tol=tol,
                                  max_rounds=max_rounds)
    request = server.start()
    while request is not None:
        vectors = {s: encode_digits(site_secure_logistic(rows, request, site=s), request["layout"], request["bits"],
                                    site=s) for s, rows in site_data.items()}
        total = sum(vectors.values())
        sums = decode_sums(total, request["layout"], request["bits"], len(site_data))
        if transcript is not None:
            transcript.append({"request": request, "site_digits": vectors, "sums": sums})
        request = server.receive(sums)
    return server.model()


# ----------------------------------------------------------------------------------------------
# Differential privacy: clipping, noise, accounting (Gaussian mechanism, no sampling amplification)
# ----------------------------------------------------------------------------------------------
def clip_update(weights: np.ndarray, reference: np.ndarray, clipping_norm: float) -> tuple[np.ndarray, float]:
    """Clip ``weights - reference`` to L2 norm ``clipping_norm`` (FlatClip, Flower's arithmetic operation for
    operation); returns (clipped weights, norm of the update before clipping)."""
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm must be positive, got {clipping_norm}")
    w = np.asarray(weights, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    update = np.subtract(w, ref)
    norm = float(np.sqrt(sum([np.linalg.norm(update.flat) ** 2])))
    scale = min(1, clipping_norm / norm) if norm > 0 else 1
    update = update * scale
    return ref + update, norm


def noise_std(noise_multiplier: float, clipping_norm: float, n_sites: int) -> float:
    """SD of the Gaussian noise added to the *average* of ``n_sites`` clipped updates: z c / k."""
    return float(noise_multiplier) * float(clipping_norm) / int(n_sites)


def _log_sub_exp(a: float, b: float) -> float:
    """log(e^a - e^b) for a >= b."""
    if b == -math.inf:
        return a
    return a + math.log1p(-math.exp(b - a)) if b < a else -math.inf


def gaussian_delta(mu: float, epsilon: float) -> float:
    r"""δ(ε) of a Gaussian mechanism with sensitivity/σ = ``mu`` (exact; Balle & Wang 2018, Dong et al. 2022)."""
    if mu <= 0:
        return 0.0
    a = scipy.special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + scipy.special.log_ndtr(-epsilon / mu - mu / 2)
    return float(max(math.exp(_log_sub_exp(float(a), float(b))), 0.0))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    r"""ε at ``delta`` after ``releases`` Gaussian releases of noise multiplier z: μ = √T / z, exact conversion."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if noise_multiplier <= 0:
        return math.inf
    if releases <= 0:
        return 0.0
    mu = math.sqrt(releases) / noise_multiplier
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(scipy.optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def noise_multiplier_for(epsilon: float, delta: float, releases: int) -> float:
    """The noise multiplier z giving exactly (``epsilon``, ``delta``) after ``releases`` rounds."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def gap(log_mu):
        return gaussian_delta(math.exp(log_mu), epsilon) - delta

    lo, hi = -20.0, 5.0
    while gap(hi) < 0:
        hi += 5.0
    log_mu = scipy.optimize.brentq(gap, lo, hi, xtol=1e-14)
    return math.sqrt(releases) / math.exp(log_mu)


#: Rényi orders of Google's dp-accounting RdpAccountant (default).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024])


def rdp_epsilon(noise_multiplier: float, releases: int, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    r"""ε from Rényi DP (what RDP accountants report; an upper bound on :func:`gaussian_epsilon`).

    Gaussian RDP :math:`T\alpha/(2z^2)`, converted with Canonne, Kamath & Steinke (2020, Prop. 12):
    :math:`\varepsilon = \text{rdp} + \log((\alpha-1)/\alpha) - (\log\delta + \log\alpha)/(\alpha-1)`.
    """
    if noise_multiplier <= 0:
        return math.inf
    best = math.inf
    for a in orders:
        rdp = releases * a / (2.0 * noise_multiplier ** 2)
        eps = rdp + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1.0)
        best = min(best, max(eps, 0.0))
    return float(best)
