"""Benchmark: `fedrad site extract --jobs 2` against the pyradiomics CLI `pyradiomics --jobs 2`.

Cases: the five real pyradiomics test cases (brain1, brain2, breast1 MR; lung1, lung2 CT at 512 x 512) from
../shared/data/pyradiomics-cases, each also flipped along x, y and both (SimpleITK.Flip: same size and
texture statistics, different bytes), so 20 distinct real-size cases. Parameters: Original + LoG (sigma 1, 3 mm)
+ wavelet, no resampling, bin width 25 (the shared measurement's setting) — filtering dominates the cost.

Prints, measured in this run:
  * max relative deviation between the two tools' feature values (goal: <= 1e-6, i.e. identical),
  * throughput ratio fedrad / pyradiomics CLI (goal >= 3x),
  * cache re-run ratio: pyradiomics CLI time / fedrad re-run time over the unchanged cases (goal >= 50x).

Usage: python benchmarks/extraction.py [--workdir DIR] [--jobs 2] [--copies 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pyradiomics-cases"
CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
PARAMS = {
    "setting": {"binWidth": 25, "additionalInfo": False, "label": 1},
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 3.0]}, "Wavelet": {}},
    "featureClass": {c: None for c in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")},
}
FLIPS = ((False, False, False), (True, False, False), (False, True, False), (True, True, False))


def make_cases(work: Path, copies: int) -> Path:
    import SimpleITK as sitk

    data = work / "cases"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in CASES:
        image = sitk.ReadImage(str(SHARED / f"{name}_image.nrrd"))
        mask = sitk.ReadImage(str(SHARED / f"{name}_label.nrrd"))
        for k, axes in enumerate(FLIPS[:copies]):
            case = f"{name}-{k}"
            sitk.WriteImage(sitk.Flip(image, axes), str(data / f"{case}_image.nrrd"), True)
            sitk.WriteImage(sitk.Flip(mask, axes), str(data / f"{case}_label.nrrd"), True)
            rows.append({"case_id": case, "image": f"cases/{case}_image.nrrd", "mask": f"cases/{case}_label.nrrd"})
    manifest = work / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    # the pyradiomics CLI wants absolute Image/Mask columns
    pd.DataFrame({"ID": [r["case_id"] for r in rows], "Image": [str(work / r["image"]) for r in rows],
                  "Mask": [str(work / r["mask"]) for r in rows]}).to_csv(work / "pyradiomics_input.csv", index=False)
    return manifest


def run(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--copies", type=int, default=4, help="flipped copies per case (1-4); 4 gives 20 cases")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: the benchmark needs ../shared/data/pyradiomics-cases")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedrad-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = make_cases(work, args.copies)
    n = len(pd.read_csv(manifest))
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    bindir = Path(sys.executable).parent
    print(f"benchmark: {n} real-size cases (5 pyradiomics test cases x {args.copies} flips), "
          f"Original + LoG(1, 3 mm) + wavelet, --jobs {args.jobs}, {os.cpu_count()} cores")

    t_pyr = run([str(bindir / "pyradiomics"), str(work / "pyradiomics_input.csv"), "--param", str(params),
                 "--jobs", str(args.jobs), "-o", str(work / "pyradiomics.csv"), "-f", "csv"])
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    fedrad = [str(bindir / "fedrad"), "site", "extract", str(manifest), "--params", str(params),
              "--jobs", str(args.jobs), "--cache-dir", str(cache)]
    t_fed = run(fedrad + ["--out", str(work / "fedrad.parquet")])
    t_rerun = run(fedrad + ["--out", str(work / "fedrad_rerun.parquet")])

    ref = pd.read_csv(work / "pyradiomics.csv").set_index("ID")
    got = pd.read_parquet(work / "fedrad.parquet").set_index("case_id").loc[ref.index]
    rerun = pd.read_parquet(work / "fedrad_rerun.parquet").set_index("case_id").loc[ref.index]
    feats = [c for c in got.columns if c in ref.columns and not c.startswith("diagnostics")]
    a, b = got[feats].to_numpy(float), ref[feats].to_numpy(float)
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    worst = float(np.nanmax(rel))
    same_rerun = np.array_equal(rerun[feats].to_numpy(float), a, equal_nan=True)

    print(f"features compared: {len(feats)} per case x {n} cases")
    print(f"max relative deviation fedrad vs pyradiomics CLI: {worst:.2e} (goal <= 1e-6)")
    print(f"pyradiomics CLI wall time: {t_pyr:.1f} s ({n / t_pyr:.2f} cases/s)")
    print(f"fedrad first run wall time: {t_fed:.1f} s ({n / t_fed:.2f} cases/s)")
    print(f"fedrad cached re-run wall time: {t_rerun:.2f} s (values identical to first run: {same_rerun})")
    print(f"throughput ratio fedrad / pyradiomics CLI: {t_pyr / t_fed:.1f}x (goal >= 3x)")
    print(f"cache re-run ratio pyradiomics CLI / fedrad re-run: {t_pyr / t_rerun:.0f}x (goal >= 50x)")
    if worst > 1e-6 or not same_rerun:
        sys.exit("values differ: the benchmark's equality check failed")


if __name__ == "__main__":
    main()
