"""Best-effort publishing: an unreachable or hanging API never stops the work."""

from __future__ import annotations

import logging
import threading

import pytest

import tasks.publish as publish
from tasks.publish import ProgressArtifact, Publisher


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(publish, "CALL_TIMEOUT", 0.3)
    monkeypatch.setattr(publish, "RETRY_AFTER", 0.5)
    publish._api_down.clear()
    yield
    publish._api_down.clear()


def test_calls_are_made_in_order_in_the_background():
    seen = []
    pub = Publisher(logging.getLogger("test"))
    for i in range(5):
        pub.publish(seen.append, i)
    pub.close()
    assert seen == [0, 1, 2, 3, 4] and pub.missed == 0 and not publish.api_unreachable()


def test_a_failing_api_costs_updates_not_the_work(caplog, monkeypatch):
    monkeypatch.setattr(publish, "RETRY_AFTER", 600.0)  # no probe during this test
    attempts = []

    def refused(*_):
        attempts.append(1)
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    pub = Publisher(logging.getLogger("test"))
    with caplog.at_level(logging.WARNING, logger="test"):
        for _ in range(50):
            pub.publish(refused)
        pub.close(timeout=60)
    # the API was asked once; the 49 others were dropped without a call, and close()
    # found the queue done (not abandoned at its time limit)
    assert len(attempts) == 1 and not pub._thread.is_alive()
    assert pub.missed == 50
    assert publish.api_unreachable()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m and "Connection refused" in m for m in lines) == 1
    assert any("missed 50 update(s)" in m for m in lines)


def test_a_hanging_call_is_abandoned_after_the_timeout(monkeypatch):
    monkeypatch.setattr(publish, "RETRY_AFTER", 600.0)  # the API stays down for this test
    release = threading.Event()
    pub = Publisher(logging.getLogger("test"))
    pub.publish(release.wait)
    pub.publish(lambda: None)  # dropped: the API counts as down for RETRY_AFTER
    pub.close(timeout=60)
    # the queue was done while the call still hung: abandoned after CALL_TIMEOUT, not awaited
    assert not pub._thread.is_alive() and not release.is_set()
    release.set()
    assert pub.missed == 2 and publish.api_unreachable()


def test_the_api_coming_back_is_noticed(caplog, monkeypatch):
    monkeypatch.setattr(publish, "RETRY_AFTER", 0.0)  # the next call after a failure probes
    calls = []
    state = {"up": False}

    def call():
        if not state["up"]:
            raise ConnectionError("down")
        calls.append(1)

    pub = Publisher(logging.getLogger("test"))
    with caplog.at_level(logging.INFO, logger="test"):
        pub.publish(call)
        assert publish._api_down.wait(60)  # the failure was seen
        state["up"] = True
        pub.publish(call)
        pub.close(timeout=60)
    assert calls == [1] and not publish.api_unreachable()
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_progress_sends_only_the_newest_value(monkeypatch):
    monkeypatch.setattr(publish, "CALL_TIMEOUT", 60.0)  # the gate below is not a hanging API
    sent = []
    gate = threading.Event()
    pub = Publisher(logging.getLogger("test"))
    pub.publish(gate.wait, 60)  # keeps the thread busy until the updates have piled up
    progress = ProgressArtifact(pub, "k", "d")
    progress._send = lambda pct: sent.append(pct)  # the artifact call itself needs a Prefect run
    for pct in (10, 20, 30, 40):
        progress.update(pct)
    gate.set()
    pub.close()
    assert sent == [40.0]
