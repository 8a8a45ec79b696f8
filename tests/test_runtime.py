"""fedrad.server.runtime without processes: how a wait for a Flower run ends."""
from __future__ import annotations

import threading
import time

import pytest

from fedrad.server import runtime
from fedrad.server.plans import write_json_atomic


def test_wait_ends_on_a_new_results_file_and_not_on_one_left_by_an_earlier_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "run_status", lambda home, conn, rid: calls.append(rid) or {"status": "running"})
    done = tmp_path / "results.json"
    write_json_atomic({"run": "earlier"}, done)  # an earlier run's results in the same output folder
    with pytest.raises(runtime.RuntimeFailure, match="still running"):
        runtime.wait_for_run(tmp_path, "c", 7, timeout=0.6, poll=0.2, done_file=done, finished=False)
    threading.Timer(0.4, write_json_atomic, ({"run": "this"}, done)).start()
    t0 = time.monotonic()
    status = runtime.wait_for_run(tmp_path, "c", 7, timeout=30, poll=10.0, done_file=done, finished=False)
    assert status["status"] == "results-written" and 0.3 < time.monotonic() - t0 < 5
    assert calls and set(calls) == {7}


def test_wait_for_a_finished_run_asks_again_as_soon_as_the_results_are_written(tmp_path, monkeypatch):
    done = tmp_path / "results.json"
    states = iter(["running", "running", "finished:completed"])
    asked = []

    def status(home, conn, rid):
        asked.append(time.monotonic())
        return {"status": next(states)}

    monkeypatch.setattr(runtime, "run_status", status)
    threading.Timer(0.3, write_json_atomic, ({"run": "this"}, done)).start()
    t0 = time.monotonic()
    assert runtime.wait_for_run(tmp_path, "c", 7, timeout=60, poll=30.0, done_file=done)["status"] == \
        "finished:completed"
    assert time.monotonic() - t0 < 5  # not the 30 s poll: the results file ended the pause


def test_failed_run_raises_with_its_status(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "run_status", lambda *a: {"status": "finished:failed", "status-details": "boom"})
    monkeypatch.setattr(runtime, "run_log", lambda *a: "the ServerApp's log")
    t0 = time.monotonic()
    with pytest.raises(runtime.RuntimeFailure, match="finished:failed: boom"):
        runtime.wait_for_run(tmp_path, "c", 7, timeout=5, poll=0.2, done_file=tmp_path / "never.json",
                             finished=False)
    assert time.monotonic() - t0 >= 0.15  # the first status question waits one poll interval (start-up CPU)


def test_the_coordinators_reply_poll_backs_off_with_the_round():
    from fedrad.server.federation import MAX_POLL, poll_delay

    assert poll_delay(0.05, 0.0) == 0.05 and poll_delay(0.05, 0.3) == 0.05  # a short round: tight polls
    assert poll_delay(0.05, 2.0) == 0.2                                      # a tenth of the wait so far
    assert poll_delay(0.05, 30.0) == MAX_POLL == 0.5                         # an extraction round
    assert poll_delay(1.0, 2.0) == 1.0                                       # a configured slower poll stays
