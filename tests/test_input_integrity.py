"""Inputs that used to be read silently wrong or hang: truncated NIfTI (zero-filled by SimpleITK), truncated
DICOM slices (skipped by GDCM), NaN/inf voxels, ``/dev/zero`` and FIFOs as image paths, oversized files."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fedrad.client.extract import _make_worker, SHIPPED_PARAMS, case_cache_key, extract_case, extract_manifest
from fedrad.client.imaging import MAX_INPUT_GB_ENV, ImagingError, read_image, read_mask
from fedrad.client.manifest import check_manifest, read_manifest
from tests.test_site_cli import _lesion


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _cut(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture()
def cohort(tmp_path):
    """Two good cases, and one case for each kind of bad input, in one manifest."""
    d = tmp_path / "site"
    d.mkdir()
    rows = []

    def add(case_id, image, mask):
        rows.append({"case_id": case_id, "image": image, "mask": mask, "age": 60})

    for i in range(2):
        im, mk = _lesion(i)
        sitk.WriteImage(im, str(d / f"good{i}.nii.gz"))
        sitk.WriteImage(mk, str(d / f"good{i}_mask.nii.gz"))
        add(f"good{i}", f"good{i}.nii.gz", f"good{i}_mask.nii.gz")
    im, mk = _lesion(5)
    sitk.WriteImage(im, str(d / "cut.nii.gz"))
    _cut(d / "cut.nii.gz", 0.7)  # gzip stream cut short: SimpleITK zero-fills the rest
    add("truncated_gz", "cut.nii.gz", "good0_mask.nii.gz")
    sitk.WriteImage(im, str(d / "cut.nii"))
    _cut(d / "cut.nii", 0.9)  # uncompressed: file shorter than the header's voxel data
    add("truncated_nii", "cut.nii", "good0_mask.nii.gz")
    sitk.WriteImage(mk, str(d / "cut_mask.nii.gz"))
    (d / "cut_mask.nii.gz").write_bytes((d / "cut_mask.nii.gz").read_bytes()[:-6])  # CRC/length trailer gone
    add("truncated_mask", "good0.nii.gz", "cut_mask.nii.gz")
    nan = sitk.Cast(im, sitk.sitkFloat32)
    nan[16, 16, 12] = float("nan")  # the lesion's centre
    sitk.WriteImage(nan, str(d / "nan_inside.nii.gz"))
    add("nan_inside", "nan_inside.nii.gz", "good0_mask.nii.gz")
    near = sitk.Cast(im, sitk.sitkFloat32)
    near[16, 8, 12] = float("inf")  # outside the lesion, inside the crop margin
    sitk.WriteImage(near, str(d / "inf_near.nii.gz"))
    add("inf_near", "inf_near.nii.gz", "good0_mask.nii.gz")
    add("dev_zero", "/dev/zero", "good0_mask.nii.gz")
    os.mkfifo(d / "pipe.nii.gz")
    add("fifo", "pipe.nii.gz", "good0_mask.nii.gz")
    add("fifo_mask", "good0.nii.gz", "pipe.nii.gz")
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    return d / "manifest.csv"


FAILED = {"truncated_gz": ("cut.nii.gz", "truncated"), "truncated_nii": ("cut.nii", "truncated"),
          "truncated_mask": ("cut_mask.nii.gz", "truncated"), "nan_inside": ("nan_inside.nii.gz", "inside mask"),
          "inf_near": ("inf_near.nii.gz", "in the block pyradiomics uses"), "dev_zero": ("/dev/zero", "character device"),
          "fifo": ("pipe.nii.gz", "named pipe"), "fifo_mask": ("pipe.nii.gz", "named pipe")}


def test_bad_inputs_fail_their_case_and_the_batch_goes_on(cohort, tmp_path):
    out = tmp_path / "features.csv"
    start = time.perf_counter()
    with deadline(300):
        res = extract_manifest(cohort, params="ct-original", out=out, jobs=2, cache_dir=tmp_path / "cache")
    print(f"extract of {res.n_cases} cases: {time.perf_counter() - start:.1f} s")
    assert sorted(pd.read_csv(out).case_id) == ["good0", "good1"]
    errors = pd.read_csv(tmp_path / "features.errors.csv")
    assert sorted(errors.case_id) == sorted(FAILED) and set(errors.status) == {"failed"}
    for case_id, (name, text) in FAILED.items():
        reason = errors.loc[errors.case_id == case_id, "reason"].item()
        assert name in reason and text in reason and "\n" not in reason, (case_id, reason)


def test_site_check_reports_them_without_hanging(cohort):
    start = time.perf_counter()
    with deadline(60):
        report = check_manifest(cohort)
    elapsed = time.perf_counter() - start
    errors = {(p.case_id, p.column): p.message for p in report.problems if p.severity == "error"}
    assert {case for case, _ in errors} == set(FAILED) - {"inf_near"}
    assert "truncated" in errors["truncated_gz", "image"] and "truncated" in errors["truncated_mask", "mask"]
    assert "character device" in errors["dev_zero", "image"] and "named pipe" in errors["fifo_mask", "mask"]
    assert "inside mask label 1" in errors["nan_inside", "image"]
    warnings = [p for p in report.problems if p.severity == "warning"]
    assert [(p.case_id, p.column) for p in warnings] == [("inf_near", "image")]
    assert "1 NaN/inf voxel(s) outside the mask" in warnings[0].message
    print(f"site check of {report.n_cases} cases: {elapsed:.2f} s")


def test_site_check_cli_on_dev_zero_and_fifo(cohort):
    """The installed `fedrad site check` as an operator runs it; a hang would hit the timeout."""
    exe = os.path.join(os.path.dirname(sys.executable), "fedrad")
    df = pd.read_csv(cohort)
    df[df.case_id.isin(["good0", "dev_zero", "fifo", "fifo_mask"])].to_csv(cohort.parent / "m.csv", index=False)
    proc = subprocess.run([exe, "site", "check", str(cohort.parent / "m.csv")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "4 rows checked, 1 usable, 3 unusable" in proc.stdout
    assert "/dev/zero: image path is a character device" in proc.stdout
    assert proc.stdout.count("named pipe (FIFO)") == 2


def test_dev_zero_and_fifo_are_refused_at_once(cohort):
    manifest = read_manifest(cohort)
    cases = {c.case_id: c for c in manifest.cases}
    for path in ("/dev/zero", cohort.parent / "pipe.nii.gz"):
        start = time.perf_counter()
        with deadline(10), pytest.raises(ImagingError, match="not a regular file"):
            read_image(path)
        with deadline(10), pytest.raises(ImagingError, match="not a regular file"):
            read_mask(path, sitk.Image(4, 4, 4, sitk.sitkUInt8))
        assert time.perf_counter() - start < 1
    for case_id in ("dev_zero", "fifo", "fifo_mask"):
        start = time.perf_counter()
        with deadline(10):
            assert case_cache_key(cases[case_id], "p") is None
        assert time.perf_counter() - start < 1
    assert case_cache_key(cases["good0"], "p") is not None


def test_size_limit_is_configurable(cohort, monkeypatch):
    path = cohort.parent / "good0.nii.gz"
    assert read_image(path).GetSize() == (32, 32, 24)
    monkeypatch.setenv(MAX_INPUT_GB_ENV, str(1000 / 2**30))  # 1000 bytes: the file is bigger
    with pytest.raises(ImagingError, match=f"more than the 0.00 GiB limit; set {MAX_INPUT_GB_ENV}"):
        read_image(path)
    sitk.WriteImage(sitk.Image(64, 64, 64, sitk.sitkUInt8), str(cohort.parent / "zeros.nii.gz"))
    assert (cohort.parent / "zeros.nii.gz").stat().st_size < 1000  # compresses to little: the bomb case
    with pytest.raises(ImagingError, match="decompressed image holds"):
        read_image(cohort.parent / "zeros.nii.gz")
    monkeypatch.setenv(MAX_INPUT_GB_ENV, "lots")
    with pytest.raises(ImagingError, match="is not a positive number of GiB"):
        read_image(path)


def test_intact_files_still_read_the_same(cohort):
    """The checks refuse nothing intact: every format and the gzip trailer cut by one byte."""
    d = cohort.parent
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "good0.nii.gz")))
    for ext in (".nii", ".nrrd", ".mha"):
        sitk.WriteImage(sitk.ReadImage(str(d / "good0.nii.gz")), str(d / f"copy{ext}"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(d / f"copy{ext}")), want)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(d / "good0.nii.gz")), want)
    (d / "one.nii.gz").write_bytes((d / "good0.nii.gz").read_bytes()[:-1])
    with pytest.raises(ImagingError, match=r"one.nii.gz: image file is truncated or corrupt \(gzip"):
        read_image(d / "one.nii.gz")


def test_nan_outside_the_block_pyradiomics_uses_changes_nothing(cohort):
    """A NaN far from the lesion (outside the crop block) is allowed, and the features are those of the
    same image without it; inside the mask it is refused."""
    d = cohort.parent
    case = read_manifest(cohort).cases[0]
    worker = _make_worker(SHIPPED_PARAMS["ct-original"])
    image = sitk.Cast(sitk.ReadImage(str(d / "good0.nii.gz")), sitk.sitkFloat32)
    sitk.WriteImage(image, str(d / "float.nii.gz"))
    image[0, 0, 0] = float("nan")
    sitk.WriteImage(image, str(d / "far.nii.gz"))
    from dataclasses import replace

    want = extract_case(replace(case, image=d / "float.nii.gz"), worker)
    got = extract_case(replace(case, image=d / "far.nii.gz"), worker)
    assert got == want and all(np.isfinite(list(got.values())))
    image[16, 16, 12] = float("-inf")
    sitk.WriteImage(image, str(d / "both.nii.gz"))
    from fedrad.client.extract import ExtractionError

    with pytest.raises(ExtractionError, match="1 NaN/inf voxel\\(s\\) inside mask label 1"):
        extract_case(replace(case, image=d / "both.nii.gz"), worker)


@pytest.fixture()
def dicom_series(tmp_path):
    from tests.conftest import shared_path

    src = shared_path("ibsi", "ct_radiomics_phantom", "dicom", "image")
    dst = tmp_path / "series"
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_truncated_dicom_slice_is_refused_not_skipped(dicom_series):
    assert read_image(dicom_series).GetSize()[2] == 60
    victim = sorted(dicom_series.iterdir())[29]
    _cut(victim, 0.75)  # GDCM silently leaves this slice out: the volume would have 59 slices
    with pytest.raises(ImagingError, match=f"{victim.name}: DICOM file of the image series was skipped"):
        read_image(dicom_series)
    os.mkfifo(dicom_series / "pipe")
    with deadline(10), pytest.raises(ImagingError, match="pipe: image directory entry path is a named pipe"):
        read_image(dicom_series)
