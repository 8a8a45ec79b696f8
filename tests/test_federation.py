"""The payload codec and the in-process Flower Grid harness used by tests and single-machine runs."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from fedrad.common.messages import from_record, join_payload, split_payload, to_record
from fedrad.server.federation import Federation, LocalGrid, SiteError


def test_payload_roundtrip_is_bit_exact():
    x = np.random.default_rng(0).normal(size=(4, 3)) * 1e5
    payload = {"n": 17, "xtx": x, "names": ["a", "b"], "nested": {"v": np.arange(3), "f": 0.1 + 0.2},
               "flag": True, "none": None}
    back = from_record(to_record(payload))
    np.testing.assert_array_equal(back["xtx"], x)
    assert back["xtx"].dtype == np.float64
    assert back["nested"]["f"] == 0.1 + 0.2 and back["names"] == ["a", "b"] and back["none"] is None
    assert join_payload(*split_payload(payload))["n"] == 17
    with pytest.raises(ValueError, match="non-finite"):
        to_record({"bad": float("nan")})


def _toy_app():
    app = ClientApp()

    @app.query("combat_stats")
    def stats(msg: Message, context):
        site = context.node_config["site-name"]
        if site == "bad":
            raise ValueError("group has 3 patients, fewer than the minimum cell size 10")
        data = np.arange(4.0) * float(context.node_config["scale"])
        seen = int(context.state["seen"]["n"]) if "seen" in context.state else 0
        from flwr.app import ConfigRecord

        context.state["seen"] = ConfigRecord({"n": seen + 1})
        got = from_record(msg.content)
        return Message(to_record({"site": site, "sum": data + got["offset"], "seen": seen + 1}), reply_to=msg)

    return app


def test_local_grid_runs_flower_clientapp_in_process():
    grid = LocalGrid(_toy_app(), [{"site-name": "A", "scale": 1.0}, {"site-name": "B", "scale": 2.0}])
    lines = []
    fed = Federation(grid, log=lines.append)
    out = fed.ask("combat_stats", {"offset": np.ones(4)})
    assert set(out) == {"A", "B"}
    np.testing.assert_array_equal(out["B"]["sum"], np.arange(4.0) * 2 + 1)
    out2 = fed.ask("combat_stats", per_site={"A": {"offset": np.zeros(4)}, "B": {"offset": np.full(4, 5.0)}})
    np.testing.assert_array_equal(out2["B"]["sum"], np.arange(4.0) * 2 + 5)
    assert out2["A"]["seen"] == 2  # context.state persists across messages, as on a SuperNode
    assert fed.rounds == 2
    assert any("2 of 2 sites answered" in ln for ln in lines)


def test_site_failure_names_the_site():
    grid = LocalGrid(_toy_app(), [{"site-name": "A", "scale": 1.0}, {"site-name": "bad", "scale": 1.0}])
    fed = Federation(grid)
    with pytest.raises(SiteError, match="minimum cell size") as info:
        fed.ask("combat_stats", {"offset": np.ones(4)})
    assert list(info.value.failures.values())[0].startswith("group has 3 patients")
