"""study.toml validation: every key of DEFAULTS (outside [sites]) refuses wrong types and out-of-range values with
a one-line error naming the key, and the shipped and documented studies still validate."""
from __future__ import annotations

import textwrap
import tomllib

import pytest

import fedrad.server.study_config as sc
from fedrad.server.study_config import DEFAULTS, StudyConfigError, _merge, load_study, validate

BAD = [
    ("study", "name", "3"), ("study", "name", '""'), ("study", "output", "[\"a\"]"),
    ("study", "min_sites", "1"), ("study", "min_sites", "true"), ("study", "min_sites", "2.0"),
    ("study", "min_sites", '"3"'),
    ("endpoint", "type", '"binary"'), ("endpoint", "type", "1"), ("endpoint", "outcome", "1"),
    ("endpoint", "time", '["os_time"]'), ("endpoint", "event", '""'),
    ("harmonization", "enabled", '"yes"'), ("harmonization", "enabled", "1"),
    ("harmonization", "parametric", '"true"'), ("harmonization", "mean_only", '"false"'),
    ("harmonization", "covariates", '"age"'), ("harmonization", "categorical", "[1]"),
    ("selection", "feature_prefixes", '"original_"'), ("selection", "feature_prefixes", '[""]'),
    ("selection", "feature_prefixes", '["original_", 2]'),
    ("selection", "feature_columns", '"original_*"'), ("selection", "exclude", "[1]"),
    ("selection", "max_missing", "1"), ("selection", "max_missing", "-0.1"), ("selection", "max_missing", '"0.2"'),
    ("selection", "fdr", '"0.05"'), ("selection", "fdr", "0"), ("selection", "fdr", "1.5"),
    ("selection", "fdr", "nan"), ("selection", "fdr", "true"),
    ("selection", "redundancy", "1.1"), ("selection", "redundancy", '"0.9"'),
    ("selection", "max_features", "0"), ("selection", "max_features", "2.5"), ("selection", "max_features", "true"),
    ("selection", "icc_threshold", "0"), ("selection", "icc_threshold", '"0.9"'), ("selection", "icc_threshold", "inf"),
    ("model", "type", '"cox"'), ("model", "type", '"linear"'), ("model", "type", '"svm"'), ("model", "penalty", '"l3"'),
    ("model", "l1_ratio", "2"), ("model", "l1_ratio", '"0.5"'), ("model", "l1_ratio", "-0.1"),
    ("model", "grid", "[true]"), ("model", "grid", "[]"), ("model", "grid", "[0.1, -1]"),
    ("model", "grid", '["0.1"]'), ("model", "grid", "0.1"), ("model", "grid", "[0.1, inf]"),
    ("model", "path_size", "2"), ("model", "path_size", "12.0"), ("model", "path_size", "51"),
    ("model", "path_size", "true"), ("model", "path_decades", "0"), ("model", "path_decades", "7"),
    ("model", "path_decades", '"3"'),
    ("model", "clinical", '"age"'), ("model", "volume", '""'), ("model", "volume", "3"),
    ("validation", "loso", '"no"'), ("validation", "loso", "0"),
    ("validation", "inner_folds", "2.9"), ("validation", "inner_folds", "1"), ("validation", "inner_folds", "true"),
    ("validation", "seed", "1.5"), ("validation", "seed", '"0"'), ("validation", "seed", "false"),
    ("validation", "km_times", "[-1, 3, 6]"), ("validation", "km_times", "[0, 6, 3]"),
    ("validation", "km_times", "[0, 3, 3]"), ("validation", "km_times", "[]"),
    ("validation", "km_times", '"0,6,12"'), ("validation", "km_times", "[0, true]"),
    ("validation", "dca_horizon", "0"), ("validation", "dca_horizon", "-3"), ("validation", "dca_horizon", '"12"'),
    ("validation", "dca_horizon", "true"), ("validation", "dca_horizon", "inf"),
    ("validation", "dca_horizon", "12"),  # the default endpoint is a binary response: no horizon
    ("harmonization", "batch", '""'), ("harmonization", "batch", "3"),
    ("harmonization", "batch", '["scanner"]'), ("harmonization", "batch", '["kernel", "kernel"]'),
    ("harmonization", "batch", '["kernel", 3]'),
    ("harmonization", "shared_batches", "1"), ("harmonization", "covbat", '"yes"'),
    ("harmonization", "covbat_percent_var", "1.5"), ("harmonization", "covbat_percent_var", "0"),
    ("harmonization", "covbat_n_pc", "-1"), ("harmonization", "covbat_n_pc", "2.5"),
    ("harmonization", "smooth", '"age"'), ("harmonization", "smooth", "{ age = [50, 40] }"),
    ("harmonization", "smooth", '{ age = [20, "x", 90] }'), ("harmonization", "smooth_alphas", "[-1]"),
    ("harmonization", "smooth", "{ age = { knots = 0, range = [20, 90] } }"),
    ("harmonization", "smooth", "{ age = { knots = 3, range = [90, 20] } }"),
    ("harmonization", "smooth", "{ age = { knots = 3 } }"),
    ("study", "kind", '"radiogenomics"'), ("association", "markers", '"immune_score"'),
    ("association", "volume_adjusted", '"yes"'), ("association", "discovery", "[1]"),
    ("association", "replication", '"site1"'), ("association", "fdr", "0"), ("association", "fdr", "2"),
    ("association", "top", "0"), ("association", "top", "2.5"),
    ("coordinator", "key", '"ssh-rsa AAAAB3NzaC1yc2E"'), ("coordinator", "key", "1"),
    ("coordinator", "key", '"ssh-ed25519 AAAAnotbase64!"'), ("selection", "allow", '"T"'), ("selection", "allow", "[1]"),
]


def test_every_key_of_defaults_has_bad_values_tested():
    tested = {(section, key) for section, key, _ in BAD}
    every = {(section, key) for section, values in DEFAULTS.items() if section != "sites" for key in values}
    assert every - tested == set()


@pytest.mark.parametrize(("section", "key", "value"), BAD, ids=[f"{s}.{k}={v}" for s, k, v in BAD])
def test_bad_value_is_refused_naming_the_key(section, key, value):
    user = tomllib.loads(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(StudyConfigError) as error:
        validate(_merge(user))
    message = str(error.value)
    assert message.startswith(f"[{section}] {key}"), message
    assert "\n" not in message
    print(message)


def test_a_bad_value_from_a_file_names_the_key(tmp_path):
    study = tmp_path / "study.toml"
    study.write_text('[study]\nname = "x"\n[selection]\nfdr = "0.05"\n')
    with pytest.raises(StudyConfigError, match=r'^\[selection\] fdr = "0.05": write a finite number in \(0, 1\] '
                                               r"without quotes, e\.g\. fdr = 0\.05$"):
        load_study(study)
    study.write_text('[validation]\nloso = "no"\n')
    with pytest.raises(StudyConfigError, match=r'^\[validation\] loso = "no": write loso = true or loso = false'):
        load_study(study)


def test_docstring_example_validates(tmp_path):
    block = textwrap.dedent(sc.__doc__.split("::\n", 1)[1])
    (tmp_path / "study.toml").write_text(block)
    cfg = load_study(tmp_path / "study.toml")
    assert cfg["validation"]["km_times"] == [0, 3, 6, 12, 24, 36, 60]
    assert cfg["model"]["type"] == "logistic" and len(cfg["sites"]) == 3
    assert cfg["harmonization"]["covariates"] == ["age", "sex"]


def test_association_study_rules():
    ok = {"study": {"kind": "association"}, "association": {"markers": ["immune_score"]},
          "model": {"clinical": ["age"]}}
    assert validate(_merge(ok))["association"]["markers"] == ["immune_score"]
    for user, message in [
        ({"study": {"kind": "association"}}, r"needs \[association\] markers"),
        ({**ok, "association": {"markers": ["age"]}}, r"both name age"),
        ({**ok, "association": {"markers": ["x", "x"]}}, r"lists a column twice"),
        ({**ok, "association": {"markers": ["x"], "discovery": ["a"], "replication": ["a"]}}, r"both list a"),
        ({**ok, "association": {"markers": ["x"], "replication": ["a"]}}, r"needs discovery"),
        ({**ok, "sites": {"a": {}, "b": {}}, "association": {"markers": ["x"], "discovery": ["c"]}},
         r"site\(s\) c that \[sites\] does not list"),
    ]:
        with pytest.raises(StudyConfigError, match=message):
            validate(_merge(user))


def test_batch_column_rules():
    cfg = validate(_merge({"harmonization": {"batch": "scanner", "covariates": ["age"]}}))
    assert cfg["harmonization"]["batch"] == "scanner"
    from fedrad.common.plan import named_columns, study_plan

    assert "scanner" in named_columns(study_plan(cfg)["study"])  # never a feature
    assert "batch" not in study_plan(validate(_merge({})))["study"]["harmonization"]  # ids of plans without it
    with pytest.raises(StudyConfigError, match="also a covariate"):
        validate(_merge({"harmonization": {"batch": "age", "covariates": ["age"]}}))
    with pytest.raises(StudyConfigError, match="also a covariate or the batch; a smooth term replaces"):
        validate(_merge({"harmonization": {"covariates": ["age"], "smooth": {"age": [20, 50, 90]}}}))
    gam = study_plan(validate(_merge({"harmonization": {"smooth": {"age": [20, 50, 90]}}})))["study"]
    assert "age" in named_columns(gam)  # a smooth covariate is a required column, never a feature
    nested = study_plan(validate(_merge({"harmonization": {"batch": ["scanner", "kernel"]}})))["study"]
    assert {"scanner", "kernel"} <= named_columns(nested)
    from fedrad.common.plan import combat_passes

    assert [p["batch_col"] for p in combat_passes(nested["harmonization"])] == ["scanner", "kernel"]
    with pytest.raises(StudyConfigError, match="'age' is also a covariate"):
        validate(_merge({"harmonization": {"batch": ["scanner", "age"], "covariates": ["age"]}}))
    with pytest.raises(StudyConfigError, match="shared_batches = true needs batch"):
        validate(_merge({"harmonization": {"shared_batches": True}}))
    plain = study_plan(validate(_merge({})))["study"]["harmonization"]
    assert not {"shared_batches", "covbat", "covbat_percent_var", "covbat_n_pc"} & set(plain)  # same plan ids
    covbat = study_plan(validate(_merge({"harmonization": {"covbat": True, "covbat_n_pc": 3}})))["study"]
    assert covbat["harmonization"]["covbat"] is True and covbat["harmonization"]["covbat_n_pc"] == 3
    from fedrad.common.plan import combat_options, harmonization_method

    opts = combat_options(covbat["harmonization"])
    assert opts["covbat"] == {"percent_var": 0.95, "n_pc": 3} and not opts["shared_batches"]
    assert harmonization_method(covbat["harmonization"]) == ("ComBat (parametric EB), batch = site + CovBat "
                                                             "(first 3 PCs)")


def test_site_batch_labels_merge_small_scanners():
    from fedrad.common.plan import site_batch_labels

    values = ["GE"] * 30 + ["Siemens"] * 12 + ["Philips"] * 4 + ["Canon"] * 7 + [None] * 2
    labels = site_batch_labels(values, "s1", 10)
    assert labels[:30] == ["s1/GE"] * 30 and labels[30:42] == ["s1/Siemens"] * 12
    assert set(labels[42:]) == {"s1/other"}  # 4 + 7 + 2 = 13 >= 10: their own "other" batch
    labels = site_batch_labels(["GE"] * 30 + ["Philips"] * 4, "s1", 10)
    assert set(labels) == {"s1/GE"}  # "other" would have 4 < 10: it joins the largest batch
    shared = site_batch_labels(values, "s1", 10, shared=True)  # scanner models shared across sites
    assert shared[:42] == ["GE"] * 30 + ["Siemens"] * 12 and set(shared[42:]) == {"s1/other"}


def test_defaults_and_derived_values():
    cfg = validate(_merge({}))
    assert cfg["model"]["type"] == "logistic"
    cfg = validate(_merge({"endpoint": {"type": "survival"}, "selection": {"icc_threshold": 0.9},
                           "harmonization": {"categorical": ["sex"]}, "model": {"l1_ratio": 0, "grid": [1, 2.5]},
                           "validation": {"seed": -3, "km_times": [0.5, 1, 2.25]}}))
    assert cfg["model"]["type"] == "cox" and cfg["harmonization"]["covariates"] == ["sex"]
    cfg = validate(_merge({"endpoint": {"type": "continuous", "outcome": "immune_score"}}))
    assert cfg["model"]["type"] == "linear"
    with pytest.raises(StudyConfigError, match=r"\[model\] type = 'logistic' does not fit a continuous endpoint"):
        validate(_merge({"endpoint": {"type": "continuous"}, "model": {"type": "logistic"}}))


@pytest.mark.parametrize("penalty, decades", [("l2", 5.0), ("l1", 3.0), ("elasticnet", 3.0)])
def test_path_decades_default_depends_on_the_penalty(penalty, decades):
    """L2 never reaches all-zero coefficients: its path needs 5 decades to reach a practically unpenalized fit
    (benchmarks/penalty_path.py: UCI heart's inner-CV optimum ~3.7 decades in); a set value is kept."""
    from fedrad.common.plan import path_shape, path_step
    cfg = validate(_merge({"model": {"penalty": penalty}}))
    assert cfg["model"]["path_decades"] == decades and path_shape(cfg) == (12, decades)
    assert path_step(cfg) == pytest.approx(10 ** (decades / 11))
    assert validate(_merge({"model": {"penalty": penalty, "path_decades": 2}}))["model"]["path_decades"] == 2


@pytest.mark.parametrize("endpoint", ["response", "survival"])
def test_demo_study_validates(tmp_path, endpoint):
    from fedrad.demo import study_config

    manifests = {f"site{i}": tmp_path / f"site{i}" / "manifest.csv" for i in range(3)}
    cfg = study_config(manifests, endpoint, "ct-original", tmp_path / "results")
    assert cfg["model"]["type"] == ("logistic" if endpoint == "response" else "cox")


def test_test_and_benchmark_studies_validate(tmp_path):
    from tests.test_report import study_cfg
    from tests.test_study import make_sites

    for survival in (False, True):
        cfg, _, _ = make_sites(tmp_path / str(survival), survival)
        assert cfg["study"]["min_sites"] == 3
    study_cfg({"type": "response", "outcome": "response"}, [0.01, 0.1, 1.0])
    study_cfg({"type": "survival", "time": "os_time", "event": "os_event"}, [0.01, 0.1, 1.0])
    # benchmarks/rounds.py's study
    validate(_merge({"study": {"name": "rounds K=3", "min_sites": 3},
                     "endpoint": {"type": "response", "outcome": "response"},
                     "harmonization": {"covariates": ["age", "sex"], "categorical": ["sex"]},
                     "model": {"clinical": ["age", "stage"], "grid": [0.1, 1.0]}}))


def test_a_prediction_plan_does_not_carry_the_association_keys():
    """Plans of prediction studies keep the id they had before association studies existed (a site's approval
    stays valid); an association plan carries its markers."""
    from fedrad.common.plan import endpoint, is_association, study_plan

    plan = study_plan(validate(_merge({})))["study"]
    assert "association" not in plan and "kind" not in plan["study"] and not is_association(plan)
    assoc = study_plan(validate(_merge({"study": {"kind": "association"},
                                        "association": {"markers": ["immune_score"]}})))["study"]
    assert is_association(assoc) and endpoint(assoc) == {"type": "association", "markers": ["immune_score"]}
