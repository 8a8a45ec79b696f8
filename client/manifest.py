"""Site data manifest: reading it and checking every case before extraction.

A manifest is a CSV written by the site, one row per case (per timepoint for delta radiomics):

=============  ==========================================================================
column         meaning
=============  ==========================================================================
case_id        patient/case identifier (unique, or unique per ``timepoint``)
image          image file (NIfTI, NRRD, MHA, ...) or DICOM series directory
mask           label map file, DICOM RTSTRUCT or DICOM SEG (file or directory)
mask_label     optional integer label value inside ``mask`` (default 1)
mask_roi       optional ROI/segment name, required for RTSTRUCT masks
timepoint      optional, for delta (longitudinal) radiomics
any other      clinical and outcome columns (``age``, ``sex``, ``response``, ``os_time`` ...),
               carried through to the feature table
=============  ==========================================================================

Paths are relative to the manifest's folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("case_id", "image", "mask")
RESERVED_COLUMNS = ("case_id", "image", "mask", "mask_label", "mask_roi", "timepoint")
#: Outcome columns checked for missing values when the user names none.
KNOWN_OUTCOME_COLUMNS = ("response", "os_time", "os_event", "pfs_time", "pfs_event", "time", "event")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing file or required column)."""


@dataclass(frozen=True)
class Case:
    """One row of a manifest with its paths resolved."""

    case_id: str
    image: Path
    mask: Path
    label: int
    roi: str | None
    timepoint: str | None
    clinical: dict = field(default_factory=dict)
    row: int = 0

    @property
    def key(self) -> str:
        """Case identifier including the timepoint when there is one."""
        return self.case_id if self.timepoint is None else f"{self.case_id}@{self.timepoint}"


@dataclass(frozen=True)
class Manifest:
    path: Path
    cases: list[Case]
    clinical_columns: list[str]
    has_timepoint: bool
    #: (row, case_id, message) for rows that could not even be turned into a Case
    row_problems: list[tuple[int, str, str]]


def _cell(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest CSV and resolve its paths relative to the manifest's folder.

    Rows with an empty ``case_id``/``image``/``mask`` or a non-integer ``mask_label`` are reported in
    ``row_problems`` instead of raising, so one bad row never hides the others.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found; pass the path of the site's manifest CSV")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True)
    except Exception as exc:  # pandas raises several types for malformed CSV
        raise ManifestError(f"manifest {path} is not a readable CSV ({exc.__class__.__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}")
    base = path.resolve().parent
    clinical_columns = [c for c in df.columns if c not in RESERVED_COLUMNS]
    has_timepoint = "timepoint" in df.columns
    cases: list[Case] = []
    problems: list[tuple[int, str, str]] = []
    for i, rec in enumerate(df.to_dict("records")):
        row = i + 2  # 1-based, after the header line: what a spreadsheet shows
        case_id = _cell(rec.get("case_id"))
        shown = case_id or f"<row {row}>"
        if case_id is None:
            problems.append((row, shown, "case_id is empty; give every row an identifier"))
            continue
        image, mask = _cell(rec.get("image")), _cell(rec.get("mask"))
        if image is None or mask is None:
            empty = "image" if image is None else "mask"
            problems.append((row, shown, f"{empty} path is empty; fill in the {empty} column"))
            continue
        label_text = _cell(rec.get("mask_label"))
        try:
            label = 1 if label_text is None else int(float(label_text))
            if label_text is not None and float(label_text) != label:
                raise ValueError
        except ValueError:
            problems.append((row, shown, f"mask_label {label_text!r} is not an integer label value"))
            continue
        clinical = {c: rec.get(c) for c in clinical_columns}
        cases.append(Case(case_id=case_id, image=(base / image), mask=(base / mask), label=label,
                          roi=_cell(rec.get("mask_roi")), timepoint=_cell(rec.get("timepoint")),
                          clinical=clinical, row=row))
    return Manifest(path=path, cases=cases, clinical_columns=clinical_columns, has_timepoint=has_timepoint,
                    row_problems=problems)


@dataclass(frozen=True)
class CheckTolerances:
    """How far image and mask geometry may differ and still be treated as the same grid."""

    spacing_rel: float = 1e-3
    origin_abs: float = 1e-2
    direction_abs: float = 1e-3


@dataclass(frozen=True)
class Problem:
    row: int
    case_id: str
    column: str
    severity: str  # "error" (case unusable) or "warning" (case usable for extraction)
    message: str


@dataclass
class CheckReport:
    manifest: Path
    n_cases: int
    problems: list[Problem]

    @property
    def unusable_cases(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.problems:
            if p.severity == "error":
                seen.setdefault(p.case_id, None)
        return list(seen)

    @property
    def n_unusable_rows(self) -> int:
        return len({p.row for p in self.problems if p.severity == "error"})


def geometry_mismatch(image, mask, tol: CheckTolerances) -> str | None:
    """Describe how ``mask``'s grid differs from ``image``'s beyond ``tol``, or None when they match."""
    if image.GetDimension() != mask.GetDimension():
        return f"image is {image.GetDimension()}-D but mask is {mask.GetDimension()}-D"
    if image.GetSize() != mask.GetSize():
        return f"size differs: image {image.GetSize()} vs mask {mask.GetSize()}"
    si, sm = np.array(image.GetSpacing()), np.array(mask.GetSpacing())
    if np.any(np.abs(si - sm) > tol.spacing_rel * np.abs(si)):
        return f"spacing differs: image {tuple(np.round(si, 5))} vs mask {tuple(np.round(sm, 5))} mm"
    oi, om = np.array(image.GetOrigin()), np.array(mask.GetOrigin())
    if np.any(np.abs(oi - om) > tol.origin_abs):
        return (f"origin differs by {np.abs(oi - om).max():.4g} mm (tolerance {tol.origin_abs} mm): "
                f"image {tuple(np.round(oi, 3))} vs mask {tuple(np.round(om, 3))}")
    di, dm = np.array(image.GetDirection()), np.array(mask.GetDirection())
    if np.any(np.abs(di - dm) > tol.direction_abs):
        return f"direction cosines differ by {np.abs(di - dm).max():.4g} (tolerance {tol.direction_abs})"
    return None


def check_case(case: Case, tol: CheckTolerances) -> list[Problem]:
    """Read one case's image and mask and return every problem found (empty list: usable)."""
    import SimpleITK as sitk

    from fedrad.client.imaging import ImagingError, mask_kind, read_image, read_mask

    def err(column: str, message: str, severity: str = "error") -> Problem:
        return Problem(case.row, case.key, column, severity, message)

    problems: list[Problem] = []
    try:
        image = read_image(case.image)
    except ImagingError as exc:
        problems.append(err("image", str(exc)))
        image = None
    if image is None:
        # the mask can still be checked on its own (path, file type, size, integrity) when it is a label map
        try:
            if mask_kind(case.mask) == "labelmap":
                read_image(case.mask)
        except ImagingError as exc:
            problems.append(err("mask", str(exc).replace("cannot read image", "cannot read mask")))
        return problems
    try:
        mask = read_mask(case.mask, image, roi=case.roi)
    except ImagingError as exc:
        return problems + [err("mask", str(exc))]
    mismatch = geometry_mismatch(image, mask, tol)
    if mismatch:
        problems.append(err("mask", f"{mismatch}; re-export the mask on the image grid or loosen the tolerance"))
        return problems
    arr = sitk.GetArrayViewFromImage(mask)
    n_label = int(np.count_nonzero(arr == case.label))
    if n_label == 0:
        present = [int(v) for v in np.unique(arr) if v != 0]
        if not present:
            problems.append(err("mask", "mask is empty (no non-zero voxel); segment the lesion or drop the case"))
        else:
            shown = ", ".join(str(v) for v in present[:8])
            problems.append(err("mask_label", f"label {case.label} not in mask (labels present: {shown}); "
                                              f"set mask_label to the lesion's label"))
    elif n_label == 1:
        problems.append(err("mask", f"mask label {case.label} covers a single voxel; "
                                    "texture and shape features are undefined for it"))
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.inexact):
        finite = np.isfinite(values)
        inside = int(np.count_nonzero(~finite[arr == case.label]))
        outside = int(finite.size - np.count_nonzero(finite)) - inside
        if inside:
            problems.append(err("image", f"{case.image}: {inside} NaN/inf voxel(s) inside mask label {case.label}; "
                                         "features would be wrong: fix or re-export the image"))
        if outside:
            problems.append(err("image", f"{case.image}: {outside} NaN/inf voxel(s) outside the mask; extraction "
                                         "fails if any lies in the block pyradiomics uses (mask bounding box plus "
                                         "the filters' margin, or the whole image with normalization): replace "
                                         "them with the background value", severity="warning"))
    return problems


def check_manifest(path: str | Path, tolerances: CheckTolerances = CheckTolerances(),
                   outcome_columns: list[str] | None = None, progress: bool = False) -> CheckReport:
    """Validate every case of a manifest without extracting features.

    Checks: row-level problems (empty ids/paths, bad label value), duplicate ``case_id`` (per timepoint when the
    manifest has one), unreadable image or mask, geometry mismatch beyond ``tolerances``, empty mask, label value
    absent from the mask, single-voxel mask (all make the case unusable), and missing values in outcome columns
    (a warning: the case can be extracted but not used for that endpoint). ``outcome_columns`` defaults to the
    known outcome names present in the manifest.
    """
    manifest = read_manifest(path)
    problems = [Problem(row, cid, "case_id" if "case_id" in msg else "row", "error", msg)
                for row, cid, msg in manifest.row_problems]
    counts: dict[str, int] = {}
    for case in manifest.cases:
        counts[case.key] = counts.get(case.key, 0) + 1
    duplicated = {k for k, n in counts.items() if n > 1}
    if outcome_columns is None:
        outcome_columns = [c for c in KNOWN_OUTCOME_COLUMNS if c in manifest.clinical_columns]
    else:
        absent = [c for c in outcome_columns if c not in manifest.clinical_columns]
        if absent:
            raise ManifestError(f"manifest {manifest.path} has no outcome column(s) {', '.join(absent)}")
    iterator = manifest.cases
    bar = None
    if progress:
        from fedrad.client.progress import case_progress

        bar = case_progress("checking cases", len(manifest.cases))
        bar.start()
    try:
        for case in iterator:
            if case.key in duplicated:
                what = "case_id+timepoint" if manifest.has_timepoint else "case_id"
                problems.append(Problem(case.row, case.key, "case_id", "error",
                                        f"duplicate {what} {case.key!r} ({counts[case.key]} rows); "
                                        "make identifiers unique"))
            for col in outcome_columns:
                if _cell(case.clinical.get(col)) is None:
                    problems.append(Problem(case.row, case.key, col, "warning",
                                            f"missing value in outcome column {col}; the case is left out "
                                            "of analyses of that endpoint"))
            problems.extend(check_case(case, tolerances))
            if bar is not None:
                bar.advance(failed=False)
    finally:
        if bar is not None:
            bar.stop()
    n = len(manifest.cases) + len(manifest.row_problems)
    return CheckReport(manifest=manifest.path, n_cases=n, problems=problems)


def format_problems(report: CheckReport) -> str:
    """Plain-text table of a check report (one line per problem) with a summary line."""
    lines = []
    if report.problems:
        rows = [(str(p.row), p.case_id, p.column, p.severity, p.message) for p in report.problems]
        head = ("row", "case", "column", "severity", "problem")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines.append(fmt.format(*head))
        lines.extend(fmt.format(*r) for r in rows)
    n_bad = report.n_unusable_rows
    n_warn = sum(p.severity == "warning" for p in report.problems)
    lines.append(f"{report.manifest}: {report.n_cases} rows checked, {report.n_cases - n_bad} usable, "
                 f"{n_bad} unusable, {n_warn} warnings")
    return "\n".join(lines)
