"""Site-side radiomic feature extraction: pyradiomics, in parallel, cropped, cached and crash-safe.

What ``fedrad site extract`` does for each case of a manifest:

1. Reads image and mask (any SimpleITK format, DICOM series, RTSTRUCT, SEG: :mod:`fedrad.client.imaging`).
2. If the parameter file enables intensity normalization, normalizes the *whole* image first with pyradiomics'
   own ``normalizeImage`` (its statistics are image-wide, so this must precede cropping), then tells pyradiomics
   not to normalize again.
3. Crops to the mask's bounding box plus a margin derived from the enabled filters (:func:`crop_plan`), so that
   filtering runs on a small block while every feature value stays equal to uncropped extraction
   (relative difference below 1e-6, tested on the shared lung CT case):

   * no resampling: image and mask are cropped by ``max(LoG 12 sigma, wavelet support, gradient support)``
     voxels per axis (the recursive Gaussian behind pyradiomics' LoG has a long tail: 10 sigma still deviates by
     9e-7, 12 sigma by 7e-8 on lung1);
   * resampling: pyradiomics already resamples only the mask's bounding box plus ``padDistance`` voxels and
     filters that block; fedrad raises ``padDistance`` to the filters' support (so filtered values equal
     uncropped filtering) and crops the *image* before resampling by that distance plus the interpolation
     kernel's reach; the mask is left whole so the resampling grid is exactly pyradiomics' own.
   * image types whose values depend on the whole image (Square, SquareRoot, Logarithm, Exponential, LBP):
     no crop.
4. Runs pyradiomics' extractor (built once per worker process from the parameter file; SimpleITK limited to
   one thread per worker) and keeps the feature values (``diagnostics_*`` are dropped).

Cases run in a process pool, one case per task. A content-addressed cache (hash of image bytes, mask bytes,
label, ROI and parameters) makes a re-run extract only new or changed cases. One bad case never stops the
batch: it is listed with a one-line reason in ``<out>.errors.csv``. Outputs are written to a temporary file and
renamed, so an interrupted run never replaces a good table with a partial one.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad import __version__
from fedrad.common.files import atomic_write_bytes
from fedrad.client.manifest import Case, CheckTolerances, geometry_mismatch, read_manifest

PARAMS_DIR = Path(__file__).resolve().parent / "params"
SHIPPED_PARAMS = {"ct": PARAMS_DIR / "ct.yaml", "mr": PARAMS_DIR / "mr.yaml",
                  "ct-original": PARAMS_DIR / "ct-original.yaml"}
#: LoG margin in units of the largest sigma (measured: 10 sigma deviates 8.6e-7, 12 sigma 6.6e-8 on lung1).
LOG_MARGIN_SIGMAS = 12.0
#: image types whose filter output depends on image-wide statistics: cropping would change them
WHOLE_IMAGE_TYPES = {"Square", "SquareRoot", "Logarithm", "Exponential", "LBP2D", "LBP3D"}
#: reach of the interpolation kernel in input voxels (B-spline coefficients are an IIR filter: pole 0.268^16 < 1e-9)
INTERPOLATOR_REACH = {"sitkNearestNeighbor": 1, "sitkLinear": 2}
DEFAULT_INTERPOLATOR_REACH = 18
#: bump when anything that changes feature values in this module changes (invalidates the cache)
EXTRACTION_VERSION = "1"


class ExtractionError(ValueError):
    """A case could not be extracted; the message is one line naming what to fix."""


def resolve_params(params: str | os.PathLike | None) -> Path:
    """``None`` or ``"ct"`` -> shipped CT file, ``"mr"`` -> shipped MR file, ``"ct-original"`` -> shipped CT
    file without filters; anything else -> a path."""
    if params is None:
        return SHIPPED_PARAMS["ct"]
    key = str(params)
    if key.lower() in SHIPPED_PARAMS:
        return SHIPPED_PARAMS[key.lower()]
    path = Path(key)
    if not path.is_file():
        raise ExtractionError(f"parameter file {path} not found; pass 'ct', 'mr', 'ct-original' or a pyradiomics "
                              "YAML path")
    return path


def build_extractor(params_path: Path):
    """A pyradiomics extractor from a parameter file, with a clear error for an invalid file."""
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    try:
        return featureextractor.RadiomicsFeatureExtractor(str(params_path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ExtractionError(f"parameter file {params_path} is not a valid pyradiomics file: {first}") from exc


def params_digest(params_path: Path) -> str:
    """Hash of the *effective* settings (so comments and key order do not matter)."""
    ex = build_extractor(params_path)
    payload = {"settings": ex.settings, "imageTypes": ex.enabledImagetypes,
               "features": {k: sorted(v) if v else v for k, v in ex.enabledFeatures.items()},
               "extraction": EXTRACTION_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()



def shipped_params(phash: str | None) -> dict | None:
    """The parameter file shipped with fedrad whose effective settings have the hash ``phash`` (as every site
    reported it): ``{"file", "settings", "image_types", "feature_classes"}``, or None for any other file (a
    site's own parameter file, whose content never leaves the site)."""
    if not phash:
        return None
    for name, path in SHIPPED_PARAMS.items():
        if params_digest(path) == phash:
            ex = build_extractor(path)
            return {"file": f"{path.name} (fedrad --params {name})",
                    "settings": {k: v for k, v in sorted(ex.settings.items()) if not callable(v)},
                    "image_types": sorted(ex.enabledImagetypes), "feature_classes": sorted(ex.enabledFeatures)}
    return None

# ----------------------------------------------------------------------------------------------- cropping


def _filter_support_mm(image_types: dict, settings: dict, spacing: np.ndarray) -> np.ndarray | None:
    """Per-axis distance (mm) a filtered voxel depends on; None when an image type needs the whole image."""
    reach = np.zeros(len(spacing))
    for name, custom in image_types.items():
        args = {**settings, **(custom or {})}
        if name in WHOLE_IMAGE_TYPES:
            return None
        if name == "Original":
            continue
        if name == "LoG":
            sigmas = args.get("sigma") or []
            if sigmas:
                reach = np.maximum(reach, LOG_MARGIN_SIGMAS * max(float(s) for s in sigmas))
        elif name == "Wavelet":
            import pywt

            wavelet = pywt.Wavelet(args.get("wavelet", "coif1"))
            levels = int(args.get("start_level", 0)) + int(args.get("level", 1))
            # pyradiomics applies an undilated level-1 SWT per level: each adds (filter length - 1) voxels
            reach = np.maximum(reach, (levels * (wavelet.dec_len - 1) + 2) * spacing)
        elif name == "Gradient":
            reach = np.maximum(reach, 2 * spacing)
        else:  # an image type this module does not know: be safe
            return None
    return reach


@dataclass(frozen=True)
class CropPlan:
    """How to crop one case: ``margin`` voxels per axis (None: do not crop), which images, ``padDistance``."""

    margin: np.ndarray | None
    crop_mask: bool
    pad_distance: int


def crop_plan(image_types: dict, settings: dict, spacing) -> CropPlan:
    """Crop margin (in input voxels) that keeps every feature equal to uncropped extraction."""
    spacing = np.asarray(spacing, dtype=float)
    pad = int(settings.get("padDistance", 5))
    support = _filter_support_mm(image_types, settings, spacing)
    resampled = settings.get("resampledPixelSpacing")
    if resampled is not None and settings.get("interpolator") is not None:
        new = np.asarray(resampled, dtype=float)
        new = np.where(new == 0, spacing, new)
        if support is None:
            return CropPlan(None, False, pad)
        pad = max(pad, int(math.ceil(float(np.max(support / new)))) + 1)
        interp = settings.get("interpolator")
        reach = INTERPOLATOR_REACH.get(interp if isinstance(interp, str) else "", DEFAULT_INTERPOLATOR_REACH)
        margin = np.ceil((pad + 1) * new / spacing).astype(int) + reach
        return CropPlan(margin, False, pad)
    if support is None:
        return CropPlan(None, True, pad)
    margin = np.ceil(support / spacing).astype(int) + 1
    if settings.get("preCrop"):
        margin = np.maximum(margin, pad)
    return CropPlan(margin, True, pad)


def crop_to_margin(image, mask, label: int, plan: CropPlan):
    """Crop ``image`` (and ``mask`` when ``plan.crop_mask``) to the label's bounding box plus ``plan.margin``."""
    import SimpleITK as sitk

    if plan.margin is None:
        return image, mask
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    bb = stats.GetBoundingBox(label)
    dim = mask.GetDimension()
    lo = np.array(bb[:dim]) - plan.margin
    hi = np.array(bb[:dim]) + np.array(bb[dim:]) - 1 + plan.margin
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(mask.GetSize()) - 1)
    size, index = [int(v) for v in hi - lo + 1], [int(v) for v in lo]
    if size == list(mask.GetSize()):
        return image, mask
    image_c = sitk.RegionOfInterest(image, size, index)
    mask_c = sitk.RegionOfInterest(mask, size, index) if plan.crop_mask else mask
    return image_c, mask_c


# ----------------------------------------------------------------------------------------------- one case


@dataclass
class _Worker:
    params_path: Path
    extractor: object = None
    normalize: dict = field(default_factory=dict)


_WORKER: _Worker | None = None


def _init_worker(params_path: str) -> None:
    """Process-pool initializer: one SimpleITK thread, one extractor per process."""
    global _WORKER
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _WORKER = _make_worker(Path(params_path))


def _make_worker(params_path: Path) -> _Worker:
    ex = build_extractor(params_path)
    normalize = {}
    if ex.settings.get("normalize"):
        normalize = {"normalizeScale": ex.settings.get("normalizeScale", 1),
                     "removeOutliers": ex.settings.get("removeOutliers")}
        ex.settings["normalize"] = False  # done by fedrad on the whole image before cropping
    return _Worker(params_path=params_path, extractor=ex, normalize=normalize)


def load_case(case: Case, tol: CheckTolerances = CheckTolerances()):
    """Read and check a case's image and mask (same grid within ``tol``, label present, more than one voxel).

    Returns ``(image, mask)`` with the mask on the image's exact grid and an integer pixel type.
    Raises :class:`ExtractionError` with a one-line reason.
    """
    import SimpleITK as sitk

    from fedrad.client.imaging import ImagingError, read_image, read_mask

    try:
        image = read_image(case.image)
        mask = read_mask(case.mask, image, roi=case.roi)
    except ImagingError as exc:
        raise ExtractionError(str(exc)) from exc
    mismatch = geometry_mismatch(image, mask, tol)
    if mismatch:
        raise ExtractionError(f"image/mask {mismatch}; run `fedrad site check` for details")
    if mask.GetSpacing() != image.GetSpacing() or mask.GetOrigin() != image.GetOrigin() \
            or mask.GetDirection() != image.GetDirection():
        mask.CopyInformation(image)  # equal within tolerance: same grid
    n = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask) == case.label))
    if n == 0:
        raise ExtractionError(f"label {case.label} not present in mask {case.mask.name}")
    if n == 1:
        raise ExtractionError(f"mask label {case.label} covers a single voxel; features are undefined")
    if mask.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkInt8, sitk.sitkInt16,
                                 sitk.sitkInt32):
        mask = sitk.Cast(mask, sitk.sitkUInt32)
    inside = sitk.GetArrayViewFromImage(mask) == case.label
    bad = non_finite_count(image, inside)
    if bad:
        raise ExtractionError(f"{case.image}: {bad} NaN/inf voxel(s) inside mask label {case.label}; features would "
                              "be wrong: fix or re-export the image")
    return image, mask


def non_finite_count(image, where: np.ndarray | None = None) -> int:
    """Number of NaN/inf voxels of ``image`` (only where ``where`` is True, when given); 0 for integer images."""
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(values.dtype, np.inexact):
        return 0
    if where is not None:
        values = values[where]
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def run_extractor(image, mask, label: int, worker: _Worker, pad_distance: int) -> dict[str, float]:
    """pyradiomics on prepared (normalized, cropped) inputs; ``diagnostics_*`` dropped. Raises ExtractionError."""
    ex = worker.extractor
    saved_pad = ex.settings.get("padDistance")
    ex.settings["padDistance"] = pad_distance
    try:
        result = ex.execute(image, mask, label=label)
    except Exception as exc:  # pyradiomics raises bare ValueError/RuntimeError/AssertionError
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        raise ExtractionError(f"pyradiomics failed: {text[:300]}") from exc
    finally:
        ex.settings["padDistance"] = saved_pad
    features = {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}
    if not features:
        raise ExtractionError("pyradiomics returned no features (check the parameter file's featureClass)")
    return features


def extract_case(case: Case, worker: _Worker, tol: CheckTolerances = CheckTolerances()) -> dict[str, float]:
    """Feature values of one case (pyradiomics names, ``diagnostics_*`` dropped). Raises ExtractionError."""
    from radiomics import imageoperations

    image, mask = load_case(case, tol)
    ex = worker.extractor
    plan = crop_plan(ex.enabledImagetypes, ex.settings, image.GetSpacing())
    if worker.normalize or plan.margin is None:  # normalization statistics / filters use the whole image
        bad = non_finite_count(image)
        region = "the image (normalization or a filter uses all of it)"
    if worker.normalize:
        image = imageoperations.normalizeImage(image, **worker.normalize)
    image, mask = crop_to_margin(image, mask, case.label, plan)
    if not (worker.normalize or plan.margin is None):
        bad = non_finite_count(image)
        region = "the block pyradiomics uses (mask bounding box plus the filters' margin)"
    if bad:
        raise ExtractionError(f"{case.image}: {bad} NaN/inf voxel(s) in {region}; every voxel there must be "
                              "finite: replace them (e.g. with the background value) or re-export the image")
    return run_extractor(image, mask, case.label, worker, plan.pad_distance)


def _run_case(case: Case) -> tuple[str, dict | None, str | None, float]:
    """Pool task: (key, features or None, error or None, seconds)."""
    t0 = time.perf_counter()
    try:
        return case.key, extract_case(case, _WORKER), None, time.perf_counter() - t0
    except ExtractionError as exc:
        return case.key, None, str(exc), time.perf_counter() - t0
    except Exception as exc:  # a bug or an unexpected library error must not stop the batch
        text = " ".join(str(exc).split())[:300]
        return case.key, None, f"unexpected {exc.__class__.__name__}: {text}", time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- cache


class _HashBudget:
    """Bytes left to hash for one input (image or mask): a file growing while hashed cannot stream forever."""

    def __init__(self, limit: int):
        self.left = limit

    def take(self, n: int, path: Path) -> None:
        self.left -= n
        if self.left < 0:
            raise OSError(f"{path}: more bytes than the input size limit")


def _hash_path(h, path: Path, budget: _HashBudget) -> None:
    """Hash a file, or a directory's regular files (sorted, with their relative names).

    Files are opened non-blocking and checked to be regular before a byte is read, so a FIFO or a device
    (``/dev/zero``) raises :class:`OSError` at once instead of blocking or streaming forever.
    """
    if path.is_dir():
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(sub.relative_to(path)).encode())
            _hash_path(h, sub, budget)
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        for chunk in iter(lambda: f.read(1 << 20), b""):
            budget.take(len(chunk), path)
            h.update(chunk)


def case_cache_key(case: Case, params_hash: str) -> str | None:
    """Content address of a case: image bytes, mask bytes, label, ROI and parameters.

    None when the inputs cannot be hashed (missing, not a regular file or directory, over the size limit): the
    case is then extracted without the cache and fails there with a one-line reason.
    """
    from fedrad.client.imaging import ImagingError, check_input, max_input_bytes

    h = hashlib.sha256()
    try:
        for part, what in ((case.image, "image"), (case.mask, "mask")):
            check_input(part, what)
            h.update(b"\0file\0")
            _hash_path(h, part, _HashBudget(max_input_bytes()))
    except (OSError, ImagingError):
        return None
    h.update(f"\0label={case.label}\0roi={case.roi}\0params={params_hash}".encode())
    return h.hexdigest()


class FeatureCache:
    """One JSON file per case under ``root/<2 hex>/<key>.json``, written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put(self, key: str, features: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(features).encode())


# ----------------------------------------------------------------------------------------------- output


def write_table(df: pd.DataFrame, out: Path, metadata: dict[str, str]) -> None:
    """Write ``df`` to ``out`` (.parquet with ``metadata`` in the schema, or .csv) via a temp file + rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if out.suffix.lower() == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            meta = dict(table.schema.metadata or {})
            meta.update({f"fedrad.{k}".encode(): str(v).encode() for k, v in metadata.items()})
            pq.write_table(table.replace_schema_metadata(meta), tmp)
        else:
            df.to_csv(tmp, index=False, float_format="%.17g")  # round-trips float64 exactly
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_provenance(path: str | Path) -> dict[str, str]:
    """The ``fedrad.*`` provenance entries stored in a parquet feature table."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode()[len("fedrad."):]: v.decode() for k, v in meta.items() if k.startswith(b"fedrad.")}


def errors_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".errors.csv") if out.suffix else out.with_name(
        out.name + ".errors.csv")


class _NoBar:
    def advance(self, failed: bool = False, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(description: str, total: int, done: int, show: bool):
    """The case progress bar (cases done, failures, ETA) when ``show``; a silent stand-in otherwise."""
    if not show:
        yield _NoBar()
        return
    from fedrad.client.progress import case_progress

    bar = case_progress(description, total)
    bar.start()
    bar.advance(n=done)
    try:
        yield bar
    finally:
        bar.stop()


def map_in_pool(fn, task_args: list[tuple], params_path: Path, jobs: int | None):
    """Run ``fn(*args)`` for every task in a spawn process pool (one task each, one extractor and one SimpleITK
    thread per worker); yields the results as they complete."""
    if not task_args:
        return
    n_jobs = max(1, min(jobs or os.cpu_count() or 1, len(task_args)))
    if n_jobs == 1:  # in this process: a one-worker pool only re-imports SimpleITK and pyradiomics (~0.6 s CPU)
        yield from _map_here(fn, task_args, params_path)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(str(params_path),)) as pool:
        for fut in cf.as_completed([pool.submit(fn, *args) for args in task_args]):
            yield fut.result()


def _map_here(fn, task_args: list[tuple], params_path: Path):
    """:func:`map_in_pool` with one worker, run here; the process's extractor and SimpleITK thread count are
    restored afterwards."""
    global _WORKER
    import SimpleITK as sitk

    before, threads = _WORKER, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        _init_worker(str(params_path))
        for args in task_args:
            yield fn(*args)
    finally:
        _WORKER = before
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def write_outputs(df: pd.DataFrame | None, out: Path, metadata: dict, errors: list, nothing: str
                  ) -> tuple[Path, int]:
    """Write the feature table (when there is one) and its ``.errors.csv``; raise ``nothing`` + details when
    no case could be extracted (the existing table is then left as it was)."""
    if df is not None:
        write_table(df, out, metadata)
    ep = errors_path(out)
    err_df = pd.DataFrame(errors, columns=["case_id", "status", "reason"])
    atomic_write_bytes(ep, err_df.to_csv(index=False).encode())
    n_failed = sum(1 for e in errors if e[1] == "failed")
    if df is None:
        raise ExtractionError(f"{nothing} ({n_failed} failed); see {ep}; {out} was not written")
    return ep, n_failed


@dataclass
class ExtractionResult:
    out: Path
    errors_file: Path
    n_cases: int
    n_ok: int
    n_failed: int
    n_cached: int
    n_nan_features: int
    seconds: float
    errors: list[tuple[str, str]]

    def headline(self) -> str:
        return (f"features: {self.out} ({self.n_ok} of {self.n_cases} cases extracted, "
                f"{self.n_cached} from cache, {self.n_failed} failed, {self.seconds:.1f} s wall time)")

    def summary(self) -> str:
        """The headline, and where the problems are listed when there were any."""
        lines = [self.headline()]
        if self.n_failed or self.n_nan_features:
            lines.append(f"problems: {self.errors_file} ({self.n_failed} failed cases, "
                         f"{self.n_nan_features} cases with NaN feature values)")
        return "\n".join(lines)


def extract_manifest(manifest: str | Path, params=None, out: str | Path = "features.parquet",
                     jobs: int | None = None, cache_dir: str | Path | None = None, use_cache: bool = True,
                     progress: bool = False, tolerances: CheckTolerances = CheckTolerances()) -> ExtractionResult:
    """Extract features for every case of ``manifest`` into ``out`` (.parquet or .csv).

    Output columns: ``case_id`` (and ``timepoint`` when the manifest has it), the feature columns in pyradiomics'
    names, then the manifest's clinical columns. Failed cases are left out of ``out`` and listed in
    ``<out stem>.errors.csv`` (columns ``case_id, status, reason``; status ``failed`` or ``warning`` for a case
    whose row is kept but has NaN feature values). Parquet metadata holds provenance: fedrad version,
    pyradiomics version, parameter hash and text.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ExtractionError(f"output {out} must end in .parquet or .csv")
    params_path = resolve_params(params)
    phash = params_digest(params_path)
    man = read_manifest(manifest)
    cases = man.cases
    errors: list[tuple[str, str, str]] = [(cid, "failed", msg) for _row, cid, msg in man.row_problems]
    seen: set[str] = set()
    unique_cases = []
    for case in cases:
        if case.key in seen:
            errors.append((case.key, "failed", f"duplicate case_id {case.key!r} (row {case.row}); "
                                               "only the first row was extracted"))
            continue
        seen.add(case.key)
        unique_cases.append(case)
    cache = FeatureCache(Path(cache_dir) if cache_dir else Path(man.path).resolve().parent / ".fedrad-cache")
    results: dict[str, dict] = {}
    keys: dict[str, str | None] = {}
    todo: list[Case] = []
    for case in unique_cases:
        key = case_cache_key(case, phash) if use_cache else None
        keys[case.key] = key
        hit = cache.get(key) if key else None
        if hit is not None:
            results[case.key] = hit
        else:
            todo.append(case)
    n_cached = len(results)
    with progress_bar("extracting", len(unique_cases), n_cached, progress) as bar:
        for key, feats, err, _secs in map_in_pool(_run_case, [(case,) for case in todo], params_path, jobs):
            if feats is not None:
                results[key] = feats
                if keys.get(key):
                    cache.put(keys[key], feats)
            else:
                errors.append((key, "failed", err))
            bar.advance(failed=feats is None)

    rows = []
    n_nan = 0
    feature_names: list[str] = []
    for case in unique_cases:
        feats = results.get(case.key)
        if feats is None:
            continue
        if not feature_names:
            feature_names = list(feats)
        nan_feats = [k for k, v in feats.items() if v is None or (isinstance(v, float) and math.isnan(v))]
        if nan_feats:
            n_nan += 1
            shown = ", ".join(nan_feats[:3]) + (" ..." if len(nan_feats) > 3 else "")
            errors.append((case.key, "warning", f"{len(nan_feats)} feature values are NaN ({shown})"))
        row = {"case_id": case.case_id}
        if man.has_timepoint:
            row["timepoint"] = case.timepoint
        row.update(feats)
        for col in man.clinical_columns:
            row[col] = case.clinical.get(col)
        rows.append(row)
    ordered_cols = ["case_id"] + (["timepoint"] if man.has_timepoint else [])
    all_feats = feature_names + [k for r in rows for k in r if k not in feature_names and k not in ordered_cols
                                 and k not in man.clinical_columns]
    all_feats = list(dict.fromkeys(all_feats))
    df = pd.DataFrame(rows, columns=ordered_cols + all_feats + man.clinical_columns)
    for col in man.clinical_columns:  # numbers stay numbers; free text stays text
        converted = pd.to_numeric(df[col], errors="coerce")
        if converted.notna().sum() == df[col].notna().sum():
            df[col] = converted
    import radiomics

    metadata = {"version": __version__, "pyradiomics_version": radiomics.__version__, "params_hash": phash,
                "params_file": str(params_path), "params_yaml": params_path.read_text(),
                "manifest": str(Path(manifest).resolve()), "n_cases": str(len(unique_cases)),
                "n_failed": str(sum(1 for e in errors if e[1] == "failed"))}
    ep, n_failed = write_outputs(df if rows else None, out, metadata, errors, f"no case of {manifest} could be "
                                 "extracted")
    return ExtractionResult(out=out, errors_file=ep, n_cases=len(unique_cases) + len(man.row_problems),
                            n_ok=len(rows), n_failed=n_failed, n_cached=n_cached, n_nan_features=n_nan,
                            seconds=time.perf_counter() - t_start,
                            errors=[(e[0], e[2]) for e in errors if e[1] == "failed"])
