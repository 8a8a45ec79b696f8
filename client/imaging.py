"""Read a site's images and masks, whatever their format, into SimpleITK.

Images are any file SimpleITK reads (NIfTI, NRRD, MHA/MHD, ...) or a
directory holding a DICOM series. Masks are label map files, DICOM RTSTRUCT
files (rasterised with med-imagetools on the image grid) or DICOM SEG files
(decoded with highdicom and placed on the image grid). Every failure is
reported as a one-line :class:`ImagingError` naming the offending path.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

__all__ = ["FRAME_OF_REFERENCE_KEY", "ImagingError", "MAX_INPUT_GB_ENV", "check_input", "mask_kind",
           "max_input_bytes", "read_image", "read_mask"]

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


#: Environment variable holding the largest image or mask accepted, in GiB (default
#: :data:`DEFAULT_MAX_INPUT_GB`): a file, the decompressed content of a gzip file, or
#: the regular files of a DICOM directory together.
MAX_INPUT_GB_ENV = "FEDRAD_MAX_INPUT_GB"
DEFAULT_MAX_INPUT_GB = 4.0
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def max_input_bytes() -> int:
    """The size limit for one image or mask, from :data:`MAX_INPUT_GB_ENV`.

    Returns
    -------
    int
        Limit in bytes.

    Raises
    ------
    ImagingError
        If the environment variable is set to something else than a positive number.
    """
    text = os.environ.get(MAX_INPUT_GB_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_INPUT_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ImagingError(f"{MAX_INPUT_GB_ENV}={text!r} is not a positive number of GiB; unset it or write e.g. "
                           f"{MAX_INPUT_GB_ENV}=8")
    return int(value * 2**30)


def _too_big(path: Path, size: int, limit: int, what: str) -> ImagingError:
    return ImagingError(
        f"{path}: {what} holds {size / 2**30:.2f} GiB, more than the {limit / 2**30:.2f} GiB limit; "
        f"set {MAX_INPUT_GB_ENV} to a larger number of GiB if this is really the {what}"
    )


def _not_regular(path: Path, mode: int, what: str) -> ImagingError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return ImagingError(
        f"{path}: {what} path is {kind}, not a regular file; point it to an image file or a DICOM directory"
    )


def check_input(path: str | Path, what: str = "image") -> Path:
    """Refuse anything but a regular file, or a directory of regular files, within the size limit.

    Nothing is opened, so a FIFO or a device (``/dev/zero``) is refused at once
    instead of hanging or streaming forever. Symbolic links are followed. In a
    directory, entries directly inside (what GDCM scans) must be regular files or
    directories; the size limit counts every regular file below it.

    Parameters
    ----------
    path : str or Path
        Image or mask path from the manifest.
    what : str
        ``"image"`` or ``"mask"``, for the message.

    Returns
    -------
    Path
        The same path.

    Raises
    ------
    ImagingError
        If the path is missing, not a regular file or directory, holds a
        non-regular entry, or exceeds :func:`max_input_bytes`.
    """
    path = _existing(path)
    limit = max_input_bytes()
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            size = os.stat(path).st_size
            if size > limit:
                raise _too_big(path, size, limit, what)
            return path
        if not stat.S_ISDIR(mode):
            raise _not_regular(path, mode, what)
        for entry in sorted(path.iterdir()):
            entry_mode = os.stat(entry).st_mode
            if not (stat.S_ISREG(entry_mode) or stat.S_ISDIR(entry_mode)):
                raise _not_regular(entry, entry_mode, f"{what} directory entry")
        total = 0
        for root, _dirs, names in os.walk(path):
            for name in names:
                info = os.stat(os.path.join(root, name), follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
            if total > limit:
                raise _too_big(path, total, limit, f"{what} directory")
    except OSError as exc:
        raise ImagingError(f"{path}: cannot inspect {what} ({exc.strerror or exc}); fix the path or its "
                           "permissions") from exc
    return path


def _content(path: Path, what: str, keep: int | None = 540) -> tuple[bytes, int]:
    """Leading bytes (all of them when ``keep`` is None) and total size of a file's content, decompressing
    gzip to its end.

    Parameters
    ----------
    path : Path
        A regular file.
    what : str
        ``"image"`` or ``"mask"``, for the message.
    keep : int or None
        How many leading bytes of the content to return; None for all.

    Returns
    -------
    tuple of (bytes, int)
        The leading bytes and the content size in bytes.

    Raises
    ------
    ImagingError
        If a gzip stream ends early, fails its CRC/length check, or
        decompresses beyond :func:`max_input_bytes`.
    """
    with open(path, "rb") as f:
        head = f.read(2 if keep is None else max(keep, 2))
        if head[:2] != _GZIP_MAGIC:
            if keep is None:
                head += f.read()
                return head, len(head)
            return head[:keep], os.fstat(f.fileno()).st_size
    limit = max_input_bytes()
    size, parts, kept = 0, [], 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if keep is None or kept < keep:
                    part = chunk if keep is None else chunk[: keep - kept]
                    parts.append(part)
                    kept += len(part)
                size += len(chunk)
                if size > limit:
                    raise _too_big(path, size, limit, f"decompressed {what}")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImagingError(f"{path}: {what} file is truncated or corrupt (gzip: {reason}); copy it again from "
                           "its source") from exc
    return b"".join(parts), size


@dataclass(frozen=True)
class _NiftiSpan:
    """Where a NIfTI header says its voxel data lie, and how they are stored."""

    offset: int
    nbytes: int
    single: bool
    endian: str
    datatype: int
    dims: tuple[int, ...]


#: NIfTI datatype codes of real floating-point voxels (FLOAT32, FLOAT64).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_span(header: bytes) -> _NiftiSpan | None:
    """Where a NIfTI-1/2 header says its voxel data lie.

    Parameters
    ----------
    header : bytes
        The first 540 bytes (or fewer) of the decompressed file.

    Returns
    -------
    _NiftiSpan or None
        Offset and byte count of the voxel data, whether they are in this
        file (``n+1``/``n+2``) rather than a ``.img`` beside it, byte order,
        datatype code and dimensions; None when the
        bytes are not a NIfTI header this check understands (SimpleITK then
        judges the file).
    """
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            magic = header[344:348]
            if magic not in (b"n+1\0", b"ni1\0"):
                return None
            dim = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            single = magic == b"n+1\0"
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            magic = header[4:8]
            if magic not in (b"n+2\0", b"ni2\0"):
                return None
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            single = magic == b"n+2\0"
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d <= 0 for d in dim[1 : ndim + 1]):
        return None
    if not math.isfinite(vox_offset) or vox_offset < 0:
        return None
    nbytes = (math.prod(dim[1 : ndim + 1]) * bitpix + 7) // 8
    return _NiftiSpan((int(vox_offset) if single else 0), nbytes, single, endian, datatype,
                      tuple(dim[1 : ndim + 1]))


def _check_complete(path: Path, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Raise if a file's voxel data are shorter than declared (SimpleITK's NIfTI reader zero-fills them);
    return the NaN/inf voxels of a float NIfTI (its reader silently turns them into 0).

    Every gzip file is decompressed to its end (CRC and length checked). For
    NIfTI, the content must hold the voxel data its header declares (for a
    ``.hdr``/``.img`` pair, the ``.img`` beside it). Other formats are left to
    SimpleITK, whose NRRD and MetaImage readers raise on short data and keep
    NaN/inf as they are.

    Parameters
    ----------
    path : Path
        A regular file.
    what : str
        ``"image"`` or ``"mask"``, for the message.

    Returns
    -------
    tuple of (ndarray, ndarray) or None
        Flat (x fastest) indices and values of the non-finite voxels of a
        float NIfTI that has some; None otherwise.

    Raises
    ------
    ImagingError
        If the file is truncated or corrupt.
    """
    try:
        header, size = _content(path, what)
        span = _nifti_span(header)
        if span is None:
            return None
        data = path
        if not span.single:
            stem = path.name.removesuffix(".gz").removesuffix(".hdr")
            found = [path.with_name(stem + ext) for ext in (".img", ".img.gz") if path.with_name(stem + ext).exists()]
            if not found:
                return None  # SimpleITK reports the missing .img
            data = check_input(found[0], what)
            size = _content(data, what, keep=0)[1]
        if size < span.offset + span.nbytes:
            raise ImagingError(
                f"{data}: {what} file is truncated: its NIfTI header declares {span.offset + span.nbytes} bytes of "
                f"header and voxel data but it holds {size}; copy it again from its source"
            )
        if span.datatype not in _NIFTI_FLOATS:
            return None
        content = _content(data, what, keep=None)[0]
    except OSError as exc:
        raise ImagingError(f"{path}: cannot read {what} ({exc.strerror or exc}); fix the path or its "
                           "permissions") from exc
    dtype = np.dtype(span.endian + _NIFTI_FLOATS[span.datatype])
    values = np.frombuffer(content, dtype=dtype, count=span.nbytes // dtype.itemsize, offset=span.offset)
    bad = np.flatnonzero(~np.isfinite(values))
    return (bad, values[bad].astype(np.float64)) if bad.size else None


def _restore_non_finite(image: sitk.Image, bad: tuple[np.ndarray, np.ndarray], path: Path, what: str) -> sitk.Image:
    """Put back the NaN/inf voxels the NIfTI reader replaced by 0, so later checks see them."""
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        raise ImagingError(f"{path}: {what} has {bad[0].size} NaN/inf voxel(s); replace them with finite values")
    array = sitk.GetArrayFromImage(image)
    if bad[0].max() >= array.size:
        raise ImagingError(f"{path}: {what} has {bad[0].size} NaN/inf voxel(s); replace them with finite values")
    array.reshape(-1)[bad[0]] = bad[1]
    restored = sitk.GetImageFromArray(array)
    restored.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        restored.SetMetaData(key, image.GetMetaData(key))
    return restored


def _dicom_pixel_bytes(dataset: pydicom.Dataset) -> int | None:
    """Bytes of native (uncompressed) pixel data a DICOM header declares; None if compressed or unknown."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed:
        return None
    try:
        rows, columns, bits = int(dataset.Rows), int(dataset.Columns), int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (rows * columns * samples * frames * bits + 7) // 8


def _check_dicom_series(path: Path, uid: str, files: tuple[str, ...] | list[str], what: str = "image") -> None:
    """Raise if a file of the DICOM series is truncated, or was silently left out by GDCM.

    GDCM skips a file it cannot parse (the volume then misses a slice) and
    pydicom reads short pixel data without complaint; this reads every file of
    the directory with pydicom and compares native pixel data with the length
    its header declares.

    Parameters
    ----------
    path : Path
        The series directory.
    uid : str
        Series Instance UID being read.
    files : sequence of str
        The files GDCM ordered for that series.
    what : str
        ``"image"`` or ``"mask"``, for the message.

    Raises
    ------
    ImagingError
        Naming the first incomplete file.
    """
    listed = {os.path.realpath(f) for f in files}
    for entry in sorted(path.iterdir()):
        if not entry.is_file():
            continue
        try:
            dataset = pydicom.dcmread(entry)
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error):
            if os.path.realpath(entry) in listed:
                raise ImagingError(f"{entry}: DICOM file of the {what} series is truncated or corrupt; copy it "
                                   "again from its source") from None
            continue  # not DICOM, or not readable: not part of any series GDCM read
        if str(dataset.get("SeriesInstanceUID", "")) != uid:
            continue
        if os.path.realpath(entry) not in listed:
            raise ImagingError(f"{entry}: DICOM file of the {what} series was skipped by the reader (truncated or "
                               "corrupt); copy it again from its source or remove it")
        expected = _dicom_pixel_bytes(dataset)
        actual = len(dataset.get("PixelData") or b"")
        if expected is not None and "PixelData" in dataset and actual < expected:
            raise ImagingError(f"{entry}: DICOM file of the {what} series is truncated (pixel data {actual} of "
                               f"{expected} bytes); copy it again from its source")


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
        If the path is missing, not a regular file or directory, larger than
        :func:`max_input_bytes`, truncated (NIfTI voxel data shorter than its
        header declares, a gzip stream cut short or failing its CRC, a DICOM
        file of the series with short pixel data or skipped by GDCM),
        unreadable, or a directory without a DICOM series.
    """
    return _read_volume(path, "image")


def _read_volume(path: str | Path, what: str) -> sitk.Image:
    """:func:`read_image` for an image or a label map; ``what`` (``"image"`` or ``"mask"``) names it in messages."""
    path = check_input(path, what)
    if not path.is_dir():
        bad = _check_complete(path, what)
        with _reading(path, what):
            image = sitk.ReadImage(str(path))
        return image if bad is None else _restore_non_finite(image, bad, path, what)
    with _reading(path, "DICOM series"):
        series = {
            uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        }
        if not series:
            raise ImagingError(
                f"{path}: no DICOM series directly in this directory; point to the folder holding the image files"
            )
        uid = max(series, key=lambda key: len(series[key]))
        _check_dicom_series(path, uid, series[uid], what)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(series[uid])
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
    path = check_input(path, "mask")
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
    image = _read_volume(path, "mask")
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
