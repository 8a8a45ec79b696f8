"""fedrad's extraction path reproduces pyradiomics' published baseline values for its five test cases.

The baseline CSVs in ../shared/data/pyradiomics-cases/baseline hold, per feature class and per case variant
(plain, normalization, resampling, resegmentation, 2D, FBN, ...), the settings used and the expected values.
Each distinct (case, settings) pair is extracted once through ``fedrad.client.extract.extract_case`` (image
read, normalization outside pyradiomics, crop, pyradiomics) and every feature must agree within 1e-3 relative.
The largest deviations (up to 9e-4, brain1 mesh-based shape features) are pyradiomics 3.0.1's own against its
2018 baseline: plain pyradiomics on the uncropped files gives bit-identical values to fedrad's path there.
"""
from __future__ import annotations

import ast
import math
from collections import defaultdict

import yaml

from fedrad.client.extract import _make_worker, extract_case
from fedrad.client.manifest import Case
from tests.conftest import shared_path

CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
CLASSES = ("firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm", "shape")


def _baseline_groups():
    import pandas as pd

    base = shared_path("pyradiomics-cases", "baseline")
    groups: dict[tuple[str, str], dict] = {}
    for cls in CLASSES:
        df = pd.read_csv(base / f"baseline_{cls}.csv").set_index("featureName")
        for col in df.columns:
            case = col.split("_")[0]
            settings = ast.literal_eval(df.loc["diagnostics_Configuration_Settings", col])
            types = ast.literal_eval(df.loc["diagnostics_Configuration_EnabledImageTypes", col])
            key = (case, repr(sorted(settings.items())) + repr(types))
            g = groups.setdefault(key, {"case": case, "variant": col, "settings": settings, "types": types,
                                        "classes": set(), "expected": {}})
            g["classes"].add(cls)
            for name, value in df[col].items():
                if name.startswith("original_") and not (isinstance(value, float) and math.isnan(value)):
                    g["expected"][name] = float(value)
    return list(groups.values())


def test_baseline_values_reproduced(tmp_path):
    data = shared_path("pyradiomics-cases")
    groups = _baseline_groups()
    assert len(groups) >= 20
    n_checked = 0
    worst = defaultdict(float)
    for i, g in enumerate(groups):
        settings = {k: v for k, v in g["settings"].items() if v is not None}
        settings["additionalInfo"] = False
        params = {"setting": settings, "imageType": g["types"], "featureClass": {c: None for c in g["classes"]}}
        path = tmp_path / f"p{i}.yaml"
        path.write_text(yaml.safe_dump(params))
        case = Case(case_id=g["variant"], image=data / f"{g['case']}_image.nrrd",
                    mask=data / f"{g['case']}_label.nrrd", label=1, roi=None, timepoint=None)
        got = extract_case(case, _make_worker(path))
        for name, expected in g["expected"].items():
            assert name in got, f"{g['variant']}: {name} missing"
            rel = abs(got[name] - expected) / max(abs(expected), 1e-9)
            worst[g["variant"]] = max(worst[g["variant"]], rel)
            assert rel <= 1e-3, f"{g['variant']} {name}: fedrad {got[name]!r} vs baseline {expected!r} (rel {rel:.2e})"
            n_checked += 1
    print(f"baseline: {n_checked} values in {len(groups)} case variants, worst relative deviation "
          f"{max(worst.values()):.2e}")
    assert n_checked > 1000
