"""`fedrad site check` and `fedrad site extract` on a small manifest with every kind of bad case."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.client.extract import extract_manifest, read_provenance

RUNNER = CliRunner()


def _lesion(seed: int, shape=(24, 32, 32), spacing=(1.0, 1.0, 2.0), radius=6.0):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2
    r2 = ((z - c[0]) * spacing[2] / radius) ** 2 + ((y - c[1]) / radius) ** 2 + ((x - c[2]) / radius) ** 2
    mask = (r2 <= 1).astype(np.uint8)
    img = (rng.normal(40, 10 + seed, shape) + 30 * mask).astype(np.int16)
    im, mk = sitk.GetImageFromArray(img), sitk.GetImageFromArray(mask)
    for o in (im, mk):
        o.SetSpacing(spacing)
        o.SetOrigin((-10.0, 5.0, 3.0))
    return im, mk


@pytest.fixture()
def site(tmp_path):
    """A manifest with 4 good cases and 8 bad ones of different kinds."""
    d = tmp_path / "site"
    (d / "img").mkdir(parents=True)
    rows = []

    def add(case_id, image, mask, **extra):
        rows.append({"case_id": case_id, "image": image, "mask": mask, "age": 60, "response": 1, **extra})

    for i in range(4):
        im, mk = _lesion(i)
        sitk.WriteImage(im, str(d / f"img/good{i}.nii.gz"))
        sitk.WriteImage(mk, str(d / f"img/good{i}_mask.nii.gz"))
        add(f"good{i}", f"img/good{i}.nii.gz", f"img/good{i}_mask.nii.gz")
    im, mk = _lesion(9)
    sitk.WriteImage(im, str(d / "img/b.nii.gz"))
    add("missing_image", "img/nothere.nii.gz", "img/good0_mask.nii.gz")
    (d / "img/garbage.nii.gz").write_bytes(os.urandom(500))
    add("garbage_image", "img/garbage.nii.gz", "img/good0_mask.nii.gz")
    small = sitk.RegionOfInterest(mk, [20, 20, 20], [0, 0, 0])
    sitk.WriteImage(small, str(d / "img/small_mask.nii.gz"))
    add("size_mismatch", "img/b.nii.gz", "img/small_mask.nii.gz")
    shifted = sitk.Image(mk)
    shifted.SetOrigin((0.0, 5.0, 3.0))
    sitk.WriteImage(shifted, str(d / "img/shifted_mask.nii.gz"))
    add("origin_mismatch", "img/b.nii.gz", "img/shifted_mask.nii.gz")
    empty = sitk.Image(mk) * 0
    sitk.WriteImage(empty, str(d / "img/empty_mask.nii.gz"))
    add("empty_mask", "img/b.nii.gz", "img/empty_mask.nii.gz")
    add("wrong_label", "img/b.nii.gz", "img/good0_mask.nii.gz", mask_label=2)
    one = sitk.Image(mk) * 0
    one[16, 16, 12] = 1
    sitk.WriteImage(one, str(d / "img/one_mask.nii.gz"))
    add("single_voxel", "img/b.nii.gz", "img/one_mask.nii.gz")
    add("good0", "img/good1.nii.gz", "img/good1_mask.nii.gz")  # duplicate case_id
    df = pd.DataFrame(rows)
    df.loc[df.case_id == "good3", "response"] = None  # missing outcome: warning only
    df["mask_label"] = df["mask_label"].fillna(1).astype(int)
    df.to_csv(d / "manifest.csv", index=False)
    return d / "manifest.csv"


BAD = {"missing_image": "no such file", "garbage_image": "", "size_mismatch": "size differs",
       "origin_mismatch": "origin differs", "empty_mask": "empty", "wrong_label": "label 2 not",
       "single_voxel": "single voxel", "good0": "duplicate"}


def test_site_check_reports_every_problem(site):
    res = RUNNER.invoke(app, ["site", "check", str(site)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    for case, text in BAD.items():
        hits = [ln for ln in lines if ln.split()[1:2] == [case] and "error" in ln]
        assert hits, f"no error line for {case}:\n{res.output}"
        assert any(text in ln for ln in hits), f"{case}: expected {text!r} in {hits}"
    assert any("good3" in ln and "warning" in ln and "response" in ln for ln in lines)
    assert not any(ln.split()[1:2] in (["good1"], ["good2"]) for ln in lines)
    assert "12 rows checked, 3 usable, 9 unusable, 1 warnings" in res.output


def test_site_check_clean_manifest_exits_zero(site, tmp_path):
    df = pd.read_csv(site)
    df[df.case_id.isin(["good1", "good2"])].to_csv(site.parent / "clean.csv", index=False)
    res = RUNNER.invoke(app, ["site", "check", str(site.parent / "clean.csv")])
    assert res.exit_code == 0, res.output
    assert "2 usable, 0 unusable" in res.output


def test_site_check_origin_tolerance_is_configurable(site):
    df = pd.read_csv(site)
    df[df.case_id == "origin_mismatch"].to_csv(site.parent / "one.csv", index=False)
    assert RUNNER.invoke(app, ["site", "check", str(site.parent / "one.csv")]).exit_code == 1
    res = RUNNER.invoke(app, ["site", "check", str(site.parent / "one.csv"), "--origin-tol", "20"])
    assert res.exit_code == 0, res.output


def test_extract_continues_past_bad_cases_and_caches(site, tmp_path):
    out = tmp_path / "features.parquet"
    res = extract_manifest(site, params="ct", out=out, jobs=2, cache_dir=tmp_path / "cache")
    df = pd.read_parquet(out)
    assert sorted(df.case_id) == ["good0", "good1", "good2", "good3"]
    assert res.n_ok == 4 and res.n_cached == 0
    errors = pd.read_csv(tmp_path / "features.errors.csv")
    failed = errors[errors.status == "failed"]
    assert sorted(failed.case_id) == sorted(BAD)
    assert all(isinstance(r, str) and "\n" not in r and len(r) > 10 for r in failed.reason)
    # columns: case_id, pyradiomics features, then clinical columns carried through
    assert df.columns[0] == "case_id"
    feats = [c for c in df.columns if c.startswith(("original_", "log-sigma"))]
    assert len(feats) > 300
    assert list(df.columns[-2:]) == ["age", "response"]
    assert np.isfinite(df[feats].to_numpy(float)).all()
    # tumour volume (a sphere of radius 6 mm, 2 mm slices) is what it should be
    vol = df.loc[df.case_id == "good0", "original_shape_VoxelVolume"].item()
    assert 4 / 3 * np.pi * 6 ** 3 * 0.8 < vol < 4 / 3 * np.pi * 6 ** 3 * 1.2
    prov = read_provenance(out)
    import radiomics

    assert prov["pyradiomics_version"] == radiomics.__version__ and len(prov["params_hash"]) == 64
    assert "binWidth: 25" in prov["params_yaml"]
    # re-run: every good case comes from the cache, values identical
    res2 = extract_manifest(site, params="ct", out=tmp_path / "again.csv", jobs=2, cache_dir=tmp_path / "cache")
    assert res2.n_cached == 4 and res2.n_ok == 4
    again = pd.read_csv(tmp_path / "again.csv", float_precision="round_trip")
    np.testing.assert_array_equal(again[feats].to_numpy(float), df[feats].to_numpy(float))
    # a different parameter file is a different cache key
    res3 = extract_manifest(site, params="mr", out=tmp_path / "mr.parquet", jobs=1, cache_dir=tmp_path / "cache")
    assert res3.n_cached == 0 and res3.n_ok == 4
    # one job runs in this process (no pool): the same values and failures as the two-worker pool, and this
    # process's SimpleITK thread count is left as it was
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    res4 = extract_manifest(site, params="ct", out=tmp_path / "one.parquet", jobs=1, use_cache=False)
    assert res4.n_ok == 4 and res4.n_cached == 0 and res4.n_failed == res.n_failed
    one = pd.read_parquet(tmp_path / "one.parquet").set_index("case_id").loc[df.case_id]
    np.testing.assert_array_equal(one[feats].to_numpy(float), df[feats].to_numpy(float))
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads


def test_failed_run_never_replaces_a_good_file(site, tmp_path):
    out = tmp_path / "features.csv"
    out.write_text("case_id,x\ngood,1\n")
    df = pd.read_csv(site)
    df[df.case_id.isin(["missing_image", "empty_mask"])].to_csv(site.parent / "bad.csv", index=False)
    res = RUNNER.invoke(app, ["site", "extract", str(site.parent / "bad.csv"), "--out", str(out), "--no-cache"])
    assert res.exit_code != 0
    assert "no case" in res.output and "was not written" in res.output
    assert out.read_text() == "case_id,x\ngood,1\n"
    assert sorted(pd.read_csv(tmp_path / "features.errors.csv").case_id) == ["empty_mask", "missing_image"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_params_and_output_give_one_line_errors(site, tmp_path):
    res = RUNNER.invoke(app, ["site", "extract", str(site), "--params", "nope.yaml", "--out", str(tmp_path / "f.csv")])
    assert res.exit_code == 1 and "parameter file nope.yaml not found" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidth: -3\n  noSuchSetting: 1\n")
    res = RUNNER.invoke(app, ["site", "extract", str(site), "--params", str(bad), "--out", str(tmp_path / "f.csv")])
    assert res.exit_code == 1 and "not a valid pyradiomics file" in res.output
    res = RUNNER.invoke(app, ["site", "extract", str(site), "--out", str(tmp_path / "f.xlsx")])
    assert res.exit_code == 1 and "must end in .parquet or .csv" in res.output
    res = RUNNER.invoke(app, ["site", "check", str(tmp_path / "absent.csv")])
    assert res.exit_code == 1 and "not found" in res.output


def test_console_script_runs(site, tmp_path):
    """The installed `fedrad` entry point end to end, as a site operator runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "fedrad")
    df = pd.read_csv(site)
    df[df.case_id.isin(["good1", "good2", "empty_mask"])].to_csv(site.parent / "m.csv", index=False)
    out = tmp_path / "f.parquet"
    proc = subprocess.run([exe, "site", "extract", str(site.parent / "m.csv"), "--out", str(out), "--jobs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 cases extracted" in proc.stdout and "1 failed" in proc.stdout
    assert len(pd.read_parquet(out)) == 2
