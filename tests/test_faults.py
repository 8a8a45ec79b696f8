"""How the coordinator sees a site that is down: Flower's SuperLink answers a message whose destination SuperNode
missed its heartbeats with an error reply of its own (code NODE_UNAVAILABLE, source node 1, not the site's node).
Federation.ask must blame the right site (by the message the reply answers), with a reason a reader understands.
Study.run going on without a failed site: tests/test_study.py; on real processes with SIGKILLed SuperNodes:
tests/test_deployment.py."""
from __future__ import annotations

import pytest

from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedrad.client.client_app import app as client_app
from fedrad.common.plan import study_plan
from fedrad.local import approve_at_sites
from fedrad.server.federation import SITE_DOWN, Federation, LocalGrid, SiteError


class CrashingGrid(LocalGrid):
    """LocalGrid where the sites in ``down`` no longer answer: the "SuperLink" replies NODE_UNAVAILABLE for them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down: set[str] = set()

    def _deliver(self, msg):
        node = msg.metadata.dst_node_id
        if self._contexts[node].node_config["site-name"] not in self.down:
            return super()._deliver(msg)
        reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable - no heartbeat"),
                        reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return reply


def test_node_unavailable_reply_blames_the_site_whose_message_it_answers(tmp_path):
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path, survival=False, seed=1)
    grid = CrashingGrid(client_app, nodes)
    fed = Federation(grid)
    fed.plan_id = approve_at_sites(study_plan(cfg), nodes)
    endpoint = {"type": "response", "outcome": "response"}
    payload = {"sources": {}, "endpoint": endpoint, "required_columns": ["response"], "clinical": [],
               "feature_prefixes": ["original_"]}
    assert sorted(fed.ask("study_prepare", payload)) == ["hosp0", "hosp1", "hosp2", "hosp3"]
    grid.down = {"hosp2"}
    with pytest.raises(SiteError) as err:
        fed.ask("study_prepare", payload)
    assert err.value.failures == {"hosp2": SITE_DOWN}  # not "node 1" (the reply's source is the SuperLink)
    assert "hosp2: its SuperNode stopped sending heartbeats" in str(err.value)


class CountingGrid(LocalGrid):
    """LocalGrid recording how many messages each send_and_receive call carried."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waves: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.waves.append(len(messages))
        return super().send_and_receive(messages, timeout=timeout)


def test_max_concurrent_sites_sends_a_round_trip_in_waves_with_the_same_replies(tmp_path):
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path, survival=False, seed=1)
    payload = {"plan": approve_at_sites(study_plan(cfg), nodes), "endpoint": {"type": "response", "outcome": "response"},
               "required_columns": ["response"], "clinical": [], "feature_prefixes": ["original_"]}
    all_at_once, waves = CountingGrid(client_app, nodes), CountingGrid(client_app, nodes)
    a = Federation(all_at_once).ask("study_prepare", payload)
    fed = Federation(waves, max_concurrent=3)
    b = fed.ask("study_prepare", payload)
    assert all_at_once.waves == [4] and waves.waves == [3, 1]
    assert fed.rounds == 1 and fed.history[0]["answered"] == sorted(b)
    assert {s: r["n"] for s, r in a.items()} == {s: r["n"] for s, r in b.items()}


def test_the_coordinators_plan_runner_writes_the_report_before_the_results(tmp_path):
    """Every study the ServerApp runs leaves report.html beside results.json (whoever submitted it), and
    report.html is in place by the time results.json (what waiting clients watch for) appears."""
    from fedrad.server.plans import run_plan, write_json_atomic
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path / "sites", survival=False, seed=3)
    cfg["validation"]["loso"] = False
    cfg["model"]["grid"] = [1.0]
    write_json_atomic({"task": "study", "config": cfg}, tmp_path / "plan.json")
    approve_at_sites(study_plan(cfg), nodes)
    seen = []

    def log(line):
        seen.append(((tmp_path / "out" / "report.html").exists(), (tmp_path / "out" / "results.json").exists(), line))

    run_plan(Federation(LocalGrid(client_app, nodes), log=log), str(tmp_path / "plan.json"), str(tmp_path / "out"))
    assert seen[-1][0] and not seen[-1][1] and "report written to" in seen[-1][2]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "1. Cohort" in html and "hosp0" in html and (tmp_path / "out" / "results.json").exists()
