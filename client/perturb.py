"""Image perturbations at a site, for feature robustness (ICC(1,1)): the site-local perturbed feature table.

Radiomic feature robustness is assessed by extracting every feature from several perturbed versions of each
image and mask and computing ICC(1,1) per feature across the perturbations (Zwanenburg et al., "Assessing
robustness of radiomic features by image perturbation", Sci Rep 9:614, 2019, doi:10.1038/s41598-018-36938-4;
ICC(1,1): Shrout & Fleiss, Psychol Bull 86:420, 1979). fedrad pools the per-site one-way ANOVA sums later
(:mod:`fedrad.common.selection`); this module produces the site's long table ``case_id, perturbation,
<features>`` (one row per case and perturbation).

Perturbation design (:func:`perturbations`)
-------------------------------------------
Perturbation 0 is the identity: its row is exactly what ``fedrad site extract`` gives for the case (it is
computed by :func:`fedrad.client.extract.extract_case` itself and shares its cache entry), so the reference
value every model uses is one of the replicates. Perturbations 1..n-1 are chains of all four of Zwanenburg's
image/mask perturbations that fedrad implements, "RTNV" in their naming (R rotation, T translation, N noise
addition, V volume adaptation; contour randomisation "C", which needs a supervoxel segmentation, is not
implemented). Their settings are a jittered Latin hypercube over the ranges below, drawn from ``seed``, so each
range is covered evenly whatever ``n`` is and the design is reproducible:

======================  ==========================  ==========================================================
setting                 range                       meaning
======================  ==========================  ==========================================================
``rotation_deg``        -10 .. +10 degrees          in-plane rotation (about the image's slice-normal axis, z
                                                    for axial images) through the mask centroid, as in MIRP
``translation_vox``     -0.5 .. +0.5 voxel per axis sub-voxel shift, as a fraction of the voxel spacing along
                                                    each image axis (mm = fraction x spacing; a fraction rather
                                                    than mm so one design fits every case's spacing)
``noise_sd_fraction``   0.05 .. 0.20                additive Gaussian noise, SD = fraction x the ROI's robust
                                                    intensity SD (1.4826 x median absolute deviation of the ROI
                                                    voxels, so calcifications or air do not inflate it)
``volume_change``       -0.10 .. +0.10              fractional change of the ROI volume
======================  ==========================  ==========================================================

How a perturbation is applied (:func:`perturb_case`), always on the input's grid:

1. Rotation and translation move image and mask content together: the image is resampled with linear
   interpolation (nearest-neighbour extrapolation at the image border); the mask is resampled as a float 0/1
   image with linear interpolation and thresholded at 0.5 (no nearest-neighbour staircase). Note that a binary
   mask on its own grid does not move under a translation below half a voxel (no re-discretisation can): the
   sub-voxel shift then changes the image relative to the contour, which is the partial-volume perturbation
   intended.
2. Volume adaptation: every voxel gets its signed Euclidean distance (in mm) to the mask surface; the mask
   becomes the ``round((1 + volume_change) * N)`` voxels of smallest signed distance, ``N`` the original
   voxel count. Growth adds the nearest outside voxels, shrinkage removes the shallowest inside voxels, and the
   voxel count equals the target exactly (also after a rotation, which therefore does not change the volume).
   Ties at equal distance are broken by a hash of the voxel's position.
3. Noise is added last, to every voxel of the image, so that its SD is exactly the requested one (noise added
   before interpolation would be smoothed by a shift-dependent amount). Integer images are rounded back to
   their pixel type, as a rescan would be; the perturbed mask holds only ``label``.

Randomness (noise, distance ties) is a hash of (key, voxel position), the key drawn from the ``rng`` passed in;
:func:`extract_perturbed` seeds it per case from ``sha256(case key)``, the perturbation index and ``seed``
(:func:`case_rng`), so results are reproducible and independent of processing order, parallelism and of the
crop used for extraction (the perturbed values of a voxel do not depend on the block they are computed in).

Extraction (:func:`extract_perturbed`)
--------------------------------------
The same parameter handling, process pool, cache, crash-safety and outputs as
:func:`fedrad.client.extract.extract_manifest`. For a perturbation the image is read, normalized image-wide
when the parameter file asks for it (perturbations act on the image as pyradiomics sees it; noise and ROI SD
are then on the normalized scale), perturbed only inside the block extraction needs (the perturbed mask's
bounding box plus :func:`fedrad.client.extract.crop_plan`'s margin, or the whole image for whole-image filters),
and passed to the worker's pyradiomics extractor exactly as ``extract_case`` would pass a cropped case. A case
enters the table only when all its perturbations succeeded (ICC(1,1) needs the same ``k`` for every case);
otherwise it is listed in ``<out>.errors.csv``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad import __version__
from fedrad.client import extract as _extract
from fedrad.client.extract import (
    CropPlan,
    ExtractionError,
    ExtractionResult,
    FeatureCache,
    case_cache_key,
    crop_plan,
    extract_case,
    load_case,
    map_in_pool,
    params_digest,
    progress_bar,
    resolve_params,
    run_extractor,
    write_outputs,
)
from fedrad.client.manifest import Case, CheckTolerances, read_manifest

__all__ = ["Perturbation", "PerturbationResult", "perturbations", "perturb_case", "case_rng", "roi_robust_sd",
           "extract_perturbed", "extract_perturbed_case", "ROTATION_RANGE_DEG", "TRANSLATION_RANGE_VOX",
           "NOISE_RANGE", "VOLUME_RANGE"]

ROTATION_RANGE_DEG = (-10.0, 10.0)
TRANSLATION_RANGE_VOX = (-0.5, 0.5)
NOISE_RANGE = (0.05, 0.20)
VOLUME_RANGE = (-0.10, 0.10)
#: MAD -> SD for a normal distribution
MAD_TO_SD = 1.4826
#: bump when anything that changes perturbed values changes (invalidates cached perturbed features)
PERTURB_VERSION = "1"


# ----------------------------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Perturbation:
    """One perturbation setting (see the module docstring for units and how it is applied)."""

    name: str
    noise_sd_fraction: float = 0.0
    rotation_deg: float = 0.0
    translation_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)
    volume_change: float = 0.0

    @property
    def is_identity(self) -> bool:
        return (self.noise_sd_fraction == 0 and self.rotation_deg == 0 and self.volume_change == 0
                and not any(self.translation_vox))

    @property
    def is_geometric(self) -> bool:
        return self.rotation_deg != 0 or any(self.translation_vox)

    def translation_mm(self, spacing) -> np.ndarray:
        """Shift along the image axes in mm for a voxel ``spacing``."""
        return np.asarray(self.translation_vox, dtype=float) * np.asarray(spacing, dtype=float)


def perturbations(seed: int, n: int = 4) -> list[Perturbation]:
    """``n`` perturbation settings: 0 the identity, 1..n-1 "RTNV" chains from a jittered Latin hypercube.

    Each of the six quantities (rotation, three translation fractions, noise fraction, volume change) has its
    range split into ``n - 1`` equal strata; every perturbation takes one stratum of each (a permutation drawn
    from ``seed``) and a uniform point inside it. Same ``seed`` and ``n``: same list.
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1 (the identity); got {n}")
    n, k = int(n), int(n) - 1
    out = [Perturbation(name="original")]
    if k == 0:
        return out
    rng = np.random.default_rng([int(seed), 0x7E57])

    def lhs(lo: float, hi: float) -> np.ndarray:
        u = (rng.permutation(k) + rng.uniform(size=k)) / k
        return lo + (hi - lo) * u

    rot = lhs(*ROTATION_RANGE_DEG)
    trans = np.stack([lhs(*TRANSLATION_RANGE_VOX) for _ in range(3)], axis=1)
    noise = lhs(*NOISE_RANGE)
    vol = lhs(*VOLUME_RANGE)
    for i in range(k):
        out.append(Perturbation(name=f"RTNV{i + 1}", noise_sd_fraction=round(float(noise[i]), 6),
                                rotation_deg=round(float(rot[i]), 6),
                                translation_vox=tuple(round(float(t), 6) for t in trans[i]),
                                volume_change=round(float(vol[i]), 6)))
    return out


def case_rng(case_key: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator for perturbation ``index`` of a case: from sha256(case key), the index and ``seed``."""
    digest = int.from_bytes(hashlib.sha256(str(case_key).encode()).digest()[:8], "little")
    return np.random.default_rng([digest, int(index), int(seed)])


# ----------------------------------------------------------------------------------------------- hashing

_U64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int."""
    x &= _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _stream_key(key: int, stream: int) -> np.uint64:
    return np.uint64(_mix_int(key + 0x632BE59BD9B4E019 * (stream + 1)))


def _hash_at(key: int, stream: int, gidx: np.ndarray) -> np.ndarray:
    """SplitMix64 output ``gidx`` of the stream seeded by (key, stream): a uint64 per voxel."""
    return _mix(_stream_key(key, stream) + gidx.astype(np.uint64) * _GOLDEN)


def _global_index(lo, size, full) -> np.ndarray:
    """Linear index (x fastest) in the full grid of every voxel of the block ``lo``/``size`` (z, y, x array)."""
    nx, ny = np.uint64(full[0]), np.uint64(full[1])
    x = np.arange(lo[0], lo[0] + size[0], dtype=np.uint64)
    y = np.arange(lo[1], lo[1] + size[1], dtype=np.uint64)
    z = np.arange(lo[2], lo[2] + size[2], dtype=np.uint64)
    return (z[:, None, None] * ny + y[None, :, None]) * nx + x[None, None, :]


def _normal_block(key: int, lo, size, full) -> np.ndarray:
    """Standard normal values (Box-Muller on two hash streams) for a block; a voxel's value depends only on the
    key and its position in the full grid."""
    out = np.empty((size[2], size[1], size[0]), dtype=np.float64)
    step = max(1, (1 << 21) // max(1, size[0] * size[1]))
    for z0 in range(0, size[2], step):
        nz = min(step, size[2] - z0)
        g = _global_index((lo[0], lo[1], lo[2] + z0), (size[0], size[1], nz), full)
        u1 = ((_hash_at(key, 0, g) >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]
        u2 = (_hash_at(key, 1, g) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        out[z0:z0 + nz] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return out


def _rng_key(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2 ** 63, dtype=np.int64))


# ----------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Roi:
    n: int
    centroid: np.ndarray  # physical
    lo: np.ndarray  # bounding box, index (x, y, z)
    hi: np.ndarray  # inclusive
    sd: float  # robust intensity SD inside the ROI


def _int_mask(mask):
    import SimpleITK as sitk

    if mask.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkInt8, sitk.sitkInt16,
                             sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64):
        return mask
    return sitk.Cast(mask, sitk.sitkInt32)


def _roi(image, mask, label: int) -> _Roi:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise ExtractionError(f"perturbations need a 3-D image; this one is {image.GetDimension()}-D")
    mask = _int_mask(mask)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.ComputeFeretDiameterOff()
    stats.Execute(mask)
    if label not in stats.GetLabels():
        raise ExtractionError(f"label {label} not present in the mask")
    bb = stats.GetBoundingBox(label)
    lo, size = np.array(bb[:3]), np.array(bb[3:])
    img = sitk.GetArrayFromImage(sitk.RegionOfInterest(image, [int(s) for s in size], [int(i) for i in lo]))
    msk = sitk.GetArrayFromImage(sitk.RegionOfInterest(mask, [int(s) for s in size], [int(i) for i in lo]))
    values = np.asarray(img[msk == label], dtype=np.float64)
    med = float(np.median(values))
    sd = MAD_TO_SD * float(np.median(np.abs(values - med)))
    if sd == 0.0:
        sd = float(values.std())
    return _Roi(n=int(stats.GetNumberOfPixels(label)), centroid=np.array(stats.GetCentroid(label)), lo=lo,
                hi=lo + size - 1, sd=sd)


def roi_robust_sd(image, mask, label: int = 1) -> float:
    """The ROI intensity scale noise is relative to: 1.4826 x MAD of the ROI voxels (plain SD if the MAD is 0)."""
    return _roi(image, mask, label).sd


def _rotation_matrix(axis: np.ndarray, theta: float) -> np.ndarray:
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * np.outer(a, a)


def _transform(p: Perturbation, grid, centroid: np.ndarray):
    """Output-to-input map for resampling: content moves by y = R (x - c) + c + t."""
    import SimpleITK as sitk

    d = np.array(grid.GetDirection()).reshape(3, 3)
    r = _rotation_matrix(d[:, 2], math.radians(p.rotation_deg))
    t = d @ p.translation_mm(grid.GetSpacing())
    tf = sitk.AffineTransform(3)
    tf.SetCenter([float(v) for v in centroid])
    tf.SetMatrix([float(v) for v in r.T.ravel()])
    tf.SetTranslation([float(v) for v in -(r.T @ t)])
    return tf


def _resample(src, grid, lo, size, tf, interpolator, pixel_type, extrapolate: bool):
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputOrigin(grid.TransformIndexToPhysicalPoint([int(i) for i in lo]))
    f.SetOutputSpacing(grid.GetSpacing())
    f.SetOutputDirection(grid.GetDirection())
    f.SetTransform(tf)
    f.SetInterpolator(interpolator)
    f.SetOutputPixelType(pixel_type)
    f.SetDefaultPixelValue(0.0)
    f.SetUseNearestNeighborExtrapolator(extrapolate)
    return f.Execute(src)


def _displacement_mm(p: Perturbation, grid, roi: _Roi) -> float:
    """Upper bound of how far rotation + translation move any voxel of the mask's bounding box."""
    corners = [grid.TransformContinuousIndexToPhysicalPoint([float(roi.lo[i] if (c >> i) & 1 else roi.hi[i])
                                                             for i in range(3)]) for c in range(8)]
    radius = max(float(np.linalg.norm(np.array(c) - roi.centroid)) for c in corners)
    return (2 * abs(math.sin(math.radians(p.rotation_deg) / 2)) * radius
            + float(np.linalg.norm(p.translation_mm(grid.GetSpacing()))))


def _select_smallest(values: np.ndarray, k: int, key: int, gidx: np.ndarray) -> np.ndarray:
    """Flat indices of the ``k`` smallest ``values``; ties at the cut broken by a hash of the voxel position."""
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k >= values.size:
        return np.arange(values.size)
    cut = np.partition(values, k - 1)[k - 1]
    below = np.flatnonzero(values < cut)
    ties = np.flatnonzero(values == cut)
    need = k - below.size
    if need < ties.size:
        h = _hash_at(key, 2, gidx[ties])
        ties = ties[np.argpartition(h, need - 1)[:need]]
    return np.concatenate([below, ties])


def _adapt_volume(binary: np.ndarray, spacing, target: int, key: int, lo, full) -> np.ndarray:
    """Grow/shrink ``binary`` (z, y, x) to exactly ``target`` voxels along the Euclidean distance to its surface."""
    from scipy.ndimage import distance_transform_edt

    n = int(binary.sum())
    if n == target or n == 0:
        return binary
    sampling = tuple(float(s) for s in spacing[::-1])
    gidx = _global_index(lo, binary.shape[::-1], full).ravel()
    out = binary.copy().ravel()
    if target > n:  # add the outside voxels nearest to the mask
        outside = np.flatnonzero(~out)
        dist = distance_transform_edt(~binary, sampling=sampling).ravel()[outside]
        out[outside[_select_smallest(dist, target - n, key, gidx[outside])]] = True
    else:  # remove the inside voxels nearest to the outside
        inside = np.flatnonzero(out)
        depth = distance_transform_edt(binary, sampling=sampling).ravel()[inside]
        out[inside[_select_smallest(depth, n - target, key, gidx[inside])]] = False
    return out.reshape(binary.shape)


def _target_voxels(p: Perturbation, roi: _Roi) -> int:
    return max(1, int(round((1.0 + p.volume_change) * roi.n)))


def _mask_block(mask, label: int, p: Perturbation, key: int, roi: _Roi, lo, size) -> np.ndarray:
    """The perturbed mask (bool, z, y, x) on the block ``lo``/``size`` of the mask's grid."""
    import SimpleITK as sitk

    full = mask.GetSize()
    if p.is_geometric:
        slo = np.maximum(roi.lo - 2, 0)
        shi = np.minimum(roi.hi + 2, np.array(full) - 1)
        src = sitk.RegionOfInterest(mask, [int(v) for v in shi - slo + 1], [int(v) for v in slo])
        src = sitk.Cast(sitk.BinaryThreshold(src, label, label, 1, 0), sitk.sitkFloat32)
        moved = _resample(src, mask, lo, size, _transform(p, mask, roi.centroid), sitk.sitkLinear,
                          sitk.sitkFloat32, extrapolate=False)
        binary = sitk.GetArrayViewFromImage(moved) >= 0.5
    else:
        block = sitk.RegionOfInterest(mask, [int(s) for s in size], [int(i) for i in lo])
        binary = sitk.GetArrayFromImage(block) == label
    if not binary.any():
        raise ExtractionError(f"perturbation {p.name} left the mask empty (label {label}, {roi.n} voxels)")
    return _adapt_volume(binary, np.array(mask.GetSpacing()), _target_voxels(p, roi), key, lo, full)


def _image_block(image, p: Perturbation, key: int, roi: _Roi, lo, size):
    """The perturbed image on the block ``lo``/``size``, in the input's pixel type."""
    import SimpleITK as sitk

    if p.is_geometric:
        out = _resample(image, image, lo, size, _transform(p, image, roi.centroid), sitk.sitkLinear,
                        sitk.sitkFloat64, extrapolate=True)
    else:
        out = sitk.Cast(sitk.RegionOfInterest(image, [int(s) for s in size], [int(i) for i in lo]),
                        sitk.sitkFloat64)
    sd = p.noise_sd_fraction * roi.sd
    if sd <= 0 and out.GetPixelID() == image.GetPixelID():
        return out
    arr = sitk.GetArrayFromImage(out)
    if sd > 0:
        arr += sd * _normal_block(key, lo, size, image.GetSize())
    dtype = sitk.GetArrayViewFromImage(image).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    res = sitk.GetImageFromArray(arr.astype(dtype, copy=False))
    res.CopyInformation(out)
    return res


def _same_grid(image, mask) -> None:
    if image.GetSize() != mask.GetSize() or not np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=1e-3) \
            or not np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-2):
        raise ExtractionError("image and mask must share one grid to be perturbed")


def _split_key(rng: np.random.Generator) -> tuple[int, int]:
    """Independent keys for the mask (distance ties) and the noise."""
    key = _rng_key(rng)
    return _mix_int(key ^ 0x5851F42D4C957F2D), _mix_int(key ^ 0x14057B7EF767814F)


def _mask_like(binary: np.ndarray, label: int, like, dtype=None):
    import SimpleITK as sitk

    if dtype is None:
        dtype = sitk.GetArrayViewFromImage(like).dtype
    out = sitk.GetImageFromArray(binary.astype(dtype) * dtype.type(label))
    out.CopyInformation(like)
    return out


def perturb_case(image, mask, label: int, p: Perturbation, rng: np.random.Generator):
    """Apply ``p`` to an image and its mask (on the image's grid); returns (image, mask) on the same grid.

    The image keeps its pixel type (integer images are rounded), the mask keeps its pixel type and holds only
    ``label`` (1 voxel = ``label``, else 0). The identity returns copies of the inputs. The result is a
    function of the inputs, ``p`` and the key drawn from ``rng``: same seed, same arrays.
    """
    import SimpleITK as sitk

    _same_grid(image, mask)
    if p.is_identity:
        return sitk.Image(image), sitk.Image(mask)
    mask = _int_mask(mask)
    mask_key, noise_key = _split_key(rng)
    roi = _roi(image, mask, label)
    lo, size = (0, 0, 0), image.GetSize()
    binary = _mask_block(mask, label, p, mask_key, roi, lo, size)
    out_image = _image_block(image, p, noise_key, roi, lo, size)
    out_mask = _mask_like(binary, label, mask)
    out_mask.CopyInformation(image)
    return out_image, out_mask


# ----------------------------------------------------------------------------------------------- extraction


def _perturbed_inputs(image, mask, label: int, p: Perturbation, rng: np.random.Generator, plan: CropPlan):
    """(image, mask) to hand to pyradiomics for a perturbed case: what ``crop_to_margin(plan)`` would give on the
    fully perturbed image, computed only on the block it keeps (values equal :func:`perturb_case`'s there)."""
    if plan.margin is None:  # whole-image filters: perturb everything
        return perturb_case(image, mask, label, p, rng)
    mask_key, noise_key = _split_key(rng)
    roi = _roi(image, mask, label)
    full = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    grow_mm = max(p.volume_change, 0.0) * float(np.max((roi.hi - roi.lo + 1) * spacing))
    pad = np.ceil((_displacement_mm(p, image, roi) + grow_mm) / spacing).astype(int) + 2
    while True:  # the block must contain the perturbed mask with a background rim (else: widen it)
        lo = np.maximum(roi.lo - pad, 0)
        hi = np.minimum(roi.hi + pad, full - 1)
        binary = _mask_block(mask, label, p, mask_key, roi, lo, hi - lo + 1)
        touches = False
        for axis in range(3):  # array axes are (z, y, x)
            arr_axis = 2 - axis
            first = np.take(binary, 0, axis=arr_axis).any()
            last = np.take(binary, -1, axis=arr_axis).any()
            touches |= bool((first and lo[axis] > 0) or (last and hi[axis] < full[axis] - 1))
        if not touches:
            break
        pad = pad * 2
    idx = np.nonzero(binary)  # z, y, x
    g = [idx[2] + lo[0], idx[1] + lo[1], idx[0] + lo[2]]
    plo = np.array([int(a.min()) for a in g])
    phi = np.array([int(a.max()) for a in g])
    rlo = np.maximum(plo - plan.margin, 0)
    rhi = np.minimum(phi + plan.margin, full - 1)
    rsize = rhi - rlo + 1
    out_image = _image_block(image, p, noise_key, roi, rlo, rsize)
    dtype = np.dtype(np.uint8) if 0 < label < 256 else np.dtype(np.int32)
    if plan.crop_mask:
        region, origin = rsize, rlo
    else:  # pyradiomics resamples: its grid comes from the whole mask, as in extract_case
        region, origin = full, np.zeros(3, dtype=int)
    arr = np.zeros((int(region[2]), int(region[1]), int(region[0])), dtype=bool)
    arr[g[2] - origin[2], g[1] - origin[1], g[0] - origin[0]] = True
    like = out_image if plan.crop_mask else image
    out_mask = _mask_like(arr, label, like, dtype)
    return out_image, out_mask


def extract_perturbed_case(case: Case, index: int, p: Perturbation, seed: int, worker,
                           tol: CheckTolerances = CheckTolerances()) -> dict[str, float]:
    """Feature values of perturbation ``index`` (setting ``p``) of one case. Raises ExtractionError."""
    if p.is_identity:
        return extract_case(case, worker, tol)
    from radiomics import imageoperations

    image, mask = load_case(case, tol)
    ex = worker.extractor
    if worker.normalize:
        image = imageoperations.normalizeImage(image, **worker.normalize)
    plan = crop_plan(ex.enabledImagetypes, ex.settings, image.GetSpacing())
    image, mask = _perturbed_inputs(image, mask, case.label, p, case_rng(case.key, index, seed), plan)
    return run_extractor(image, mask, case.label, worker, plan.pad_distance)


def _run_task(case: Case, index: int, p: Perturbation, seed: int, tol: CheckTolerances):
    """Pool task: (case key, index, features or None, error or None, seconds)."""
    t0 = time.perf_counter()
    try:
        feats = extract_perturbed_case(case, index, p, seed, _extract._WORKER, tol)
        return case.key, index, feats, None, time.perf_counter() - t0
    except ExtractionError as exc:
        return case.key, index, None, str(exc), time.perf_counter() - t0
    except Exception as exc:  # a bug or an unexpected library error must not stop the batch
        text = " ".join(str(exc).split())[:300]
        return case.key, index, None, f"unexpected {exc.__class__.__name__}: {text}", time.perf_counter() - t0


def _perturbed_cache_key(case: Case, index: int, p: Perturbation, seed: int, phash: str) -> str | None:
    if p.is_identity:  # the very entry `fedrad site extract` writes
        return case_cache_key(case, phash)
    tag = json.dumps({"perturb": PERTURB_VERSION, "case": case.key, "index": index, "seed": int(seed),
                      "p": asdict(p)}, sort_keys=True)
    return case_cache_key(case, f"{phash}|{tag}")


@dataclass
class PerturbationResult(ExtractionResult):
    """An :class:`ExtractionResult` of perturbed images; ``n_cached`` counts (case, perturbation) pairs."""

    n_perturbations: int
    perturbations: list[Perturbation]

    def headline(self) -> str:
        return (f"perturbed features: {self.out} ({self.n_ok} of {self.n_cases} cases x {self.n_perturbations} "
                f"perturbations, {self.n_cached} extractions from cache, {self.n_failed} cases failed, "
                f"{self.seconds:.1f} s wall time)")


def extract_perturbed(manifest: str | Path, params=None, out: str | Path = "features_perturbed.parquet",
                      n_perturbations: int = 4, seed: int = 0, jobs: int | None = None, progress: bool = False,
                      cache_dir: str | Path | None = None, use_cache: bool = True,
                      tolerances: CheckTolerances = CheckTolerances()) -> PerturbationResult:
    """Features of ``n_perturbations`` perturbed versions (:func:`perturbations` ``(seed, n)``) of every case.

    Output ``out`` (.parquet or .csv, written atomically): columns ``case_id`` (and ``timepoint`` when the
    manifest has it), ``perturbation`` (0..n-1; 0 is the original), then the feature columns; one row per case
    and perturbation, cases in manifest order. A case with any failed perturbation is left out and listed in
    ``<out stem>.errors.csv`` (``case_id, status, reason``; ``warning`` rows for NaN feature values). Parquet
    metadata holds the provenance of ``extract_manifest`` plus the seed and the perturbation settings. Cached
    per (case, perturbation) in the extraction cache; perturbation 0 shares ``fedrad site extract``'s entry.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ExtractionError(f"output {out} must end in .parquet or .csv")
    params_path = resolve_params(params)
    phash = params_digest(params_path)
    plist = perturbations(seed, n_perturbations)
    n_p = len(plist)
    man = read_manifest(manifest)
    errors: list[tuple[str, str, str]] = [(cid, "failed", msg) for _row, cid, msg in man.row_problems]
    seen: set[str] = set()
    cases: list[Case] = []
    for case in man.cases:
        if case.key in seen:
            errors.append((case.key, "failed", f"duplicate case_id {case.key!r} (row {case.row}); "
                                               "only the first row was extracted"))
            continue
        seen.add(case.key)
        cases.append(case)
    cache = FeatureCache(Path(cache_dir) if cache_dir else Path(man.path).resolve().parent / ".fedrad-cache")
    results: dict[tuple[str, int], dict] = {}
    failures: dict[str, dict[int, str]] = {}
    keys: dict[tuple[str, int], str | None] = {}
    todo: list[tuple[Case, int]] = []
    for case in cases:
        for i, p in enumerate(plist):
            key = _perturbed_cache_key(case, i, p, seed, phash) if use_cache else None
            keys[(case.key, i)] = key
            hit = cache.get(key) if key else None
            if hit is not None:
                results[(case.key, i)] = hit
            else:
                todo.append((case, i))
    n_cached = len(results)
    task_args = [(case, i, plist[i], seed, tolerances) for case, i in todo]
    with progress_bar(f"perturbing (x{n_p})", len(cases) * n_p, n_cached, progress) as bar:
        for ckey, i, feats, err, _secs in map_in_pool(_run_task, task_args, params_path, jobs):
            if feats is not None:
                results[(ckey, i)] = feats
                if keys.get((ckey, i)):
                    cache.put(keys[(ckey, i)], feats)
            else:
                failures.setdefault(ckey, {})[i] = err
            bar.advance(failed=feats is None)

    rows = []
    n_nan = 0
    feature_names: list[str] = []
    n_ok = 0
    for case in cases:
        failed = failures.get(case.key)
        if failed:
            reasons = set(failed.values())
            if len(failed) == n_p and len(reasons) == 1:
                reason = reasons.pop()
            else:
                i = min(failed)
                reason = (f"{len(failed)} of {n_p} perturbations failed; perturbation {i} ({plist[i].name}): "
                          f"{failed[i]}")
            errors.append((case.key, "failed", reason))
            continue
        n_ok += 1
        nan_in = set()
        for i in range(n_p):
            feats = results[(case.key, i)]
            if not feature_names:
                feature_names = list(feats)
            nan_in.update(k for k, v in feats.items() if v is None or (isinstance(v, float) and math.isnan(v)))
            row = {"case_id": case.case_id}
            if man.has_timepoint:
                row["timepoint"] = case.timepoint
            row["perturbation"] = i
            row.update(feats)
            rows.append(row)
        if nan_in:
            n_nan += 1
            shown = ", ".join(sorted(nan_in)[:3]) + (" ..." if len(nan_in) > 3 else "")
            errors.append((case.key, "warning", f"{len(nan_in)} feature values are NaN in some perturbation "
                                                f"({shown})"))
    ordered = ["case_id"] + (["timepoint"] if man.has_timepoint else []) + ["perturbation"]
    all_feats = list(dict.fromkeys(feature_names + [k for r in rows for k in r if k not in ordered]))
    df = pd.DataFrame(rows, columns=ordered + all_feats)
    df["perturbation"] = df["perturbation"].astype("int64")
    import radiomics

    metadata = {"version": __version__, "pyradiomics_version": radiomics.__version__, "params_hash": phash,
                "params_file": str(params_path), "params_yaml": params_path.read_text(),
                "manifest": str(Path(manifest).resolve()), "n_cases": str(len(cases)),
                "n_failed": str(sum(1 for e in errors if e[1] == "failed")),
                "perturb_version": PERTURB_VERSION, "perturbation_seed": str(int(seed)),
                "n_perturbations": str(n_p), "perturbations": json.dumps([asdict(p) for p in plist])}
    ep, n_failed = write_outputs(df if rows else None, out, metadata, errors,
                                 f"no case of {manifest} could be extracted with perturbations")
    return PerturbationResult(out=out, errors_file=ep, n_cases=len(cases) + len(man.row_problems), n_ok=n_ok,
                              n_failed=n_failed, n_perturbations=n_p, n_cached=n_cached, n_nan_features=n_nan,
                              seconds=time.perf_counter() - t_start, perturbations=plist,
                              errors=[(e[0], e[2]) for e in errors if e[1] == "failed"])
