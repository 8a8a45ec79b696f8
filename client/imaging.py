"""Read a site's images and masks, whatever their format, into SimpleITK.

Images are any file SimpleITK reads (NIfTI, NRRD, MHA/MHD, ...) or a
directory holding a DICOM series. Masks are label map files, DICOM RTSTRUCT
files (rasterised with med-imagetools on the image grid) or DICOM SEG files
(decoded with highdicom and placed on the image grid). Every failure is
reported as a one-line :class:`ImagingError` naming the offending path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

__all__ = ["FRAME_OF_REFERENCE_KEY", "ImagingError", "mask_kind", "read_image", "read_mask"]

#: DICOM Frame of Reference UID, as SimpleITK names it in image metadata.
FRAME_OF_REFERENCE_KEY = "0020|0052"

_LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
_INTEGER_PIXEL_IDS = frozenset(
    {
        sitk.sitkUInt8,
        sitk.sitkInt8,
        sitk.sitkUInt16,
        sitk.sitkInt16,
        sitk.sitkUInt32,
        sitk.sitkInt32,
        sitk.sitkUInt64,
        sitk.sitkInt64,
    }
)


class ImagingError(ValueError):
    """An image or mask cannot be read; the message names the path and the fix."""


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any exception raised by a third-party reader into an :class:`ImagingError`.

    Parameters
    ----------
    path : Path
        File or directory being read, named in the message.
    what : str
        What was being read, e.g. ``"image"`` or ``"DICOM SEG"``.

    Yields
    ------
    None
        Control to the ``with`` block that calls the reader.

    Raises
    ------
    ImagingError
        Carrying the last line of the original exception text.
    """
    try:
        yield
    except ImagingError:
        raise
    except Exception as exc:  # readers raise many unrelated types
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1].removeprefix("sitk::ERROR: ") if lines else type(exc).__name__
        raise ImagingError(
            f"{path}: cannot read {what} ({reason}); check the file is complete and in a supported format"
        ) from exc


def _existing(path: str | Path) -> Path:
    """Return ``path`` as a :class:`Path`, or raise if nothing is there.

    Parameters
    ----------
    path : str or Path
        Path given by the caller.

    Returns
    -------
    Path
        The same path.

    Raises
    ------
    ImagingError
        If the path does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise ImagingError(f"{path}: no such file or directory; fix the path in the manifest")
    return path


def read_image(path: str | Path) -> sitk.Image:
    """Read an image file or a DICOM series directory.

    Parameters
    ----------
    path : str or Path
        A file SimpleITK reads (NIfTI ``.nii``/``.nii.gz``, NRRD, MHA/MHD, ...)
        or a directory directly holding a DICOM series. When the directory
        holds several series, the one with the most slices is read; slices are
        sorted by GDCM.

    Returns
    -------
    SimpleITK.Image
        The image. For a DICOM series its metadata carries the Frame of
        Reference UID under :data:`FRAME_OF_REFERENCE_KEY`, which
        :func:`read_mask` uses to detect masks drawn on another image.

    Raises
    ------
    ImagingError
        If the path is missing, unreadable, or a directory without a DICOM series.
    """
    path = _existing(path)
    if not path.is_dir():
        with _reading(path, "image"):
            return sitk.ReadImage(str(path))
    with _reading(path, "DICOM series"):
        series = [
            sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        ]
        if not series:
            raise ImagingError(
                f"{path}: no DICOM series directly in this directory; point to the folder holding the image files"
            )
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(max(series, key=len))
        reader.MetaDataDictionaryArrayUpdateOn()
        image = reader.Execute()
    if reader.HasMetaDataKey(0, FRAME_OF_REFERENCE_KEY):
        image.SetMetaData(FRAME_OF_REFERENCE_KEY, reader.GetMetaData(0, FRAME_OF_REFERENCE_KEY).strip(" \x00"))
    return image


def _dicom_kind(path: Path) -> str:
    """Classify one file from its DICOM header, without reading pixels.

    Parameters
    ----------
    path : Path
        A file.

    Returns
    -------
    str
        ``"rtstruct"``, ``"seg"``, or ``"labelmap"`` for anything else
        (including files that are not DICOM).
    """
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except (InvalidDicomError, OSError):
        return "labelmap"
    sop_class = str(header.get("SOPClassUID", ""))
    modality = str(header.get("Modality", ""))
    if sop_class == RTStructureSetStorage or modality == "RTSTRUCT":
        return "rtstruct"
    if sop_class in (SegmentationStorage, _LABEL_MAP_SEGMENTATION_STORAGE) or modality == "SEG":
        return "seg"
    return "labelmap"


def _locate_mask(path: str | Path) -> tuple[Path, str]:
    """Find the file to read for a mask path and the kind of mask it is.

    Parameters
    ----------
    path : str or Path
        A mask file, or a directory holding a single RTSTRUCT/SEG file
        (a directory without one is taken as a DICOM label map series).

    Returns
    -------
    tuple of (Path, str)
        The file (or series directory) to read and its kind.

    Raises
    ------
    ImagingError
        If the path is missing or the directory holds several RTSTRUCT/SEG files.
    """
    path = _existing(path)
    if not path.is_dir():
        return path, _dicom_kind(path)
    files = [file for file in sorted(path.iterdir()) if file.is_file() and not file.name.startswith(".")]
    kinds = {file: _dicom_kind(file) for file in files}
    found = [(file, kind) for file, kind in kinds.items() if kind != "labelmap"]
    if len(found) > 1:
        names = [file.name for file, _ in found]
        raise ImagingError(f"{path}: several RTSTRUCT/SEG files {names}; point to one of them")
    return found[0] if found else (path, "labelmap")


def mask_kind(path: str | Path) -> str:
    """Tell which kind of mask a path holds, from DICOM headers only.

    Parameters
    ----------
    path : str or Path
        A mask file, or a directory holding a single RTSTRUCT/SEG file.

    Returns
    -------
    str
        ``"rtstruct"`` or ``"seg"`` for DICOM RT Structure Set or Segmentation
        objects, ``"labelmap"`` for anything else.

    Raises
    ------
    ImagingError
        If the path is missing or the directory holds several RTSTRUCT/SEG files.
    """
    return _locate_mask(path)[1]


def _pick(wanted: str, available: list[str], what: str, path: Path) -> int:
    """Find a name in a list: exactly first, then ignoring case (no patterns).

    Parameters
    ----------
    wanted : str
        Name asked for.
    available : list of str
        Names present in the file.
    what : str
        ``"ROI"`` or ``"segment"``, for the message.
    path : Path
        File named in the message.

    Returns
    -------
    int
        Index of the single matching name in ``available``.

    Raises
    ------
    ImagingError
        If no name, or several names, match.
    """
    matches = [i for i, name in enumerate(available) if name == wanted] or [
        i for i, name in enumerate(available) if name.casefold() == wanted.casefold()
    ]
    if not matches:
        raise ImagingError(f"{path}: {what} {wanted!r} not found; available: {available}")
    if len(matches) > 1:
        raise ImagingError(
            f"{path}: {what} {wanted!r} matches {len(matches)} {what}s; rename them so the name is unique"
        )
    return matches[0]


def _check_frame_of_reference(path: Path, uid: str | None, reference: sitk.Image) -> None:
    """Raise if a mask's Frame of Reference UID differs from the image's (when both are known).

    Parameters
    ----------
    path : Path
        Mask file named in the message.
    uid : str or None
        The mask's Frame of Reference UID, if it has one.
    reference : SimpleITK.Image
        Image from :func:`read_image`.

    Raises
    ------
    ImagingError
        If both UIDs are known and differ.
    """
    if uid and reference.HasMetaDataKey(FRAME_OF_REFERENCE_KEY):
        image_uid = reference.GetMetaData(FRAME_OF_REFERENCE_KEY)
        if str(uid) != image_uid:
            raise ImagingError(
                f"{path}: frame of reference {uid} differs from the image's {image_uid}; "
                "pair the mask with the image it was drawn on"
            )


def _read_labelmap(path: Path) -> sitk.Image:
    """Read a label map as-is, casting whole-valued float maps to integers.

    Parameters
    ----------
    path : Path
        Label map file or DICOM series directory.

    Returns
    -------
    SimpleITK.Image
        Integer label image.

    Raises
    ------
    ImagingError
        If unreadable, multi-component, or holding non-integer values.
    """
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImagingError(f"{path}: label map has vector pixels; save one label per voxel")
    if image.GetPixelID() in _INTEGER_PIXEL_IDS:
        return image
    values = sitk.GetArrayViewFromImage(image)
    if not np.array_equal(values, np.round(values)):
        raise ImagingError(f"{path}: label map holds non-integer values; save it with integer labels")
    fits_uint8 = values.size == 0 or (values.min() >= 0 and values.max() <= 255)
    return sitk.Cast(image, sitk.sitkUInt8 if fits_uint8 else sitk.sitkInt32)


def _read_rtstruct(path: Path, reference: sitk.Image, roi: str | None) -> sitk.Image:
    """Rasterise one RTSTRUCT ROI on the reference image grid with med-imagetools.

    Contours are looked up through ``ReferencedROINumber`` (not by position,
    as ``RTStructureSet.from_dicom`` does) and handed to
    ``RTStructureSet.get_mask_ndarray``, which fills each closed planar
    contour on the slice it lies in.

    Parameters
    ----------
    path : Path
        RTSTRUCT file.
    reference : SimpleITK.Image
        Image defining the output grid.
    roi : str or None
        ROI name; required.

    Returns
    -------
    SimpleITK.Image
        UInt8 mask, 1 inside the ROI, with the reference's geometry.

    Raises
    ------
    ImagingError
        If unreadable, the ROI is missing or not given, has no closed planar
        contours, or does not fit the reference grid.
    """
    # Imported here: imgtools takes about a second to import and configures
    # structlog and its own "imgtools" logger on import.
    from imgtools.coretypes import MedImage, RTStructureSet
    from imgtools.coretypes.masktypes import (
        ContourPointsAcrossSlicesError,
        MaskArrayOutOfBoundsError,
        NonIntegerZSliceIndexError,
        UnexpectedContourPointsError,
    )

    with _reading(path, "RTSTRUCT"):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        rois = list(dataset.StructureSetROISequence)
    names = [str(item.get("ROIName", "")) for item in rois]
    if roi is None:
        raise ImagingError(f"{path}: RTSTRUCT needs an ROI name (roi=...); available: {names}")
    index = _pick(roi, names, "ROI", path)
    chosen, name = rois[index], names[index]
    _check_frame_of_reference(path, chosen.get("ReferencedFrameOfReferenceUID"), reference)
    contours = [
        contour
        for roi_contour in dataset.get("ROIContourSequence", [])
        if roi_contour.get("ReferencedROINumber") == chosen.get("ROINumber")
        for contour in roi_contour.get("ContourSequence", [])
        if contour.get("ContourGeometricType") == "CLOSED_PLANAR" and "ContourData" in contour
    ]
    if not contours:
        raise ImagingError(f"{path}: ROI {name!r} has no closed planar contours; choose another ROI")
    width, height, depth = reference.GetSize()
    try:
        array = RTStructureSet(metadata={}, roi_map={name: contours}).get_mask_ndarray(
            MedImage(reference), name, (depth, height, width, 1)
        )
    except (
        ContourPointsAcrossSlicesError,
        MaskArrayOutOfBoundsError,
        NonIntegerZSliceIndexError,
        UnexpectedContourPointsError,
    ) as exc:
        raise ImagingError(
            f"{path}: ROI {name!r} does not fit the image grid ({type(exc).__name__}); "
            "pair the RTSTRUCT with the image it was drawn on"
        ) from exc
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(reference)
    return mask


def _read_seg(path: Path, reference: sitk.Image, roi: str | None) -> sitk.Image:
    """Place one DICOM SEG segment on the reference image grid.

    The segment is decoded by highdicom as a volume in patient coordinates
    (fractional segments are thresholded at 0.5) and resampled onto the
    reference grid with nearest-neighbour interpolation, which is exact when
    the SEG was made on the reference series.

    Parameters
    ----------
    path : Path
        DICOM SEG file.
    reference : SimpleITK.Image
        Image defining the output grid.
    roi : str or None
        Segment label; may be None when the SEG holds a single segment.

    Returns
    -------
    SimpleITK.Image
        UInt8 mask, 1 inside the segment, with the reference's geometry.

    Raises
    ------
    ImagingError
        If unreadable, the segment is missing or ambiguous, or the segment
        lies outside the reference image.
    """
    with _reading(path, "DICOM SEG"):
        seg = hd.seg.segread(path)
        numbers = list(seg.segment_numbers)
        labels = [seg.get_segment_description(number).segment_label for number in numbers]
    if roi is None and len(numbers) != 1:
        raise ImagingError(f"{path}: SEG holds {len(numbers)} segments; pass roi= one of {labels}")
    number = numbers[0 if roi is None else _pick(roi, labels, "segment", path)]
    _check_frame_of_reference(path, seg.get("FrameOfReferenceUID"), reference)
    with _reading(path, "DICOM SEG pixels"):
        volume = seg.get_volume(segment_numbers=[number], dtype=np.float32)
    inside = (volume.array[..., 0] >= 0.5).astype(np.uint8)
    segment = sitk.GetImageFromArray(inside)
    segment.SetSpacing([float(s) for s in volume.spacing[::-1]])
    segment.SetOrigin([float(p) for p in volume.position])
    segment.SetDirection([float(d) for d in volume.direction[:, ::-1].ravel()])
    mask = sitk.Resample(segment, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if inside.any() and not sitk.GetArrayViewFromImage(mask).any():
        raise ImagingError(
            f"{path}: segment {labels[numbers.index(number)]!r} lies outside the image; "
            "pair the SEG with the image it was made on"
        )
    return mask


def read_mask(path: str | Path, reference: sitk.Image, *, roi: str | None = None) -> sitk.Image:
    """Read a mask as an integer label image.

    Parameters
    ----------
    path : str or Path
        A label map file (or DICOM label map series directory), a DICOM
        RTSTRUCT file, a DICOM SEG file, or a directory holding a single
        RTSTRUCT/SEG file.
    reference : SimpleITK.Image
        The image the mask belongs to, as returned by :func:`read_image`.
        RTSTRUCT and SEG masks are built on its grid.
    roi : str, optional
        RTSTRUCT ROI name (required) or SEG segment label (optional when the
        SEG holds one segment); ignored for label maps. Matched exactly, then
        ignoring case.

    Returns
    -------
    SimpleITK.Image
        Label maps as read (integer pixel type; whole-valued float maps cast
        to UInt8 or Int32). RTSTRUCT/SEG: UInt8, 1 inside the ROI, 0 outside,
        with exactly the reference's size, spacing, origin and direction.

    Raises
    ------
    ImagingError
        If the mask is missing or unreadable, the ROI/segment is not given
        when needed or not found (the message lists the available names), or
        the mask's frame of reference or extent does not match the reference.
    """
    path, kind = _locate_mask(path)
    if kind == "labelmap":
        return _read_labelmap(path)
    if reference.GetDimension() != 3:
        raise ImagingError(f"{path}: {kind.upper()} masks need a 3-D reference image")
    if kind == "rtstruct":
        return _read_rtstruct(path, reference, roi)
    return _read_seg(path, reference, roi)
