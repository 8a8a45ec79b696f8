"""Reporting checklists (server/checklists.py): the METRICS weights and score against hand-worked examples, and
the answers a run decides by itself."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fedrad.server import checklists as cl

#: category weights of METRICS (Kocak et al. 2024, Fig. 3), which the item weights must add up to (4-digit rounding)
CATEGORY_WEIGHTS = {"Study design": 0.2022, "Imaging data": 0.1461, "Segmentation": 0.0674,
                    "Image processing and feature extraction": 0.1348, "Feature processing": 0.0899,
                    "Preparation for modeling": 0.0899, "Metrics and comparison": 0.1348, "Testing": 0.1124,
                    "Open science": 0.0225}


def test_metrics_items_and_weights_are_the_papers():
    assert [i.number for i in cl.METRICS_ITEMS] == list(range(1, 31))
    assert abs(sum(i.weight for i in cl.METRICS_ITEMS) - 1.0) < 1e-12
    for cat, w in CATEGORY_WEIGHTS.items():
        got = sum(i.weight for i in cl.METRICS_ITEMS if i.category == cat)
        assert abs(got - w) <= 1.5e-4, (cat, got, w)
    assert {i.number for i in cl.METRICS_ITEMS if i.conditions} == {8, 9, 10, 12, 14, 15, 16, 17}


def test_metrics_score_reproduces_hand_worked_examples():
    # 1. A hand-crafted radiomics study with manual masks (conditions 1, 3, 4 yes; 2 and 5 no): items 9 and 17 drop
    #    out, so the applicable weight is 1 - 0.0225 - 0.0200 = 0.9575. Answered yes: multi-center (0.0438),
    #    standardized software (0.0311), partitioning (0.0599) and external testing (0.0749) = 0.2097.
    #    Score 0.2097 / 0.9575 = 21.90 % -> "low".
    cond = {"c1": True, "c2": False, "c3": True, "c4": True, "c5": False}
    s = cl.metrics_score({4: True, 12: True, 18: True, 27: True, 3: False}, cond)
    assert s["applicable_weight"] == pytest.approx(0.9575, abs=1e-12)
    assert s["yes_weight"] == pytest.approx(0.2097, abs=1e-12)
    assert s["score"] == pytest.approx(21.9008, abs=1e-4) and s["band"] == "low"
    assert 9 not in s["applicable"] and 17 not in s["applicable"] and len(s["applicable"]) == 28
    # 2. An end-to-end deep-learning study without segmentation (conditions 1-4 no, 5 yes): items 8, 9, 10, 12, 14,
    #    15, 16 drop out (0.0337 + 0.0225 + 0.0112 + 0.0311 + 0.0200 + 0.0200 + 0.0300 = 0.1685), applicable 0.8315;
    #    only item 17 (0.0200) yes: 2.41 % -> "very low"; every applicable item yes: 100 % -> "excellent".
    dl = {"c1": False, "c2": False, "c3": False, "c4": False, "c5": True}
    s = cl.metrics_score({17: True}, dl)
    assert s["applicable_weight"] == pytest.approx(0.8315, abs=1e-12)
    assert s["score"] == pytest.approx(2.4053, abs=1e-4) and s["band"] == "very low"
    assert cl.metrics_score({i: True for i in range(1, 31)}, dl)["score"] == pytest.approx(100.0)
    # 3. A condition left out is "no", as in the online tool: item 9 never counts without condition 2
    assert cl.metrics_score({9: True}, {"c1": True})["yes_weight"] == 0.0
    assert cl.metrics_score({9: True}, {"c1": True, "c2": True})["yes_weight"] == pytest.approx(0.0225)


@pytest.mark.parametrize("score, band", [(0.0, "very low"), (19.999, "very low"), (20.0, "low"), (39.9, "low"),
                                         (40.0, "moderate"), (60.0, "good"), (79.99, "good"), (80.0, "excellent"),
                                         (100.0, "excellent")])
def test_metrics_bands(score, band):
    assert cl.metrics_band(score) == band


def test_metrics_score_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"items 1-30; got item\(s\) \[31\]"):
        cl.metrics_score({31: True}, {})
    with pytest.raises(ValueError, match="conditions are c1"):
        cl.metrics_score({}, {"c6": True})
    with pytest.raises(ValueError, match="percentage"):
        cl.metrics_band(-1.0)


def test_tripod_ai_has_every_item_and_part_once():
    items = [i for i, _, _ in cl.TRIPOD_AI_ITEMS]
    assert len(items) == len(set(items)) == 52
    assert sorted({int(i.rstrip("abcdefg")) for i in items}) == list(range(1, 28))  # the 27 numbered items
    assert [i for i in items if i.startswith("12")] == [f"12{c}" for c in "abcdefg"]
    assert [i for i in items if i.startswith("18")] == [f"18{c}" for c in "abcdef"]
    assert len(cl.TRIPOD_AI_ABSTRACT) == 13


# ----------------------------------------------------------------------------------------------
# the answers a run decides, on a results.json of a real (small, in-process) study
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.test_report import _study_in_process, study_cfg

    tmp = tmp_path_factory.mktemp("checklists")
    s = _study_in_process(tmp, 3, 60, 4, study_cfg({"type": "response", "outcome": "response"}, [0.1]))
    return json.loads(Path(tmp / "results.json").read_text())


def _answers(res) -> dict[int, str]:
    return {i.number: a for i, a, _ in cl.metrics_items(res)}


def test_metrics_answers_follow_what_the_run_did(results):
    base = _answers(results)
    assert base[4] == base[15] == base[18] == base[27] == base[21] == "yes"
    # feature tables from the sites: the extraction items are the authors'
    assert base[11] == base[12] == base[13] == base[23] == "authors"
    assert base[14] == "no" and base[26] == "no" and base[17] == "not applicable" and base[9] == "authors"
    # sites that extracted with a parameter file of their own (only its hash is known) and filtered by ICC
    res = copy.deepcopy(results)
    res["provenance"]["params_hash"] = "ab" * 32
    res["provenance"]["config"]["selection"]["icc_threshold"] = 0.75
    got = _answers(res)
    assert got[12] == got[23] == got[14] == "yes" and got[11] == got[13] == "authors"
    # ... or with one of fedrad's shipped files, whose settings the report prints
    from fedrad.client.extract import SHIPPED_PARAMS, params_digest, shipped_params

    res["provenance"]["params_hash"] = params_digest(SHIPPED_PARAMS["ct-original"])
    res["provenance"]["params"] = shipped_params(res["provenance"]["params_hash"])
    got = _answers(res)
    assert got[11] == got[12] == got[13] == got[23] == got[14] == "yes"
    low = cl.metrics_summary(res)["low"]
    added = sum(i.weight for i in cl.METRICS_ITEMS if i.number in (11, 12, 13, 14, 23))
    assert low["yes_weight"] == pytest.approx(cl.metrics_summary(results)["low"]["yes_weight"] + added, abs=1e-12)
    # no redundancy filter, too few events per selected feature, a single centre without held-out sites
    res = copy.deepcopy(results)
    res["provenance"]["config"]["selection"]["redundancy"] = None
    res["signature"] = [f"f{j}" for j in range(40)]
    res["sites"] = {"site1": res["sites"][sorted(res["sites"])[0]]}
    res["external"] = {}
    got = _answers(res)
    assert got[15] == "no" and got[16] == "authors" and got[4] == "no" and got[18] == "no" and got[27] == "no"
    text = next(h for i, _, h in cl.metrics_items(res) if i.number == 16)
    n = min(res["sites"]["site1"]["n_events"], res["sites"]["site1"]["n_nonevents"])
    assert text.startswith(f"{n / 40:.1f} outcome events in the smaller class per selected feature")


def test_metrics_bounds_bracket_the_runs_answers(results):
    s = cl.metrics_summary(results)
    assert s["n_yes"] + s["n_no"] + s["n_authors"] + 1 == 30  # item 17 does not apply
    assert 0 < s["low"]["score"] < s["high"]["score"] <= 100
    # the upper bound misses only the weight of the items the run answered "no"
    no_weight = sum(i.weight for i, a, _ in cl.metrics_items(results) if a == "no")
    assert s["high"]["yes_weight"] == pytest.approx(s["high"]["applicable_weight"] - no_weight, abs=1e-12)


def test_tripod_ai_items_follow_what_the_run_did(results):
    rows = {r[0]: r for r in cl.tripod_ai_items(results)}
    assert set(rows) == {i for i, _, _ in cl.TRIPOD_AI_ITEMS}
    assert rows["12d"][2] == rows["23b"][2] == "reported here"
    assert f"I² {100 * results['pooled']['radiomics']['i2']:.0f}%" in rows["23b"][3]
    res = copy.deepcopy(results)
    res["external"] = {}
    res["missing_sites"] = {"site9": "no answer"}
    rows = {r[0]: r for r in cl.tripod_ai_items(res)}
    assert rows["12d"][2] == rows["23b"][2] == rows["12g"][2] == "not applicable"
    assert "site9 (no answer)" in rows["20a"][3] and rows[""][3] == "site9 (no answer)"


def test_shipped_parameter_files_are_recognized_by_their_hash():
    from fedrad.client.extract import SHIPPED_PARAMS, params_digest, shipped_params

    got = shipped_params(params_digest(SHIPPED_PARAMS["mr"]))
    assert got["file"] == "mr.yaml (fedrad --params mr)"
    assert got["settings"]["normalize"] is True and got["settings"]["normalizeScale"] == 100
    ct = shipped_params(params_digest(SHIPPED_PARAMS["ct-original"]))
    assert ct["settings"]["binWidth"] == 25 and ct["settings"]["resegmentRange"] == [-1000, 400]
    assert ct["image_types"] == ["Original"] and "glcm" in ct["feature_classes"]
    assert shipped_params("0" * 64) is None and shipped_params(None) is None
