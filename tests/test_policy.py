"""A site's policy from its configuration file and node config: the stricter rule wins, typos are errors,
refusals are one line naming the site, and the opt-in min-events rule (sums over few events are answered
by default: TCGA-BRCA region 5 with 3 events takes part)."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from fedrad.client.policy import PolicyRefusal, SitePolicy
from fedrad.client.site import Site, SiteFailure
from fedrad.common.messages import REQUESTS
from fedrad.server.federation import SiteError

from .conftest import shared_path


def write(path, text):
    path.write_text(text)
    return path


def test_config_file_sets_site_and_policy(tmp_path):
    cfg = write(tmp_path / "site.toml", """
[site]
name = "hospital-a"
table = "data/features.parquet"
workdir = "work"
extract-jobs = 3
[policy]
min-cell-size = 20
min-events = 5
allowed-requests = ["study_prepare", "combat_stats"]
""")
    site = Site.from_node_config({"config": str(cfg)})
    assert site.name == "hospital-a"
    assert site.table_path == (tmp_path / "data" / "features.parquet").resolve()
    assert site.workdir == (tmp_path / "work").resolve() and site.extract_jobs == 3
    assert site.policy == SitePolicy(min_cell_size=20, min_events=5,
                                     allowed_requests=frozenset({"study_prepare", "combat_stats"}))
    with pytest.raises(PolicyRefusal, match="refuses 'fit_round' requests"):
        site.policy.check_allowed(site.name, "fit_round")


@pytest.mark.parametrize("node, expect", [
    ({"min-cell-size": 5}, (20, 0, {"combat_stats", "fit_round"})),                   # cannot loosen
    ({"min-cell-size": 30}, (30, 0, {"combat_stats", "fit_round"})),                  # can tighten
    ({"min-events": 4, "allowed-requests": "fit_round,fedavg"}, (20, 4, {"fit_round"})),  # intersection
])
def test_node_config_can_only_tighten_the_file(tmp_path, node, expect):
    cfg = write(tmp_path / "site.toml", '[site]\nname = "a"\n[policy]\nmin-cell-size = 20\n'
                                        'allowed-requests = ["combat_stats", "fit_round"]\n')
    site = Site.from_node_config({"config": str(cfg), "site-name": "b", **node})
    assert site.name == "b"  # node config overrides [site]
    assert (site.policy.min_cell_size, site.policy.min_events, set(site.policy.allowed_requests)) == \
        (expect[0], expect[1], expect[2])


def test_without_a_file_the_node_config_alone_decides():
    site = Site.from_node_config({"site-name": "s", "min-cell-size": 5})
    assert site.policy.min_cell_size == 5 and site.policy.allowed_requests == frozenset(REQUESTS)
    assert Site.from_node_config({"site-name": "s"}).policy == SitePolicy()


@pytest.mark.parametrize("text, message", [
    ('[site]\nname = "a"\n[policy]\nmin-cel-size = 5\n', r"unknown \[policy\] min-cel-size; known: .*min-cell-size"),
    ('[site]\nname = "a"\ntabel = "x"\n', r"unknown \[site\] tabel"),
    ('[sites]\nname = "a"\n', r"unknown \[sites\]"),
    ('[site\nname = "a"\n', r"is not valid TOML"),
    ('[site]\nname = "a"\n[policy]\nmin-cell-size = 1\n', r"site a: .*min_cell_size must be at least 2, got 1"),
    ('[site]\nname = "a"\n[policy]\nallowed-requests = ["fit"]\n', r"site a: .*unknown request type\(s\) in allow-list: fit"),
    ('[site]\nname = "a"\n[policy]\nmin-events = "many"\n', r"site a: .*must be integers"),
])
def test_bad_config_file_is_one_line_error(tmp_path, text, message):
    cfg = write(tmp_path / "site.toml", text)
    with pytest.raises(SiteFailure, match=message) as info:
        Site.from_node_config({"config": str(cfg)})
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SiteFailure, match=r"site configuration file .*nope.toml not found"):
        Site.from_node_config({"config": str(tmp_path / "nope.toml")})


def test_shipped_example_config_is_valid(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "deploy" / "site.toml"
    shutil.copy(example, tmp_path / "site.toml")
    site = Site.from_node_config({"config": str(tmp_path / "site.toml")})
    assert site.name == "hospital-a" and site.policy == SitePolicy()


def test_refusal_is_audited_and_names_the_site(tmp_path):
    site = Site.from_node_config({"site-name": "h1", "workdir": str(tmp_path), "allowed-requests": "combat_stats"})
    with pytest.raises(SiteFailure, match=r"^site h1: refused: the site does not answer this request type "
                                          r"\[not-allowed\]$"):
        site.answer("fit_round", {}, lambda s, p: {"x": 1})
    last = site.audit.entries()[-1]
    assert (last["request"], last["status"]) == ("fit_round", "refused") and site.audit.verify().ok
    assert "refuses 'fit_round' requests (not in its allow-list)" in (tmp_path / "site.log").read_text()


# ------------------------------------------------------------------------------------------------------------
# min-events on a real cohort: TCGA-BRCA region 5 has 3 events among its patients
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tcga():
    base = shared_path("multisite-tabular", "flamby-tcga-brca")
    df = pd.read_csv(base / "tcga_brca.csv").merge(pd.read_csv(base / "tcga_brca_train_test_split.csv"), on="pid")
    df["region"] = "region" + df["fold2"].str.split("_").str[1]
    return df[df["T"] > 0].drop(columns=["pid", "fold", "fold2"]).reset_index(drop=True)


def _cox_fit(df, tmp_path, extra: dict):
    from fedrad.client.client_app import app as client_app
    from fedrad.common.cox import CoxFit
    from fedrad.local import split_into_sites
    from fedrad.server.federation import Federation, LocalGrid
    from fedrad.server.fitting import FitTask, run_fits

    feats = [c for c in df.columns if c not in ("T", "E", "region")]
    sites = split_into_sites(df, "region", tmp_path)
    configs = [{**c, **extra.get(c["site-name"], {})} for c in sites.node_configs()]
    from fedrad.common.plan import fit_plan
    from fedrad.local import approve_at_sites

    fed = Federation(LocalGrid(client_app, configs))
    server = CoxFit(feats, duration_col="T", event_col="E", penalizer=0.1)
    data = {"model": "cox", "features": feats, "time": "T", "event": "E"}
    fed.plan_id = approve_at_sites(fit_plan(data, rounds=200), configs)
    return run_fits(fed, {"fit": FitTask(server, data)})["fit"], feats


def test_site_with_three_events_takes_part_by_default(tcga, tmp_path):
    from fedrad.common.cox import fit_pooled

    assert int(tcga.loc[tcga["region"] == "region5", "E"].sum()) == 3
    fitted, feats = _cox_fit(tcga, tmp_path, {})
    pooled = fit_pooled(tcga, "T", "E", strata="region", features=feats, penalizer=0.1)
    assert fitted.site_events_["region5"] == 3
    assert np.max(np.abs(np.asarray(fitted.coef_) - np.asarray(pooled.coef_))) < 1e-6


def test_stricter_min_events_refuses_and_names_the_site(tcga, tmp_path):
    with pytest.raises(SiteError, match=r"region5: refused under the site's min-events rule \[min-events\]") as info:
        _cox_fit(tcga, tmp_path, {"region5": {"min-events": 5}})
    assert "3 events" not in str(info.value)  # the count stays in the site's local log
    assert "3 events, fewer than the site's min-events 5" in (tmp_path / "region5" / "site.log").read_text()


def test_site_join_reads_the_config_file_and_fails_early(tmp_path):
    from typer.testing import CliRunner

    from fedrad.cli import app

    cfg = write(tmp_path / "site.toml", '[site]\nname = "a"\ntable = "missing.parquet"\n[policy]\nmin-cell-size = 12\n')
    runner = CliRunner()
    res = runner.invoke(app, ["site", "join", "--config", str(cfg), "--superlink", "127.0.0.1:9092", "--insecure"])
    assert res.exit_code == 1 and "feature table" in res.output and "missing.parquet not found" in res.output
    write(cfg, '[site]\nname = "a"\n[policy]\nmin-cell-size = "x"\n')
    res = runner.invoke(app, ["site", "join", "--config", str(cfg), "--superlink", "127.0.0.1:9092", "--insecure"])
    assert res.exit_code == 1 and "site a:" in res.output and "must be integers" in res.output


def test_small_covariate_levels_in_combat_are_refused(tmp_path):
    """A categorical level (or its complement) under the minimum cell size is refused by default (issue 11:
    one indicator per patient would rebuild every row); min-events refuses levels under its own threshold."""
    from fedrad.client.steps import combat_stats
    from fedrad.common.combat import make_request
    from fedrad.common.plan import harmonize_plan, plan_id
    from fedrad.local import approve_at_sites

    rng = np.random.default_rng(1)
    df = pd.DataFrame({"f1": rng.normal(size=40), "f2": rng.normal(size=40), "age": rng.normal(60, 8, 40),
                       "sex": ["F"] * 7 + ["M"] * 33})
    df.to_parquet(tmp_path / "t.parquet")
    req = make_request(["f1", "f2"], ["age"], ["sex"])
    base = {"site-name": "h1", "table": str(tmp_path / "t.parquet"), "workdir": str(tmp_path / "w")}
    approve_at_sites(harmonize_plan(req), [base])
    request = {"request": req, "plan": plan_id(harmonize_plan(req))}
    with pytest.raises(SiteFailure, match=r"^site h1: refused: the rows involved are fewer than the site's minimum "
                                          r"cell size \[min-cell-size\]$"):
        Site.from_node_config(base).answer("combat_stats", request, combat_stats)
    loose = {**base, "min-cell-size": 5}
    stats = Site.from_node_config(loose).answer("combat_stats", request, combat_stats)
    assert stats["stats"]["batches"][0]["level_counts"] == {"sex": [7, 33]}
    strict = Site.from_node_config({**loose, "min-events": 8})
    with pytest.raises(SiteFailure, match=r"^site h1: .*\[min-cell-size\]$"):
        strict.answer("combat_stats", request, combat_stats)
    assert "level 'F' has 7 patients" in (tmp_path / "w" / "site.log").read_text()
