"""Tests for fedrad.client.imaging on the IBSI CT radiomics phantom (shared data, CC BY-NC, tests only)."""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from fedrad.client.imaging import FRAME_OF_REFERENCE_KEY, ImagingError, mask_kind, read_image, read_mask

IBSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ibsi"
PHANTOM = IBSI / "ct_radiomics_phantom"
RTSTRUCT = PHANTOM / "dicom" / "mask" / "DCM_RS_00060.dcm"
NIFTI_MASK = PHANTOM / "nifti" / "mask" / "mask.nii.gz"


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of the non-zero voxels of two images of the same size."""
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    return 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> None:
    """Assert equal size, and spacing/origin/direction within ``tol``."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


@pytest.fixture(scope="module")
def phantom() -> Path:
    if not IBSI.is_dir():
        pytest.skip("../shared/data/ibsi not found: shared test data absent")
    return PHANTOM


@pytest.fixture(scope="module")
def image(phantom: Path) -> sitk.Image:
    return read_image(phantom / "dicom" / "image")


@pytest.fixture(scope="module")
def nifti_mask(phantom: Path) -> sitk.Image:
    return sitk.ReadImage(str(NIFTI_MASK))


@pytest.fixture(scope="module")
def seg_file(phantom: Path, nifti_mask: sitk.Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DICOM SEG with one segment "GTV" built from the phantom series and its NIfTI mask."""
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in (phantom / "dicom" / "image").glob("*.dcm")]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # the NIfTI mask's slice order
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="GTV",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the phantom's single-component PatientName
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=sitk.GetArrayFromImage(nifti_mask) > 0,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=100,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="fedrad",
            manufacturer_model_name="test",
            software_versions="0",
            device_serial_number="0",
        )
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    seg.save_as(path)
    return path


def test_read_image_dicom_series_matches_nifti_geometry(image: sitk.Image, nifti_mask: sitk.Image) -> None:
    assert image.GetSize()[2] == 60
    assert_same_geometry(image, nifti_mask)
    assert image.HasMetaDataKey(FRAME_OF_REFERENCE_KEY)


def test_rtstruct_dice_geometry_and_timing(phantom: Path, nifti_mask: sitk.Image) -> None:
    start = time.perf_counter()
    image = read_image(phantom / "dicom" / "image")
    mask = read_mask(RTSTRUCT, image, roi="GTV-1")
    elapsed = time.perf_counter() - start
    value = dice(mask, nifti_mask)
    print(f"RTSTRUCT GTV-1: Dice {value:.4f} vs NIfTI mask; series + RTSTRUCT read in {elapsed:.2f} s")
    assert value >= 0.95
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1}
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()
    assert elapsed < 10


def test_rtstruct_roi_name_is_case_insensitive_and_directory_works(
    phantom: Path, image: sitk.Image, nifti_mask: sitk.Image
) -> None:
    mask = read_mask(phantom / "dicom" / "mask", image, roi="gtv-1")
    assert dice(mask, nifti_mask) >= 0.95


def test_rtstruct_wrong_or_missing_roi_lists_names(image: sitk.Image) -> None:
    with pytest.raises(ImagingError, match="GTV-1") as wrong:
        read_mask(RTSTRUCT, image, roi="GTV-2")
    assert str(RTSTRUCT) in str(wrong.value)
    with pytest.raises(ImagingError, match=r"roi=.*GTV-1"):
        read_mask(RTSTRUCT, image)


def test_rtstruct_contours_found_by_roi_number_not_position(
    tmp_path: Path, image: sitk.Image, nifti_mask: sitk.Image
) -> None:
    """ROI "Decoy" (one GTV contour) listed first in StructureSetROISequence but last in ROIContourSequence."""
    dataset = pydicom.dcmread(RTSTRUCT)
    decoy = copy.deepcopy(dataset.StructureSetROISequence[0])
    decoy.ROINumber, decoy.ROIName = 2, "Decoy"
    dataset.StructureSetROISequence.insert(0, decoy)
    decoy_contours = copy.deepcopy(dataset.ROIContourSequence[0])
    decoy_contours.ReferencedROINumber = 2
    decoy_contours.ContourSequence = decoy_contours.ContourSequence[:1]
    dataset.ROIContourSequence.append(decoy_contours)
    path = tmp_path / "two_rois.dcm"
    dataset.save_as(path)
    assert dice(read_mask(path, image, roi="GTV-1"), nifti_mask) >= 0.95
    decoy_mask = sitk.GetArrayFromImage(read_mask(path, image, roi="Decoy"))  # a copy: the image is temporary
    assert np.count_nonzero(decoy_mask.any(axis=(1, 2))) == 1


def test_rtstruct_on_another_image_is_refused(image: sitk.Image) -> None:
    other_frame = sitk.Image(image)
    other_frame.SetMetaData(FRAME_OF_REFERENCE_KEY, "1.2.3.4")
    with pytest.raises(ImagingError, match="frame of reference"):
        read_mask(RTSTRUCT, other_frame, roi="GTV-1")
    with pytest.raises(ImagingError, match="does not fit the image grid"):
        read_mask(RTSTRUCT, image[:, :, :10], roi="GTV-1")


def test_seg_round_trip(seg_file: Path, image: sitk.Image, nifti_mask: sitk.Image) -> None:
    mask = read_mask(seg_file, image, roi="GTV")
    value = dice(mask, nifti_mask)
    print(f"SEG GTV round trip: Dice {value:.4f}")
    assert value >= 0.99
    assert_same_geometry(mask, image, tol=0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(nifti_mask) > 0)


def test_seg_segment_selection(seg_file: Path, image: sitk.Image, nifti_mask: sitk.Image) -> None:
    assert dice(read_mask(seg_file, image), nifti_mask) >= 0.99  # single segment taken when roi is None
    assert dice(read_mask(seg_file.parent, image, roi="gtv"), nifti_mask) >= 0.99
    with pytest.raises(ImagingError, match=r"'Tumour' not found.*'GTV'"):
        read_mask(seg_file, image, roi="Tumour")


def test_label_maps_are_read_as_is(tmp_path: Path, image: sitk.Image, nifti_mask: sitk.Image) -> None:
    nrrd = tmp_path / "mask.nrrd"
    sitk.WriteImage(nifti_mask, str(nrrd))
    for path in (NIFTI_MASK, nrrd):
        mask = read_mask(path, image)
        assert mask.GetPixelID() == nifti_mask.GetPixelID()
        assert_same_geometry(mask, nifti_mask, tol=0)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(nifti_mask))


def test_float_label_maps(tmp_path: Path, image: sitk.Image, nifti_mask: sitk.Image) -> None:
    whole = tmp_path / "float.nii.gz"
    sitk.WriteImage(sitk.Cast(nifti_mask, sitk.sitkFloat32), str(whole))
    mask = read_mask(whole, image)
    assert mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(nifti_mask))
    fractional = tmp_path / "fractional.nii.gz"
    sitk.WriteImage(sitk.Cast(nifti_mask, sitk.sitkFloat32) * 0.5, str(fractional))
    with pytest.raises(ImagingError, match="non-integer"):
        read_mask(fractional, image)


def test_missing_and_garbage_files_name_the_path(tmp_path: Path, image: sitk.Image) -> None:
    missing = tmp_path / "absent.nii.gz"
    garbage = tmp_path / "x.nii.gz"
    garbage.write_bytes(os.urandom(4096))
    for path in (missing, garbage):
        for read in (read_image, lambda p: read_mask(p, image)):
            with pytest.raises(ImagingError) as error:
                read(path)
            assert str(path) in str(error.value)
            assert "\n" not in str(error.value)


def test_directory_without_series_or_with_two_rtstructs(tmp_path: Path, phantom: Path) -> None:
    with pytest.raises(ImagingError, match="no DICOM series"):
        read_image(tmp_path)
    shutil.copy(RTSTRUCT, tmp_path / "a.dcm")
    shutil.copy(RTSTRUCT, tmp_path / "b.dcm")
    with pytest.raises(ImagingError, match="several RTSTRUCT/SEG"):
        mask_kind(tmp_path)


def test_mask_kind(tmp_path: Path, phantom: Path, seg_file: Path, nifti_mask: sitk.Image) -> None:
    nrrd = tmp_path / "mask.nrrd"
    sitk.WriteImage(nifti_mask, str(nrrd))
    assert mask_kind(NIFTI_MASK) == "labelmap"
    assert mask_kind(nrrd) == "labelmap"
    assert mask_kind(RTSTRUCT) == "rtstruct"
    assert mask_kind(RTSTRUCT.parent) == "rtstruct"
    assert mask_kind(seg_file) == "seg"
    with pytest.raises(ImagingError, match="no such file"):
        mask_kind(tmp_path / "absent.nrrd")
