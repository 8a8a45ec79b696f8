"""Cropping before filtering leaves every feature value equal to uncropped pyradiomics (<= 1e-6 relative)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml

from fedrad.client.extract import SHIPPED_PARAMS, _make_worker, crop_plan, extract_case
from fedrad.client.manifest import Case
from tests.conftest import shared_path


def _uncropped(image, mask, params: dict, huge_pad: bool):
    """Plain pyradiomics on the full image (padDistance huge when it resamples: no crop at all)."""
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    params = {**params, "setting": {**params["setting"]}}
    if huge_pad:
        params["setting"]["padDistance"] = 1000
    ex = featureextractor.RadiomicsFeatureExtractor(params)
    return {k: float(v) for k, v in ex.execute(str(image), str(mask)).items() if not k.startswith("diagnostics")}


def _max_rel(a: dict, b: dict) -> tuple[float, str]:
    assert set(a) == set(b)
    worst = max(((abs(a[k] - b[k]) / max(abs(b[k]), 1e-12), k) for k in a), key=lambda t: t[0])
    return worst


def _compare(tmp_path, case_name: str, params: dict, huge_pad: bool):
    data = shared_path("pyradiomics-cases")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    case = Case(case_name, data / f"{case_name}_image.nrrd", data / f"{case_name}_label.nrrd", 1, None, None)
    got = extract_case(case, _make_worker(path))
    ref = _uncropped(case.image, case.mask, params, huge_pad)
    return got, ref


def test_crop_equals_uncropped_lung_ct_with_filters(tmp_path):
    """The shared measurement's setting: lung1 CT, Original + LoG sigma 1, 3 mm + wavelet, no resampling."""
    params = {"setting": {"binWidth": 25, "additionalInfo": False},
              "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 3.0]}, "Wavelet": {}},
              "featureClass": {c: None for c in ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")}}
    got, ref = _compare(tmp_path, "lung1", params, huge_pad=False)
    rel, name = _max_rel(got, ref)
    print(f"lung1 crop vs uncropped: {len(got)} features, max relative deviation {rel:.2e} ({name})")
    assert len(got) > 900
    assert rel <= 1e-6, name


def test_crop_margin_comes_from_filters():
    plan = crop_plan({"Original": {}, "LoG": {"sigma": [1.0, 3.0]}}, {"padDistance": 5}, (0.5, 0.5, 5.0))
    assert plan.margin.tolist() == [73, 73, 9]  # 12 sigma = 36 mm over each axis' spacing, + 1
    plan = crop_plan({"Original": {}}, {"padDistance": 5}, (0.5, 0.5, 5.0))
    assert plan.margin.tolist() == [1, 1, 1]
    wav = crop_plan({"Wavelet": {"level": 2}}, {}, (1.0, 1.0, 1.0))
    assert wav.margin.tolist() == [13, 13, 13]  # 2 levels x (coif1 length 6 - 1) + 2, + 1
    assert crop_plan({"Square": {}}, {}, (1.0, 1.0, 1.0)).margin is None
    res = crop_plan({"LoG": {"sigma": [3.0]}}, {"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkLinear",
                                                  "padDistance": 5}, (0.5, 0.5, 2.0))
    assert res.pad_distance == 37 and not res.crop_mask


@pytest.mark.parametrize("case_name,kind", [("brain1", "mr"), ("breast1", "mr"), ("lung2", "ct")])
def test_crop_equals_uncropped_with_shipped_params(tmp_path, case_name, kind):
    """Shipped parameter files (resampling to 1 mm, LoG, normalization for MR) vs no crop at all."""
    params = yaml.safe_load(SHIPPED_PARAMS[kind].read_text())
    got, ref = _compare(tmp_path, case_name, params, huge_pad=True)
    rel, name = _max_rel(got, ref)
    print(f"{case_name} ({kind} params) crop vs uncropped: {len(got)} features, max rel deviation {rel:.2e}")
    assert rel <= 1e-6, name
    assert np.isfinite(list(got.values())).all()
