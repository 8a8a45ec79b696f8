"""Perturbations do what they claim (identity, determinism, volume, rotation, translation, noise), the cropped
extraction path equals perturbing the whole image, and ``extract_perturbed`` writes the long table used for
ICC(1,1) (bad cases listed, batch continues, identity rows = ``extract_case``)."""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from scipy.ndimage import gaussian_filter

from fedrad.client.extract import SHIPPED_PARAMS, _make_worker, crop_plan, crop_to_margin, extract_case, run_extractor
from fedrad.client.manifest import Case
from fedrad.client.perturb import (
    NOISE_RANGE,
    ROTATION_RANGE_DEG,
    TRANSLATION_RANGE_VOX,
    VOLUME_RANGE,
    Perturbation,
    _perturbed_inputs,
    case_rng,
    extract_perturbed,
    extract_perturbed_case,
    perturb_case,
    perturbations,
    roi_robust_sd,
)
from tests.conftest import shared_path

SPACING = (0.8, 0.8, 2.0)


def make_case(seed=0, radii=(8.0, 6.0, 8.0), size=(40, 40, 20), spacing=SPACING, dtype=np.float32):
    """A textured ellipsoid lesion (smoothed Gaussian texture) on a textured background."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    c = (np.array(size) - 1) / 2.0 + np.array([0.3, -0.2, 0.1])
    r = (((x - c[0]) * spacing[0] / radii[0]) ** 2 + ((y - c[1]) * spacing[1] / radii[1]) ** 2
         + ((z - c[2]) * spacing[2] / radii[2]) ** 2)
    inside = r <= 1.0
    tex = gaussian_filter(rng.normal(size=(nz, ny, nx)), sigma=(0.4, 1.0, 1.0))
    tex /= tex.std()
    img = 4.0 * rng.normal(size=(nz, ny, nx)) + np.where(inside, 100.0 + 30.0 * tex, 10.0 * tex)
    image = sitk.GetImageFromArray(img.astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 5.0, 3.0))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def arr(img) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def centroid_vox(mask_arr: np.ndarray) -> np.ndarray:
    """Centroid in voxel units, (x, y, z)."""
    return np.array(np.nonzero(mask_arr), dtype=float).mean(axis=1)[::-1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ----------------------------------------------------------------------------------------------- design


def test_perturbation_design_is_deterministic_and_covers_the_ranges():
    ps = perturbations(seed=3, n=9)
    assert len(ps) == 9 and ps[0].is_identity and ps[0].name == "original"
    assert all(not p.is_identity for p in ps[1:])
    assert perturbations(3, 9) == ps and perturbations(4, 9) != ps
    k = len(ps) - 1
    for attr, (lo, hi) in [("rotation_deg", ROTATION_RANGE_DEG), ("noise_sd_fraction", NOISE_RANGE),
                           ("volume_change", VOLUME_RANGE)]:
        u = (np.array([getattr(p, attr) for p in ps[1:]]) - lo) / (hi - lo)
        assert sorted(np.floor(u * k).astype(int)) == list(range(k)), attr  # one value per stratum
    for axis in range(3):
        lo, hi = TRANSLATION_RANGE_VOX
        u = (np.array([p.translation_vox[axis] for p in ps[1:]]) - lo) / (hi - lo)
        assert sorted(np.floor(u * k).astype(int)) == list(range(k))
    assert perturbations(0, 1) == [Perturbation("original")]
    with pytest.raises(ValueError):
        perturbations(0, 0)


def test_identity_returns_identical_image_and_mask():
    image, mask = make_case()
    out_i, out_m = perturb_case(image, mask, 1, Perturbation("original"), case_rng("a", 0))
    assert np.array_equal(arr(out_i), arr(image)) and np.array_equal(arr(out_m), arr(mask))
    assert out_i.GetOrigin() == image.GetOrigin() and out_m.GetSpacing() == mask.GetSpacing()


def test_same_seed_same_arrays_other_case_other_noise():
    image, mask = make_case()
    p = perturbations(0, 4)[1]
    a = perturb_case(image, mask, 1, p, case_rng("case-1", 1, 0))
    b = perturb_case(image, mask, 1, p, case_rng("case-1", 1, 0))
    c = perturb_case(image, mask, 1, p, case_rng("case-2", 1, 0))
    d = perturb_case(image, mask, 1, p, case_rng("case-1", 2, 0))
    assert np.array_equal(arr(a[0]), arr(b[0])) and np.array_equal(arr(a[1]), arr(b[1]))
    assert a[0].GetSize() == image.GetSize() and a[0].GetPixelID() == image.GetPixelID()
    for other in (c, d):
        diff = arr(a[0]).astype(float) - arr(other[0])
        assert np.abs(diff).mean() > 0.1 * p.noise_sd_fraction * roi_robust_sd(image, mask)


# ----------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("change", [0.10, -0.10, 0.05])
def test_volume_change_hits_the_target(change):
    image, mask = make_case()
    orig = arr(mask) == 1
    _, out = perturb_case(image, mask, 1, Perturbation("V", volume_change=change), case_rng("v", 0))
    new = arr(out) == 1
    target = (1 + change) * orig.sum()
    print(f"volume change {change:+.2f}: {orig.sum()} -> {new.sum()} voxels (target {target:.1f})")
    assert abs(new.sum() - target) <= 0.02 * target
    if change > 0:
        assert new[orig].all()  # growth only adds voxels ...
        added = np.argwhere(new & ~orig) * np.array(SPACING[::-1])
    else:
        assert orig[new].all()  # ... shrinkage only removes voxels
        added = np.argwhere(orig & ~new) * np.array(SPACING[::-1])
    # ... in a thin shell along the surface (grown/shrunk along the distance map, not by whole erosion steps)
    from scipy.ndimage import binary_erosion
    from scipy.spatial import cKDTree

    surface = np.argwhere(orig & ~binary_erosion(orig)) * np.array(SPACING[::-1])
    assert cKDTree(surface).query(added)[0].max() <= 2.0 + 1e-9  # mm: one slice spacing


def test_rotation_is_about_the_centroid_and_by_the_angle():
    # elongated in x so the in-plane orientation is well defined
    image, mask = make_case(radii=(11.0, 5.0, 8.0))
    orig = arr(mask) == 1
    theta = 10.0
    rot_i, rot_m = perturb_case(image, mask, 1, Perturbation("R", rotation_deg=theta), case_rng("r", 0))
    new = arr(rot_m) == 1
    shift = np.abs(centroid_vox(new) - centroid_vox(orig))
    assert new.sum() == orig.sum()  # rotation does not change the volume
    assert shift.max() < 0.5, shift

    def orientation(m):  # principal in-plane axis angle (degrees, physical)
        z, y, x = np.nonzero(m)
        cov = np.cov(np.stack([x * SPACING[0], y * SPACING[1]]))
        w, v = np.linalg.eigh(cov)
        return math.degrees(math.atan2(v[1, -1], v[0, -1])) % 180.0

    turned = (orientation(new) - orientation(orig) + 90.0) % 180.0 - 90.0
    back_i, back_m = perturb_case(rot_i, rot_m, 1, Perturbation("R", rotation_deg=-theta), case_rng("r", 1))
    d = dice(arr(back_m) == 1, orig)
    print(f"rotation {theta} deg: centroid moved {shift.round(3)} voxel, orientation changed {turned:.2f} deg, "
          f"rotated-back Dice {d:.3f}")
    assert abs(turned - theta) < 1.5  # counter-clockwise about +z, by theta
    assert d > 0.9


def test_rotation_axis_follows_the_image_direction():
    """An obliquely stored image (direction = a proper rotation) is rotated about its own slice normal: the
    voxel arrays are the same as for the axially stored one."""
    image, mask = make_case(radii=(11.0, 5.0, 8.0))
    a = math.radians(30.0)
    d = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]) @ \
        np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    oblique_i, oblique_m = sitk.Image(image), sitk.Image(mask)
    for img in (oblique_i, oblique_m):
        img.SetDirection([float(v) for v in d.ravel()])
    p = Perturbation("RT", rotation_deg=7.0, translation_vox=(0.4, -0.3, 0.2), volume_change=0.05)
    ax_i, ax_m = perturb_case(image, mask, 1, p, case_rng("d", 0))
    ob_i, ob_m = perturb_case(oblique_i, oblique_m, 1, p, case_rng("d", 0))
    assert np.array_equal(arr(ax_m), arr(ob_m))
    assert np.allclose(arr(ax_i), arr(ob_i), atol=1e-3)
    assert ob_i.GetDirection() == oblique_i.GetDirection()


def _blob(image) -> sitk.Image:
    """A smooth Gaussian blob (sigma 4 mm) on the image's grid, centred near the lesion, zero far out."""
    z, y, x = np.indices(arr(image).shape).astype(float)
    sp = image.GetSpacing()
    r2 = ((x - 19.8) * sp[0]) ** 2 + ((y - 19.3) * sp[1]) ** 2 + ((z - 9.6) * sp[2]) ** 2
    blob = sitk.GetImageFromArray(100.0 * np.exp(-r2 / (2 * 4.0 ** 2)))
    blob.CopyInformation(image)
    return blob


def _weighted_centroid(image_arr: np.ndarray) -> np.ndarray:
    idx = np.indices(image_arr.shape).reshape(3, -1).astype(float)
    return (idx @ image_arr.ravel() / image_arr.sum())[::-1]


def test_translation_moves_content_by_the_requested_distance():
    image, mask = make_case()
    t_vox = (0.3, -0.45, 0.25)  # sub-voxel
    p = Perturbation("T", translation_vox=t_vox)
    assert np.allclose(p.translation_mm(SPACING), np.array(t_vox) * SPACING)
    blob = _blob(image)
    moved_b, _ = perturb_case(blob, mask, 1, p, case_rng("t", 0))
    got = _weighted_centroid(arr(moved_b)) - _weighted_centroid(arr(blob))
    print(f"translation {t_vox} voxel: image content moved {got.round(4)} voxel")
    assert np.allclose(got, t_vox, atol=0.02)  # linear interpolation moves the first moment exactly
    moved_i, moved_m = perturb_case(image, mask, 1, p, case_rng("t", 0))
    # A 0/1 mask re-discretised on its own grid cannot move by less than half a voxel: the contour stays
    # (the image moves under it); its centroid moves by less than half a voxel per axis.
    m_shift = centroid_vox(arr(moved_m) == 1) - centroid_vox(arr(mask) == 1)
    assert np.all(np.abs(m_shift - t_vox) < 0.5), m_shift
    # Whole-voxel part: mask and image move exactly.
    p2 = Perturbation("T", translation_vox=(2.0, -1.0, 1.0))
    moved_i, moved_m = perturb_case(image, mask, 1, p2, case_rng("t", 1))
    assert np.allclose(centroid_vox(arr(moved_m) == 1) - centroid_vox(arr(mask) == 1), [2.0, -1.0, 1.0])
    assert np.allclose(arr(moved_i)[3:-3, 3:-3, 3:-3], arr(image)[2:-4, 4:-2, 1:-5], atol=1e-4)


def test_noise_level_is_the_requested_fraction_of_the_roi_sd():
    image, mask = make_case()
    roi = arr(mask) == 1
    sd_roi = roi_robust_sd(image, mask, 1)
    for frac in (0.05, 0.2):
        out_i, out_m = perturb_case(image, mask, 1, Perturbation("N", noise_sd_fraction=frac), case_rng("n", 0))
        assert np.array_equal(arr(out_m), arr(mask))  # noise leaves the mask alone
        diff = arr(out_i).astype(float) - arr(image)
        got, want = diff[roi].std(), frac * sd_roi
        print(f"noise {frac}: SD in ROI {got:.4f}, requested {want:.4f} (ROI robust SD {sd_roi:.2f}); "
              f"whole image SD {diff.std():.4f}, mean {diff.mean():+.4f}")
        assert abs(got - want) <= 0.15 * want
        assert abs(diff.std() - want) <= 0.03 * want and abs(diff.mean()) < 0.01 * want
    # integer images stay integer (rounded, like a rescan)
    image16, mask16 = make_case(dtype=np.int16)
    out16, _ = perturb_case(image16, mask16, 1, Perturbation("N", noise_sd_fraction=0.2), case_rng("n", 0))
    assert out16.GetPixelID() == sitk.sitkInt16


@pytest.mark.parametrize("resampled", [False, True])
def test_cropped_extraction_block_equals_perturbing_the_whole_image(resampled):
    """What extraction perturbs (only the block it keeps) equals perturb_case on the whole image, cropped."""
    image, mask = make_case(radii=(7.0, 5.0, 6.0), size=(48, 44, 20))
    settings = {"padDistance": 5}
    if resampled:
        settings.update({"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkLinear"})
    plan = crop_plan({"Original": {}, "LoG": {"sigma": [1.0]}}, settings, image.GetSpacing())
    assert plan.crop_mask is not resampled
    for p in perturbations(5, 4)[1:] + [Perturbation("V", volume_change=0.1, rotation_deg=-9.0)]:
        part_i, part_m = _perturbed_inputs(image, mask, 1, p, case_rng("x", 1), plan)
        full_i, full_m = perturb_case(image, mask, 1, p, case_rng("x", 1))
        ref_i, ref_m = crop_to_margin(full_i, full_m, 1, plan)
        assert part_i.GetSize() == ref_i.GetSize() and part_i.GetOrigin() == pytest.approx(ref_i.GetOrigin())
        assert np.allclose(arr(part_i), arr(ref_i), rtol=0, atol=1e-4)
        assert part_m.GetSize() == ref_m.GetSize()
        assert np.array_equal(arr(part_m) == 1, arr(ref_m) == 1)


def test_shared_mr_case_cropped_perturbation_equals_whole_image():
    """breast1 (MR, int16) with the shipped MR parameters (normalization, 1 mm resampling, LoG): features of the
    cropped perturbation path equal pyradiomics on the whole perturbed image; the identity is extract_case."""
    from radiomics import imageoperations

    data = shared_path("pyradiomics-cases")
    case = Case("breast1", data / "breast1_image.nrrd", data / "breast1_label.nrrd", 1, None, None)
    worker = _make_worker(SHIPPED_PARAMS["mr"])
    t0 = time.perf_counter()
    ps = perturbations(0, 3)
    assert extract_perturbed_case(case, 0, ps[0], 0, worker) == extract_case(case, worker)
    got = extract_perturbed_case(case, 2, ps[2], 0, worker)
    image = imageoperations.normalizeImage(sitk.ReadImage(str(case.image)), **worker.normalize)
    mask = sitk.ReadImage(str(case.mask))
    full_i, full_m = perturb_case(image, mask, 1, ps[2], case_rng(case.key, 2, 0))
    ex = worker.extractor
    plan = crop_plan(ex.enabledImagetypes, ex.settings, image.GetSpacing())
    ref = run_extractor(full_i, full_m, 1, worker, plan.pad_distance)
    worst = max(abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-9) for k in ref)
    print(f"breast1 perturbation 2 ({ps[2]}): {len(got)} features, max rel deviation cropped vs whole "
          f"{worst:.1e}, {time.perf_counter() - t0:.1f} s")
    assert set(got) == set(ref) and worst < 1e-6
    assert np.isfinite(list(got.values())).all()


# ----------------------------------------------------------------------------------------------- table + ICC


def icc_1_1(df: pd.DataFrame, feature: str) -> float:
    """ICC(1,1) from a one-way ANOVA (Shrout & Fleiss case 1) on the cases x perturbations table."""
    cube = df.pivot(index="case_id", columns="perturbation", values=feature).to_numpy(dtype=float)
    n, k = cube.shape
    means = cube.mean(axis=1)
    msb = k * ((means - cube.mean()) ** 2).sum() / (n - 1)
    msw = ((cube - means[:, None]) ** 2).sum() / (n * (k - 1))
    return (msb - msw) / (msb + (k - 1) * msw)


def test_extract_perturbed_table_errors_cache_and_icc(tmp_path):
    rows = []
    for i, scale in enumerate([1.0, 1.3, 1.6]):  # same texture statistics, clearly different sizes
        image, mask = make_case(seed=i, radii=(8.0 * scale, 6.0 * scale, 8.0 * scale))
        sitk.WriteImage(image, str(tmp_path / f"c{i}_image.nrrd"))
        sitk.WriteImage(mask, str(tmp_path / f"c{i}_mask.nrrd"))
        rows.append({"case_id": f"c{i}", "image": f"c{i}_image.nrrd", "mask": f"c{i}_mask.nrrd", "age": 50 + i})
    rows.insert(1, {"case_id": "bad", "image": "c0_image.nrrd", "mask": "missing.nrrd", "age": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    params = {"setting": {"binWidth": 10, "label": 1, "additionalInfo": False}, "imageType": {"Original": {}},
              "featureClass": {"shape": None, "firstorder": None, "glcm": None, "glszm": None}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "perturbed.csv"
    t0 = time.perf_counter()
    res = extract_perturbed(tmp_path / "manifest.csv", params=tmp_path / "params.yaml", out=out,
                            n_perturbations=3, seed=0, jobs=2, cache_dir=tmp_path / "cache")
    print(res.summary(), f"({time.perf_counter() - t0:.1f} s)")
    df = pd.read_csv(out, float_precision="round_trip")
    assert len(df) == 9 and list(df.columns[:2]) == ["case_id", "perturbation"]
    assert "age" not in df.columns and "bad" not in set(df.case_id)
    assert sorted(df.groupby("case_id").perturbation.apply(list).tolist()) == [[0, 1, 2]] * 3
    feats = [c for c in df.columns if c.startswith("original_")]
    assert len(feats) > 50 and np.isfinite(df[feats].to_numpy()).all()
    errors = pd.read_csv(res.errors_file)
    assert errors.case_id.tolist() == ["bad"] and errors.status.tolist() == ["failed"]
    assert "missing.nrrd" in errors.reason[0]
    assert (res.n_ok, res.n_failed, res.n_cases) == (3, 1, 4)
    # perturbation 0 is exactly what `fedrad site extract` gives
    worker = _make_worker(tmp_path / "params.yaml")
    ref = extract_case(Case("c1", tmp_path / "c1_image.nrrd", tmp_path / "c1_mask.nrrd", 1, None, None), worker)
    row0 = df[(df.case_id == "c1") & (df.perturbation == 0)].iloc[0]
    assert all(row0[k] == ref[k] for k in feats)
    # perturbed rows differ, volume follows the design
    ps = perturbations(0, 3)
    for i in (1, 2):
        ratio = df[df.perturbation == i].original_shape_VoxelVolume.to_numpy() / \
            df[df.perturbation == 0].original_shape_VoxelVolume.to_numpy()
        assert np.allclose(ratio, 1 + ps[i].volume_change, atol=0.01), (ratio, ps[i])
    # re-run: everything from the cache, same table
    again = extract_perturbed(tmp_path / "manifest.csv", params=tmp_path / "params.yaml",
                              out=tmp_path / "again.parquet", n_perturbations=3, seed=0, jobs=2,
                              cache_dir=tmp_path / "cache")
    assert again.n_cached == 9 and again.n_ok == 3
    df2 = pd.read_parquet(tmp_path / "again.parquet")
    assert np.array_equal(df2[feats].to_numpy(), df[feats].to_numpy())
    # ICC(1,1): size features are robust (between-case size differences >> +-10 % volume changes); texture
    # features of lesions with the same texture statistics are dominated by the perturbations (noise raises
    # GLCM contrast), so their ICC is low.
    icc = {f: icc_1_1(df, f) for f in feats}
    for f in ("original_shape_MeshVolume", "original_shape_VoxelVolume", "original_shape_MajorAxisLength",
              "original_glcm_Contrast", "original_glcm_JointEntropy", "original_firstorder_Kurtosis"):
        print(f"ICC(1,1) {f}: {icc[f]:.3f}")
    assert icc["original_shape_MeshVolume"] > 0.9 and icc["original_shape_VoxelVolume"] > 0.9
    assert icc["original_glcm_Contrast"] < 0.5
