"""Deterministic synthetic multi-site radiomics cohort for demos and tests.

The cohort imitates a multi-center CT study: every site (hospital) holds NIfTI images with one
segmented lesion per patient, a manifest with clinical covariates and outcomes, and a scanner of
its own that leaves batch effects in the raw radiomic features. Nothing here is real patient data.

Generative model
----------------
Sites ``k = 1..K`` and patients ``i = 1..N`` per site. Every random draw comes from a
``numpy.random.Generator`` seeded by ``(seed, k, i, stream)``, so a patient's table row, phantom
and scanner noise do not depend on ``N`` (the first patients of a 5 x 100 cohort equal those of a
5 x 10 cohort with the same seed; site profiles depend on ``K``) and the cohort is identical
across runs.

Site profile (scanner and case mix). Each parameter is spread over the sites by stratified
(Latin-hypercube) sampling of the range below, so with ``K >= 2`` sites always differ:

* intensity scale ``s_k`` in [0.85, 1.20] and offset ``o_k`` in [-20, 20] HU,
* white-noise SD ``sigma_k`` in [5, 20] HU and Gaussian blur ``b_k`` in [0, 1.2] voxel,
* voxel spacing: in-plane ``dx_k`` in [0.7, 1.0] mm, slice ``dz_k`` in [1.0, 3.0] mm,
* case mix: mean-age shift ``m_k`` in [-5, 5] years, stage shift ``t_k`` in [-0.3, 0.3],
  proportion of women ``f_k`` in [0.4, 0.6].

Patient (the same law at every site; ``e_*`` are independent standard normals):

* latent biology: aggressiveness ``a ~ N(0, 1)``, heterogeneity ``h ~ N(0, 1)``,
* ``age = clip(63 + m_k + 10 e_age, 25, 90)`` years; ``sex = F`` with probability ``f_k``,
* ``stage = 1 + #{c in (-0.85, 0, 0.85) : c < 0.55 a + 0.85 e_stage + t_k}`` (1-4),
* lesion equivalent-sphere diameter
  ``d = clip(19 exp(0.10 (stage - 2.5) + 0.06 a + 0.22 e_size), 10, 35)`` mm,
* shape irregularity ``q = clip(0.13 exp(0.45 a), 0.04, 0.35)``,
* texture contrast ``tau = clip(14 exp(0.35 h), 6, 35)`` HU and smoothing scale
  ``ell = clip(2.2 exp(-0.25 h), 1.5, 4)`` mm; lesion mean ``mu = 45 + 4 a + 3 h`` HU.

Outcomes (``age_c = (age - 63) / 10``, ``stage_c = stage - 2.5``):

* ``logit P(response = 1) = 0.3 - 1.0 a - 0.8 h - 0.25 age_c - 0.3 stage_c``,
* Weibull proportional hazards ``hazard(t) = lambda rho t^(rho - 1) exp(eta)`` with ``rho = 1.3``,
  ``lambda = log(2) / 24^rho`` (median 24 months at ``eta = 0``) and
  ``eta = 0.55 a + 0.4 h + 0.3 stage_c + 0.15 age_c``,
* independent censoring ``C ~ Uniform(12, 72)`` months; ``os_time = min(T, C)``,
  ``os_event = [T <= C]`` (about a third of the patients are censored).

Molecular markers (the pathology lab's, for association studies; their own random stream, so adding them changed
no other value): a CD8 T-cell ``immune_score = -0.75 h + 0.65 e_imm`` (a z-scored expression signature: hot tumours
are less heterogeneous) and ``egfr_mutant`` with ``logit P = -1.0 + 1.1 a`` (aggressive tumours carry it).

Several scanners per site (``scanners_per_site = S >= 2``; the default ``S = 1`` is the model above, where a
site's profile is its one scanner, and leaves every output unchanged). Scanner *models* ``m = 1..M`` with
``M = max(S, K - 1)`` (named ``scannerA``, ``scannerB``, ...) take the scanner parameters above (intensity scale
and offset, noise, blur, voxel spacing), stratified over the same ranges across the models; site ``k`` runs the
models ``(k - 1 + j) mod M`` for ``j = 0..S-1`` (a ring, so with ``K >= M`` every model is at ``>= 2`` sites:
5 sites share 4 models), with a site protocol that shifts each model's intensity offset by ``U(-3, 3)`` HU and
multiplies its noise SD by ``exp(U(-0.1, 0.1))``. A site splits its patients between its scanners with shares
``w_j`` proportional to ``1 + U(-0.3, 0.3)`` (35-65 % for two scanners); each patient's scanner is an
independent draw. The site's case mix, every patient's biology, covariates and outcomes, and the phantom are the
same as with ``S = 1`` (only the rendering scanner changes); the manifest, ``truth.csv`` and the table gain a
``scanner`` column. These draws use their own random stream (``(seed, 0, 0, 5)`` for the models, ``(seed, k, 0,
5)`` for a site's protocol and shares, ``(seed, k, i, 5)`` for patient ``i``'s scanner).

The outcomes depend on ``a`` and ``h``, which the images express through shape irregularity and
texture, and only weakly through lesion volume, so a radiomic signature can beat a volume-only
baseline.

Phantom and rendering. The lesion is a randomly oriented ellipsoid (axis ratios ``exp(0.15 e)``)
whose radius in direction ``u`` is multiplied by ``exp(q g(u))``, where ``g`` is a smooth
unit-variance random function on the sphere (a sum of 8 random low-frequency plane waves); the
radius is scaled so the lesion volume is that of a sphere of diameter ``d``. Inside the lesion the
intensity is ``mu + tau G`` with ``G`` a unit-variance Gaussian random field (white noise smoothed
by a Gaussian of SD ``ell``); the background is soft tissue (``28 + 7 G'`` HU) with smooth fat
regions (about -100 HU). This continuous phantom depends on the patient only; a site renders it at its voxel centres
(field of view = lesion extent + 12 mm on every side, identity direction, centred origin), blurs
by ``b_k`` voxels, adds white noise of SD ``sigma_k``, applies ``s_k x + o_k`` and rounds to int16
HU. The mask (uint8, label 1) is the lesion indicator at the same voxel centres, so image and mask
share size, spacing, origin and direction exactly.
"""
from __future__ import annotations

import math
import os
import shutil
import string
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import ndimage
from scipy.special import expit

from fedrad.common.files import atomic_write_bytes

__all__ = ["MANIFEST_COLUMNS", "SCANNER_COLUMN", "simulate_demo_table", "write_demo_cohort"]

MANIFEST_COLUMNS = ("case_id", "image", "mask", "mask_label", "age", "sex", "stage",
                    "response", "os_time", "os_event", "immune_score", "egfr_mutant")
"""Columns of every site's ``manifest.csv``, in order."""

SCANNER_COLUMN = "scanner"
"""Column naming each patient's scanner model, appended to the manifest with ``scanners_per_site >= 2``."""

_TRUTH_COLUMNS = ("site", "case_id", "aggressiveness", "heterogeneity", "diameter_mm", "irregularity",
                  "texture_sd_hu", "texture_scale_mm", "lesion_mean_hu", "lp_response", "lp_hazard")

# Random streams: (seed, site, patient, stream). Keys always have four entries because SeedSequence
# treats trailing zeros as absent ((s, k) and (s, k, 0) would collide).
_STREAM_SITES, _STREAM_TABLE, _STREAM_PHANTOM, _STREAM_SCANNER, _STREAM_MARKERS = 0, 1, 2, 3, 4
_STREAM_SCANNER_MODELS = 5  # scanners_per_site >= 2: models (seed, 0, 0), site protocols (seed, k, 0), patients

_MARGIN_MM = 12.0           # background between the lesion's bounding box and the image border
_TEXTURE_GRID_MM = 1.0      # phantom grid of the lesion texture
_BACKGROUND_GRID_MM = 2.0   # phantom grid of the background
_WEIBULL_SHAPE = 1.3
_MEDIAN_OS_MONTHS = 24.0


@dataclass(frozen=True)
class _SiteProfile:
    """Scanner and case-mix parameters of one site (see the module docstring)."""

    name: str
    intensity_scale: float
    intensity_offset_hu: float
    noise_sd_hu: float
    blur_sigma_vox: float
    inplane_spacing_mm: float
    slice_spacing_mm: float
    age_shift_years: float
    stage_shift: float
    female_fraction: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z) in mm, in SimpleITK order."""
        return (self.inplane_spacing_mm, self.inplane_spacing_mm, self.slice_spacing_mm)


_SITE_RANGES = {
    "intensity_scale": (0.85, 1.20),
    "intensity_offset_hu": (-20.0, 20.0),
    "noise_sd_hu": (5.0, 20.0),
    "blur_sigma_vox": (0.0, 1.2),
    "inplane_spacing_mm": (0.7, 1.0),
    "slice_spacing_mm": (1.0, 3.0),
    "age_shift_years": (-5.0, 5.0),
    "stage_shift": (-0.3, 0.3),
    "female_fraction": (0.4, 0.6),
}


_SCANNER_FIELDS = ("intensity_scale", "intensity_offset_hu", "noise_sd_hu", "blur_sigma_vox",
                   "inplane_spacing_mm", "slice_spacing_mm")
_PROTOCOL_OFFSET_HU = 3.0    # a site's protocol shifts a model's intensity offset by U(-3, 3) HU
_PROTOCOL_NOISE_LOG = 0.1    # ... and multiplies its noise SD by exp(U(-0.1, 0.1))
_SCANNER_SHARE_SPREAD = 0.3  # scanner shares at a site are proportional to 1 + U(-0.3, 0.3)


def _rng(seed: int, site: int, patient: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, site, patient, stream])


def _validate(n_sites: int, n_patients: int, seed: int, scanners_per_site: int = 1) -> None:
    for name, value, low in (("n_sites", n_sites, 1), ("n_patients", n_patients, 1), ("seed", seed, 0),
                             ("scanners_per_site", scanners_per_site, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _site_profiles(n_sites: int, seed: int) -> list[_SiteProfile]:
    """Stratified draw of every site parameter over its range, so sites differ by design."""
    rng = _rng(seed, 0, 0, _STREAM_SITES)
    values = {}
    for name, (low, high) in _SITE_RANGES.items():
        strata = (rng.permutation(n_sites) + rng.random(n_sites)) / n_sites
        values[name] = np.round(low + (high - low) * strata, 3)
    return [_SiteProfile(name=f"site{k + 1}", **{name: float(v[k]) for name, v in values.items()})
            for k in range(n_sites)]


@dataclass(frozen=True)
class _ScannerModel:
    """One scanner model (``scanners_per_site >= 2``): the scanner fields of :class:`_SiteProfile`."""

    name: str
    intensity_scale: float
    intensity_offset_hu: float
    noise_sd_hu: float
    blur_sigma_vox: float
    inplane_spacing_mm: float
    slice_spacing_mm: float


@dataclass(frozen=True)
class _SiteScanners:
    """A site's scanners (``scanners_per_site >= 2``): models, the site's rendering profile of each, shares."""

    models: tuple[str, ...]
    profiles: tuple[_SiteProfile, ...]
    shares: tuple[float, ...]


def _model_name(m: int) -> str:
    """``scannerA`` .. ``scannerZ``, ``scannerAA``, ... (bijective base 26)."""
    letters, m = "", m + 1
    while m:
        m, r = divmod(m - 1, 26)
        letters = string.ascii_uppercase[r] + letters
    return f"scanner{letters}"


def _n_scanner_models(n_sites: int, scanners_per_site: int) -> int:
    return max(scanners_per_site, n_sites - 1)


def _scanner_models(n_sites: int, scanners_per_site: int, seed: int) -> list[_ScannerModel]:
    """Stratified draw of the scanner parameters over the models (own random stream)."""
    n_models = _n_scanner_models(n_sites, scanners_per_site)
    rng = _rng(seed, 0, 0, _STREAM_SCANNER_MODELS)
    values = {}
    for name in _SCANNER_FIELDS:
        low, high = _SITE_RANGES[name]
        strata = (rng.permutation(n_models) + rng.random(n_models)) / n_models
        values[name] = np.round(low + (high - low) * strata, 3)
    return [_ScannerModel(name=_model_name(m), **{name: float(v[m]) for name, v in values.items()})
            for m in range(n_models)]


def _site_scanners(sites: list[_SiteProfile], scanners_per_site: int, seed: int) -> list[_SiteScanners] | None:
    """Each site's scanners, or ``None`` for one scanner per site (the site profile is the scanner)."""
    if scanners_per_site == 1:
        return None
    models = _scanner_models(len(sites), scanners_per_site, seed)
    result = []
    for k, site in enumerate(sites, start=1):
        rng = _rng(seed, k, 0, _STREAM_SCANNER_MODELS)
        offset = rng.uniform(-_PROTOCOL_OFFSET_HU, _PROTOCOL_OFFSET_HU, scanners_per_site)
        noise = np.exp(rng.uniform(-_PROTOCOL_NOISE_LOG, _PROTOCOL_NOISE_LOG, scanners_per_site))
        weights = 1.0 + rng.uniform(-_SCANNER_SHARE_SPREAD, _SCANNER_SHARE_SPREAD, scanners_per_site)
        chosen = [models[(k - 1 + j) % len(models)] for j in range(scanners_per_site)]
        profiles = tuple(replace(site, **{**{name: getattr(m, name) for name in _SCANNER_FIELDS},
                                          "intensity_offset_hu": round(m.intensity_offset_hu + float(offset[j]), 3),
                                          "noise_sd_hu": round(m.noise_sd_hu * float(noise[j]), 3)})
                         for j, m in enumerate(chosen))
        result.append(_SiteScanners(models=tuple(m.name for m in chosen), profiles=profiles,
                                    shares=tuple(float(w) for w in weights / weights.sum())))
    return result


def _patient_scanner(seed: int, site_index: int, patient: int, scanners: _SiteScanners) -> int:
    """Index (into the site's scanners) of the scanner that imaged this patient."""
    u = _rng(seed, site_index, patient, _STREAM_SCANNER_MODELS).random()
    return min(int(np.searchsorted(np.cumsum(scanners.shares), u, side="right")), len(scanners.shares) - 1)


def _case_id(site: _SiteProfile, patient: int) -> str:
    return f"{site.name}-p{patient:03d}"


def _patient_row(seed: int, site_index: int, patient: int, site: _SiteProfile) -> dict:
    """Draw one patient's latent biology, covariates, phantom parameters and outcomes."""
    rng = _rng(seed, site_index, patient, _STREAM_TABLE)
    a, h, e_age, e_stage, e_size = rng.standard_normal(5)
    u_sex, u_response, u_survival, u_censor = rng.random(4)

    age = round(float(np.clip(63.0 + site.age_shift_years + 10.0 * e_age, 25.0, 90.0)), 1)
    stage = 1 + int(np.searchsorted([-0.85, 0.0, 0.85], 0.55 * a + 0.85 * e_stage + site.stage_shift))
    age_c, stage_c = (age - 63.0) / 10.0, stage - 2.5

    lp_response = 0.3 - 1.0 * a - 0.8 * h - 0.25 * age_c - 0.3 * stage_c
    lp_hazard = 0.55 * a + 0.4 * h + 0.3 * stage_c + 0.15 * age_c
    scale = math.log(2.0) / _MEDIAN_OS_MONTHS ** _WEIBULL_SHAPE
    event_time = (-math.log(u_survival) / (scale * math.exp(lp_hazard))) ** (1.0 / _WEIBULL_SHAPE)
    censor_time = 12.0 + 60.0 * u_censor
    markers = _rng(seed, site_index, patient, _STREAM_MARKERS)
    e_immune, u_mutant = markers.standard_normal(), markers.random()
    return {
        "site": site.name,
        "case_id": _case_id(site, patient),
        "age": age,
        "sex": "F" if u_sex < site.female_fraction else "M",
        "stage": stage,
        "response": int(u_response < expit(lp_response)),
        "os_time": max(round(min(event_time, censor_time), 2), 0.01),
        "os_event": int(event_time <= censor_time),
        "immune_score": round(float(-0.75 * h + 0.65 * e_immune), 3),
        "egfr_mutant": int(u_mutant < expit(-1.0 + 1.1 * a)),
        "aggressiveness": float(a),
        "heterogeneity": float(h),
        "diameter_mm": float(np.clip(19.0 * math.exp(0.10 * stage_c + 0.06 * a + 0.22 * e_size), 10.0, 35.0)),
        "irregularity": float(np.clip(0.13 * math.exp(0.45 * a), 0.04, 0.35)),
        "texture_sd_hu": float(np.clip(14.0 * math.exp(0.35 * h), 6.0, 35.0)),
        "texture_scale_mm": float(np.clip(2.2 * math.exp(-0.25 * h), 1.5, 4.0)),
        "lesion_mean_hu": 45.0 + 4.0 * a + 3.0 * h,
        "lp_response": float(lp_response),
        "lp_hazard": float(lp_hazard),
    }


def simulate_demo_table(n_sites: int, n_patients: int, seed: int = 0, scanners_per_site: int = 1) -> pd.DataFrame:
    """Draw the per-patient table of the demo cohort without rendering any image.

    The rows are exactly those behind :func:`write_demo_cohort` with the same arguments, which
    makes this the fast way to study the outcome model (e.g. in tests).

    Parameters
    ----------
    n_sites : int
        Number of sites (>= 1), named ``site1`` .. ``siteK``.
    n_patients : int
        Patients per site (>= 1).
    seed : int, default 0
        Non-negative random seed.
    scanners_per_site : int, default 1
        Scanners per site: 1, each site its own scanner (no ``scanner`` column); ``S >= 2``, scanner models
        shared across sites (see the module docstring) and a ``scanner`` column after ``case_id``.

    Returns
    -------
    pandas.DataFrame
        One row per patient, ordered by site then patient, with columns ``site``, ``case_id``,
        the manifest covariates and outcomes (``age``, ``sex``, ``stage``, ``response``,
        ``os_time``, ``os_event``), the molecular markers (``immune_score``, ``egfr_mutant``) and the ground truth: latent ``aggressiveness`` and
        ``heterogeneity``, phantom parameters (``diameter_mm``, ``irregularity``,
        ``texture_sd_hu``, ``texture_scale_mm``, ``lesion_mean_hu``) and the true linear
        predictors ``lp_response`` (log-odds) and ``lp_hazard`` (log relative hazard).

    Raises
    ------
    ValueError
        If an argument is not an integer in range.
    """
    _validate(n_sites, n_patients, seed, scanners_per_site)
    sites = _site_profiles(n_sites, seed)
    table = pd.DataFrame([_patient_row(seed, k + 1, i, site)
                          for k, site in enumerate(sites) for i in range(1, n_patients + 1)])
    scanners = _site_scanners(sites, scanners_per_site, seed)
    if scanners is not None:
        names = [sc.models[_patient_scanner(seed, k + 1, i, sc)]
                 for k, sc in enumerate(scanners) for i in range(1, n_patients + 1)]
        table.insert(table.columns.get_loc("case_id") + 1, SCANNER_COLUMN, names)
    return table


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed 3x3 rotation matrix (QR of a Gaussian matrix with sign correction)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors, shape (n, 3)."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = math.pi * (1.0 + math.sqrt(5.0)) * k
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def _gaussian_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-SD smooth Gaussian random field (white noise convolved with a Gaussian)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="wrap")
    return (field - field.mean()) / field.std()


def _axis(half_width: float, step: float) -> np.ndarray:
    """Uniform grid coordinates covering [-half_width, half_width] (at least two points)."""
    n = max(2, int(math.ceil(2.0 * half_width / step)) + 1)
    return (np.arange(n) - (n - 1) / 2.0) * step


def _interpolate_axis(field: np.ndarray, axis: int, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``field`` along one axis from uniform ``source`` to ``target`` coordinates.

    Elementwise (no BLAS), so the result does not depend on the number of threads.
    """
    t = np.clip((target - source[0]) / (source[1] - source[0]), 0.0, len(source) - 1.0)
    lower = np.minimum(np.floor(t).astype(np.intp), len(source) - 2)
    shape = [1] * field.ndim
    shape[axis] = len(target)
    weight = (t - lower).astype(field.dtype).reshape(shape)
    return np.take(field, lower, axis=axis) * (1 - weight) + np.take(field, lower + 1, axis=axis) * weight


def _resample(field: np.ndarray, source_axes: tuple[np.ndarray, ...],
              target_axes: tuple[np.ndarray, ...]) -> np.ndarray:
    """Trilinear interpolation of a (z, y, x) grid field onto another axis-aligned (z, y, x) grid."""
    for axis, (source, target) in enumerate(zip(source_axes, target_axes)):
        field = _interpolate_axis(field, axis, source, target)
    return field


class _Phantom:
    """Continuous phantom of one patient: lesion shape and texture, background; in mm around the lesion."""

    _N_WAVES = 8

    def __init__(self, row: dict, rng: np.random.Generator):
        self.rotation = _random_rotation(rng)
        axes = np.exp(0.15 * rng.standard_normal(3))
        self.inverse_axes = np.cbrt(axes.prod()) / axes
        self.irregularity = row["irregularity"]
        wave_directions = rng.standard_normal((self._N_WAVES, 3))
        frequencies = rng.uniform(0.5, 1.0, self._N_WAVES)  # cycles per unit of the direction vector
        self.wave_vectors = wave_directions * (
            2.0 * math.pi * frequencies / np.linalg.norm(wave_directions, axis=1))[:, None]
        self.wave_phases = rng.uniform(0.0, 2.0 * math.pi, self._N_WAVES)

        directions = _fibonacci_sphere(2000)
        unit_radius = self._unit_radius(directions)
        self.radius_scale = row["diameter_mm"] / 2.0 / np.cbrt(np.mean(unit_radius ** 3))
        radius = self.radius_scale * unit_radius
        # Radii and extents from 2000 directions; the margins cover the gaps between them.
        self.inner_radius_mm, self.outer_radius_mm = 0.95 * radius.min(), 1.05 * radius.max()
        self.extent_mm = np.abs(radius[:, None] * directions @ self.rotation.T).max(axis=0) + 1.0  # x, y, z
        inplane = max(self.extent_mm[0], self.extent_mm[1]) + _MARGIN_MM
        self.half_fov_mm = np.array([inplane, inplane, self.extent_mm[2] + _MARGIN_MM])

        # Grids in (z, y, x) order, slightly larger than what any site renders.
        self.texture_axes = tuple(_axis(e + 2.0, _TEXTURE_GRID_MM) for e in self.extent_mm[::-1])
        self.texture = row["lesion_mean_hu"] + row["texture_sd_hu"] * _gaussian_field(
            rng, tuple(len(a) for a in self.texture_axes), row["texture_scale_mm"] / _TEXTURE_GRID_MM)

        self.background_axes = tuple(_axis(w + 4.0, _BACKGROUND_GRID_MM) for w in self.half_fov_mm[::-1])
        shape = tuple(len(a) for a in self.background_axes)
        tissue = 28.0 + 7.0 * _gaussian_field(rng, shape, 4.0 / _BACKGROUND_GRID_MM)
        fat = expit((_gaussian_field(rng, shape, 7.0 / _BACKGROUND_GRID_MM) - 0.9) / 0.15)
        self.background = tissue * (1.0 - fat) + (-100.0 + 0.3 * tissue) * fat

    def _unit_radius(self, directions: np.ndarray) -> np.ndarray:
        """Lesion radius (before scaling) along unit vectors given in the lesion frame, shape (n, 3)."""
        ellipsoid = 1.0 / np.sqrt(((directions * self.inverse_axes) ** 2).sum(axis=1))
        waves = np.cos(directions @ self.wave_vectors.T + self.wave_phases).sum(axis=1)
        return ellipsoid * np.exp(self.irregularity * math.sqrt(2.0 / self._N_WAVES) * waves)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Boolean lesion indicator at physical points (n, 3) in mm, lesion centre at the origin."""
        local = points @ self.rotation
        distance = np.linalg.norm(local, axis=1)
        result = distance <= self.inner_radius_mm
        shell = np.flatnonzero(~result & (distance <= self.outer_radius_mm))
        directions = local[shell] / distance[shell, None]
        result[shell] = distance[shell] <= self.radius_scale * self._unit_radius(directions)
        return result


def _render(phantom: _Phantom, site: _SiteProfile, rng: np.random.Generator
            ) -> tuple[sitk.Image, sitk.Image]:
    """Render a phantom with a site's scanner: (int16 HU image, uint8 mask) on the same grid."""
    spacing = np.array(site.spacing)
    sizes = np.ceil(2.0 * phantom.half_fov_mm / spacing).astype(int)
    grid = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(sizes, spacing)]  # x, y, z voxel centres
    zyx = tuple(grid[::-1])
    image = _resample(phantom.background, phantom.background_axes, zyx)
    mask = np.zeros(image.shape, dtype=np.uint8)

    box = tuple(np.flatnonzero(np.abs(c) <= e) for c, e in zip(zyx, phantom.extent_mm[::-1]))
    box_slices = tuple(slice(b[0], b[-1] + 1) for b in box)
    box_axes = tuple(c[b] for c, b in zip(zyx, box))
    z, y, x = np.meshgrid(*box_axes, indexing="ij")
    inside = phantom.inside(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)).reshape(z.shape)
    lesion = _resample(phantom.texture, phantom.texture_axes, box_axes)
    image[box_slices] = np.where(inside, lesion, image[box_slices])
    mask[box_slices] = inside

    if site.blur_sigma_vox > 0:
        image = ndimage.gaussian_filter(image, site.blur_sigma_vox, mode="nearest")
    image += site.noise_sd_hu * rng.standard_normal(image.shape, dtype=np.float32)
    image = site.intensity_scale * image + site.intensity_offset_hu
    hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    origin = tuple(float(c[0]) for c in grid)
    images = []
    for array in (hu, mask):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(tuple(float(s) for s in spacing))
        itk.SetOrigin(origin)
        itk.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        images.append(itk)
    return images[0], images[1]


def _check_out_dir(out: Path, sites: list[_SiteProfile]) -> None:
    for site in sites:
        site_dir = out / site.name
        if site_dir.exists() and (not site_dir.is_dir() or any(site_dir.iterdir())):
            raise FileExistsError(f"{site_dir} already exists and is not empty; pass an empty --out directory")


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary name in the same directory, then rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _readme(sites: list[_SiteProfile], n_patients: int, seed: int,
            scanners: list[_SiteScanners] | None = None) -> str:
    header = f"{'site':<8}{'spacing x/y/z (mm)':>22}{'blur (vox)':>12}{'noise SD':>10}{'scale':>8}" \
             f"{'offset':>8}{'age shift':>11}"
    lines = [f"{s.name:<8}{f'{s.inplane_spacing_mm:.3f}/{s.inplane_spacing_mm:.3f}/{s.slice_spacing_mm:.3f}':>22}"
             f"{s.blur_sigma_vox:>12.2f}{s.noise_sd_hu:>10.1f}{s.intensity_scale:>8.3f}"
             f"{s.intensity_offset_hu:>8.1f}{s.age_shift_years:>11.1f}" for s in sites]
    columns = MANIFEST_COLUMNS
    scanner_text = ["Each site has its own scanner (batch effects in raw features, which ComBat should remove):",
                    header, *lines]
    if scanners is not None:
        columns = MANIFEST_COLUMNS + (SCANNER_COLUMN,)
        header = f"{'site':<8}{'scanner':<14}{'share':>6}{'spacing x/y/z (mm)':>22}{'blur (vox)':>12}" \
                 f"{'noise SD':>10}{'scale':>8}{'offset':>8}{'age shift':>11}"
        lines = [f"{s.name:<8}{m:<14}{w:>6.2f}"
                 f"{f'{p.inplane_spacing_mm:.3f}/{p.inplane_spacing_mm:.3f}/{p.slice_spacing_mm:.3f}':>22}"
                 f"{p.blur_sigma_vox:>12.2f}{p.noise_sd_hu:>10.1f}{p.intensity_scale:>8.3f}"
                 f"{p.intensity_offset_hu:>8.1f}{s.age_shift_years:>11.1f}"
                 for s, sc in zip(sites, scanners) for m, p, w in zip(sc.models, sc.profiles, sc.shares)]
        scanner_text = [f"Each site runs {len(scanners[0].models)} scanners; the scanner models are shared across "
                        f"sites (column {SCANNER_COLUMN}),",
                        "with a site protocol shifting each model's offset and noise a little. Batch effects in the",
                        "raw features follow the scanner, which ComBat should remove (share = the site's patients",
                        "on that scanner, expected):", header, *lines]
    return "\n".join([
        "fedrad synthetic demo cohort",
        "============================",
        "",
        f"{len(sites)} sites x {n_patients} patients, seed {seed}. Entirely synthetic: no real patient data.",
        "",
        "Each site directory holds manifest.csv (paths relative to it), images/<case>.nii.gz (CT-like",
        "int16 HU) and masks/<case>.nii.gz (uint8, lesion label 1). Manifest columns:",
        "  " + ", ".join(columns),
        "(age in years, sex F/M, stage 1-4, response 0/1, os_time in months, os_event 1 = death).",
        "",
        "Every patient has a latent aggressiveness a and heterogeneity h (standard normal). Aggressive",
        "lesions have more irregular shapes (lower sphericity); heterogeneous lesions have stronger,",
        "finer texture. Lesion size depends on stage and only weakly on a. Response and overall",
        "survival depend on a, h, age and stage by the same law at every site, so a radiomic signature",
        "(shape + texture) can beat a volume-only baseline. About a third of survival times are censored.",
        "",
        *scanner_text,
        "",
        "truth.csv holds the ground truth for tests and demos only (latent a and h, phantom parameters,",
        "true linear predictors): a real site would never have it. Do not use it as a feature.",
        "",
        "The full generative model (equations) is documented in the fedrad.client.demo_data module.",
        "Next step, at each site:  fedrad site extract <site>/manifest.csv --out <site>/features.parquet",
        "",
    ])


def write_demo_cohort(out_dir: str | os.PathLike, n_sites: int = 5, n_patients: int = 100, seed: int = 0,
                      progress: bool = False, scanners_per_site: int = 1) -> list[Path]:
    """Write a synthetic multi-site CT radiomics cohort (see the module docstring for the model).

    Layout: ``OUT/siteK/manifest.csv``, ``OUT/siteK/images/<case>.nii.gz`` and
    ``OUT/siteK/masks/<case>.nii.gz`` for ``K = 1..n_sites``, plus ``OUT/README.txt`` and
    ``OUT/truth.csv`` (ground truth for tests and demos; a real site would never have it).
    Each site is built in a hidden temporary directory inside ``OUT`` and renamed into place
    when complete, so an interrupted run never leaves a partial site under its final name.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output directory; created if missing. ``siteK`` subdirectories must be absent or empty.
    n_sites : int, default 5
        Number of sites (>= 1).
    n_patients : int, default 100
        Patients per site (>= 1).
    seed : int, default 0
        Non-negative random seed; the output is identical for identical arguments.
    progress : bool, default False
        Show a progress bar (patients written / total) on stderr; ``False`` prints nothing.
    scanners_per_site : int, default 1
        1: each site has one scanner of its own (the manifest has no ``scanner`` column). ``S >= 2``: each site
        runs ``S`` scanner models shared across sites and splits its patients between them; the manifest and
        ``truth.csv`` get a ``scanner`` column (the model's name). See the module docstring.

    Returns
    -------
    list of pathlib.Path
        The manifest of every site, in site order.

    Raises
    ------
    ValueError
        If an argument is not an integer in range.
    FileExistsError
        If a ``siteK`` directory already exists and is not empty.
    """
    _validate(n_sites, n_patients, seed, scanners_per_site)
    out = Path(out_dir)
    sites = _site_profiles(n_sites, seed)
    scanners = _site_scanners(sites, scanners_per_site, seed)
    _check_out_dir(out, sites)
    out.mkdir(parents=True, exist_ok=True)
    table = simulate_demo_table(n_sites, n_patients, seed, scanners_per_site)
    manifest_columns, truth_columns = list(MANIFEST_COLUMNS), list(_TRUTH_COLUMNS)
    if scanners is not None:
        manifest_columns.append(SCANNER_COLUMN)
        truth_columns.insert(truth_columns.index("case_id") + 1, SCANNER_COLUMN)

    manifests = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("patients"), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), disable=not progress) as bar:
        task = bar.add_task("writing demo cohort", total=n_sites * n_patients)
        for k, site in enumerate(sites, start=1):
            rows = table[table["site"] == site.name].to_dict("records")
            tmp = out / f".{site.name}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run of a process with our pid
            try:
                (tmp / "images").mkdir(parents=True)
                (tmp / "masks").mkdir()
                for patient, row in enumerate(rows, start=1):
                    phantom = _Phantom(row, _rng(seed, k, patient, _STREAM_PHANTOM))
                    scanner = site if scanners is None else \
                        scanners[k - 1].profiles[scanners[k - 1].models.index(row[SCANNER_COLUMN])]
                    image, mask = _render(phantom, scanner, _rng(seed, k, patient, _STREAM_SCANNER))
                    sitk.WriteImage(image, str(tmp / "images" / f"{row['case_id']}.nii.gz"), useCompression=True)
                    sitk.WriteImage(mask, str(tmp / "masks" / f"{row['case_id']}.nii.gz"), useCompression=True)
                    bar.advance(task)
                manifest = pd.DataFrame(rows)
                manifest["image"] = "images/" + manifest["case_id"] + ".nii.gz"
                manifest["mask"] = "masks/" + manifest["case_id"] + ".nii.gz"
                manifest["mask_label"] = 1
                manifest[manifest_columns].to_csv(tmp / "manifest.csv", index=False, lineterminator="\n")
                final = out / site.name
                if final.is_dir():  # empty (checked above); os.replace onto a directory is not portable
                    final.rmdir()
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            manifests.append(final / "manifest.csv")

    _write_text(out / "truth.csv", table[truth_columns].to_csv(index=False, lineterminator="\n"))
    _write_text(out / "README.txt", _readme(sites, n_patients, seed, scanners))
    return manifests
