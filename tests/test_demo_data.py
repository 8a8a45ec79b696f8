"""Tests for the synthetic multi-site demo cohort (fedrad.client.demo_data)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedrad.client.demo_data import MANIFEST_COLUMNS, SCANNER_COLUMN, simulate_demo_table, write_demo_cohort

N_SITES, N_PATIENTS = 3, 12


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_cohort(out, n_sites=N_SITES, n_patients=N_PATIENTS, seed=0)


@pytest.fixture(scope="module")
def cases(cohort) -> pd.DataFrame:
    """All manifest rows with the site, the images read back and the ground truth joined."""
    out, manifests = cohort
    frames = []
    for manifest in manifests:
        df = pd.read_csv(manifest)
        df["site"] = manifest.parent.name
        df["image_itk"] = [sitk.ReadImage(str(manifest.parent / p)) for p in df["image"]]
        df["mask_itk"] = [sitk.ReadImage(str(manifest.parent / p)) for p in df["mask"]]
        frames.append(df)
    truth = pd.read_csv(out / "truth.csv").drop(columns="site")
    return pd.concat(frames, ignore_index=True).merge(truth, on="case_id", validate="one_to_one")


@pytest.fixture(scope="module")
def big_table() -> pd.DataFrame:
    return simulate_demo_table(n_sites=3, n_patients=200, seed=0)


def _lesion_hu(row) -> np.ndarray:
    return sitk.GetArrayFromImage(row.image_itk)[sitk.GetArrayFromImage(row.mask_itk) == 1].astype(float)


def _harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among comparable pairs (earlier time is an event), the earlier one has higher risk."""
    earlier = (time[:, None] < time[None, :]) & (event[:, None] == 1)
    concordant = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float((concordant * earlier).sum() / earlier.sum())


def test_layout_and_manifest_columns(cohort):
    out, manifests = cohort
    assert manifests == [out / f"site{k}" / "manifest.csv" for k in range(1, N_SITES + 1)]
    assert (out / "README.txt").read_text().startswith("fedrad synthetic demo cohort")
    assert "a real site would never have it" in (out / "README.txt").read_text()
    all_ids = []
    for manifest in manifests:
        df = pd.read_csv(manifest)
        assert tuple(df.columns) == MANIFEST_COLUMNS
        assert len(df) == N_PATIENTS
        assert df["case_id"].str.startswith(f"{manifest.parent.name}-p").all()
        assert (df["mask_label"] == 1).all()
        assert set(df["sex"]) <= {"F", "M"}
        assert df["stage"].between(1, 4).all() and df["stage"].dtype.kind == "i"
        assert set(df["response"]) <= {0, 1} and set(df["os_event"]) <= {0, 1}
        assert (df["os_time"] > 0).all() and df["age"].between(25, 90).all()
        for column in ("image", "mask"):
            assert not any(Path(p).is_absolute() for p in df[column])
            assert all((manifest.parent / p).is_file() for p in df[column])
        all_ids += list(df["case_id"])
    assert len(set(all_ids)) == N_SITES * N_PATIENTS
    truth = pd.read_csv(out / "truth.csv")
    assert list(truth["case_id"]) == all_ids
    assert {"aggressiveness", "heterogeneity", "lp_response", "lp_hazard"} <= set(truth.columns)


def test_manifests_match_table_helper(cohort):
    _, manifests = cohort
    table = simulate_demo_table(N_SITES, N_PATIENTS, seed=0)
    written = pd.concat([pd.read_csv(m) for m in manifests], ignore_index=True)
    columns = ["case_id", "age", "sex", "stage", "response", "os_time", "os_event"]
    pd.testing.assert_frame_equal(written[columns], table[columns], check_dtype=False)


def test_image_mask_geometry_and_lesion_placement(cases):
    for row in cases.itertuples():
        image, mask = row.image_itk, row.mask_itk
        assert image.GetSize() == mask.GetSize()
        assert image.GetSpacing() == mask.GetSpacing()
        assert image.GetOrigin() == mask.GetOrigin()
        assert image.GetDirection() == mask.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert image.GetPixelID() == sitk.sitkInt16 and mask.GetPixelID() == sitk.sitkUInt8
        assert 30 <= image.GetSize()[0] == image.GetSize()[1] <= 128 and 10 <= image.GetSize()[2] <= 80

        labels = sitk.GetArrayFromImage(mask)  # (z, y, x)
        assert set(np.unique(labels)) == {0, 1}
        spacing_zyx = np.array(image.GetSpacing())[::-1]
        index = np.argwhere(labels == 1)
        to_low = index.min(axis=0) * spacing_zyx
        to_high = (np.array(labels.shape) - 1 - index.max(axis=0)) * spacing_zyx
        assert min(to_low.min(), to_high.min()) >= 10.0, row.case_id

        volume = len(index) * np.prod(spacing_zyx)
        diameter = (6.0 * volume / np.pi) ** (1 / 3)
        assert diameter == pytest.approx(row.diameter_mm, rel=0.05), row.case_id
        assert 0 < np.median(_lesion_hu(row)) < 110  # CT-like soft-tissue lesion after the site's scale/offset
        background = sitk.GetArrayFromImage(image)[labels == 0]
        assert -150 < np.median(background) < 70 and background.min() < -60  # soft tissue with some fat


def test_spacing_differs_between_sites_as_designed(cases):
    spacing = cases.groupby("site")["image_itk"].agg(lambda s: sorted({im.GetSpacing() for im in s}))
    assert all(len(v) == 1 for v in spacing)  # one scanner protocol per site
    per_site = [v[0] for v in spacing]
    assert len(set(per_site)) == N_SITES
    for x, y, z in per_site:
        assert x == y and 0.7 <= x <= 1.0 and 1.0 <= z <= 3.0


def test_site_batch_effect_in_lesion_intensity(cases):
    mean_hu = cases.assign(mean_hu=[_lesion_hu(r).mean() for r in cases.itertuples()])
    groups = [g["mean_hu"].to_numpy() for _, g in mean_hu.groupby("site")]
    assert stats.f_oneway(*groups).pvalue < 1e-3


def test_images_express_biology(cases):
    """Aggressive lesions are less round; heterogeneous lesions have a larger intensity spread (within site)."""
    roundness = []
    for row in cases.itertuples():
        shape = sitk.LabelShapeStatisticsImageFilter()
        shape.ComputePerimeterOn()
        shape.Execute(row.mask_itk)
        roundness.append(shape.GetRoundness(1))
    assert stats.spearmanr(roundness, cases["aggressiveness"]).statistic < -0.4

    spread = cases.assign(sd=[_lesion_hu(r).std() for r in cases.itertuples()])
    spread["sd_z"] = spread.groupby("site")["sd"].transform(lambda s: (s - s.mean()) / s.std())
    assert stats.spearmanr(spread["sd_z"], spread["heterogeneity"]).statistic > 0.3


def test_deterministic_and_seed_dependent(tmp_path, cohort, capfd):
    def run(name: str, seed: int) -> list[Path]:
        return write_demo_cohort(tmp_path / name, n_sites=N_SITES, n_patients=3, seed=seed, progress=False)

    def arrays(manifest: Path, n: int = 3) -> list[np.ndarray]:
        """Voxel arrays of the first ``n`` images and masks of a manifest."""
        df = pd.read_csv(manifest).head(n)
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / p)))
                for p in list(df["image"]) + list(df["mask"])]

    first, second, other = run("a", 0), run("b", 0), run("c", 1)
    assert capfd.readouterr() == ("", "")  # progress=False prints nothing
    for m1, m2, m3, full in zip(first, second, other, cohort[1]):
        assert m1.read_bytes() == m2.read_bytes()
        assert m1.read_bytes() != m3.read_bytes()
        a1, a2, a3 = arrays(m1), arrays(m2), arrays(m3)
        assert all(np.array_equal(x, y) for x, y in zip(a1, a2))
        assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a1, a3))
        # The first patients do not depend on how many patients a site has.
        pd.testing.assert_frame_equal(pd.read_csv(m1), pd.read_csv(full).head(3))
        assert all(np.array_equal(x, y) for x, y in zip(a1, arrays(full)))
    assert (tmp_path / "a" / "truth.csv").read_bytes() == (tmp_path / "b" / "truth.csv").read_bytes()


def test_progress_bar(tmp_path, capsys):
    write_demo_cohort(tmp_path, n_sites=1, n_patients=2, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "writing demo cohort" in err and "2/2" in err


def test_existing_nonempty_site_dir_raises(tmp_path):
    (tmp_path / "site2").mkdir()
    (tmp_path / "site2" / "manifest.csv").write_text("old\n")
    with pytest.raises(FileExistsError, match=r"site2 already exists and is not empty; pass an empty --out"):
        write_demo_cohort(tmp_path, n_sites=2, n_patients=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site2"]  # nothing written before the check


def test_existing_empty_site_dir_is_used(tmp_path):
    (tmp_path / "site1").mkdir()
    manifests = write_demo_cohort(tmp_path, n_sites=1, n_patients=1)
    assert manifests == [tmp_path / "site1" / "manifest.csv"] and manifests[0].is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_interrupted_run_leaves_no_partial_site(tmp_path, monkeypatch):
    import fedrad.client.demo_data as demo_data

    render, calls = demo_data._render, []

    def failing_render(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args)

    monkeypatch.setattr(demo_data, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_demo_cohort(tmp_path, n_sites=2, n_patients=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site1"]  # complete; site2 never appears half-written
    assert len(pd.read_csv(tmp_path / "site1" / "manifest.csv")) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_sites": 0}, "n_sites must be an integer >= 1, got 0"),
    ({"n_patients": 0}, "n_patients must be an integer >= 1, got 0"),
    ({"n_patients": 2.5}, "n_patients must be an integer >= 1, got 2.5"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"scanners_per_site": 0}, "scanners_per_site must be an integer >= 1, got 0"),
])
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_demo_cohort(tmp_path, **{"n_sites": 1, "n_patients": 1, **kwargs})
    with pytest.raises(ValueError, match=message):
        simulate_demo_table(**{"n_sites": 1, "n_patients": 1, **kwargs})
    assert not any(tmp_path.iterdir())


def test_table_rows_do_not_depend_on_cohort_size():
    small = simulate_demo_table(n_sites=2, n_patients=5, seed=3)
    large = simulate_demo_table(n_sites=2, n_patients=9, seed=3)
    pd.testing.assert_frame_equal(small, large.groupby("site").head(5).reset_index(drop=True))


def test_outcomes_plausible(big_table):
    assert set(big_table["response"]) == {0, 1} and set(big_table["os_event"]) == {0, 1}
    assert 0.25 <= 1 - big_table["os_event"].mean() <= 0.45
    assert set(big_table["stage"]) == {1, 2, 3, 4}
    assert 3.0 < big_table["os_time"].median() < 60.0


def test_response_depends_on_biology_beyond_volume(big_table):
    biology = big_table[["aggressiveness", "heterogeneity"]].to_numpy()
    y = big_table["response"].to_numpy()
    fitted = LogisticRegression().fit(biology, y).predict_proba(biology)[:, 1]
    auc_biology = roc_auc_score(y, fitted)
    auc_volume = roc_auc_score(y, -big_table["diameter_mm"])
    assert auc_biology > 0.7
    assert auc_biology > auc_volume + 0.08


def test_survival_model_identifiable(big_table):
    time, event = big_table["os_time"].to_numpy(), big_table["os_event"].to_numpy()
    c_true = _harrell_c(time, event, big_table["lp_hazard"].to_numpy())
    c_volume = _harrell_c(time, event, big_table["diameter_mm"].to_numpy())
    assert 0.66 <= c_true <= 0.78
    assert c_true > c_volume + 0.05


# ----------------------------------------------------------------------------------------------
# scanners_per_site: the default is unchanged, two scanners per site share models across sites
# ----------------------------------------------------------------------------------------------
# Digests of the default output, computed with the code before scanners_per_site existed (commit dd1914d). They
# must not change when demo_data gains an option; only a dependency that renders differently (numpy, scipy,
# SimpleITK) may move the voxel digest, and then every pinned demo number moves with it.
_PINNED_TEXT_FILES = "2e31eba63b216577e6afacffef86ff1ebc2ac70aa0c19b94ab887549c72cace6"  # README, truth, manifests
_PINNED_VOXELS = "4fca035a07427300b91e2239871a50c65cfc2ef0284aaeb2d7752ef5965b2958"      # arrays + geometry
_PINNED_TABLE_5x100 = "c11b166f076c219eb741fbbb958dcb96bc6a0e924de5a031f117aa7d4e866efe"  # simulate_demo_table(5, 100)


def test_default_output_unchanged_by_the_scanner_option(cohort):
    out, manifests = cohort  # write_demo_cohort(out, 3, 12, seed=0), no scanners_per_site
    text = hashlib.sha256()
    for path in [out / "README.txt", out / "truth.csv", *manifests]:
        text.update(path.read_bytes())
    assert text.hexdigest() == _PINNED_TEXT_FILES
    voxels = hashlib.sha256()
    for manifest in manifests:
        df = pd.read_csv(manifest)
        assert SCANNER_COLUMN not in df.columns
        for p in list(df["image"]) + list(df["mask"]):
            image = sitk.ReadImage(str(manifest.parent / p))
            voxels.update(sitk.GetArrayFromImage(image).tobytes())
            voxels.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    assert voxels.hexdigest() == _PINNED_VOXELS
    table = simulate_demo_table(5, 100, seed=0)
    assert hashlib.sha256(table.to_csv(index=False).encode()).hexdigest() == _PINNED_TABLE_5x100
    pd.testing.assert_frame_equal(simulate_demo_table(5, 100, seed=0, scanners_per_site=1), table)


def test_two_scanners_per_site_share_models_across_sites():
    table = simulate_demo_table(5, 100, seed=0, scanners_per_site=2)  # the default cohort size
    per_site = table.groupby("site")[SCANNER_COLUMN].nunique()
    assert (per_site == 2).all()
    sites_per_model = table.groupby(SCANNER_COLUMN)["site"].nunique()
    assert len(sites_per_model) == 4 and (sites_per_model >= 2).all()  # 4 models over 5 sites
    assert table.groupby(["site", SCANNER_COLUMN]).size().min() >= 10
    # the patients are those of the default cohort; only the scanner that imaged them is added
    pd.testing.assert_frame_equal(table.drop(columns=SCANNER_COLUMN), simulate_demo_table(5, 100, seed=0))
    assert list(table.columns).index(SCANNER_COLUMN) == list(table.columns).index("case_id") + 1


def test_two_scanner_cohort_files(tmp_path):
    manifests = write_demo_cohort(tmp_path, n_sites=3, n_patients=6, seed=0, scanners_per_site=2)
    table = simulate_demo_table(3, 6, seed=0, scanners_per_site=2)
    spacing = {}
    for manifest in manifests:
        df = pd.read_csv(manifest)
        assert tuple(df.columns) == MANIFEST_COLUMNS + (SCANNER_COLUMN,)
        for row in df.itertuples():
            image = sitk.ReadImage(str(manifest.parent / row.image))
            spacing.setdefault(row.scanner, set()).add(image.GetSpacing())
    written = pd.concat([pd.read_csv(m) for m in manifests], ignore_index=True)
    assert list(written[SCANNER_COLUMN]) == list(table[SCANNER_COLUMN])
    assert all(len(v) == 1 for v in spacing.values())  # a scanner model has one protocol at every site
    assert len({next(iter(v)) for v in spacing.values()}) == len(spacing)
    truth = pd.read_csv(tmp_path / "truth.csv")
    assert list(truth[SCANNER_COLUMN]) == list(table[SCANNER_COLUMN])
    readme = (tmp_path / "README.txt").read_text()
    assert "Each site runs 2 scanners" in readme and "scannerA" in readme


def test_cli_scanners_per_site(tmp_path):
    from typer.testing import CliRunner

    from fedrad.cli import app

    result = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--sites", "2", "--patients", "2",
                                      "--scanners-per-site", "2"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "site1" / "manifest.csv")
    assert df[SCANNER_COLUMN].str.startswith("scanner").all()
