"""The durable outbox: idempotent puts, per-group order, jittered backoff, dead letters, restarts."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from detector.alerting.outbox import Delivery, Outbox


class FakeClock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def box(clock: FakeClock) -> Iterator[Outbox]:
    outbox = Outbox(":memory:", max_attempts=5, base_delay=1.0, max_delay=8.0, rng=random.Random(1), clock=clock)
    yield outbox
    outbox.close()


def ids(box: Outbox, channel: str = "webhook") -> list[str]:
    return [d.delivery_id for d in box.due(channel)]


def test_put_is_idempotent_in_every_state(box: Outbox) -> None:
    assert box.put("a", "webhook", "http://x", {"v": 1})
    assert not box.put("a", "webhook", "http://other", {"v": 2})  # pending
    [delivery] = box.due("webhook")
    assert (delivery.target, delivery.payload, delivery.attempts) == ("http://x", {"v": 1}, 0)
    box.delivered("a", {"status": 200})
    assert not box.put("a", "webhook", "http://x", {"v": 1})  # delivered
    assert box.put("b", "webhook", "http://x", {})
    for _ in range(5):
        box.failed("b", "down", retry_after=0)
    assert box.dead_letters()
    assert not box.put("b", "webhook", "http://x", {})  # dead
    assert box.pending_count() == 0


def test_due_is_in_insertion_order_and_by_channel(box: Outbox, clock: FakeClock) -> None:
    for i in range(5):
        box.put(f"w{i}", "webhook", "t", {})
        clock.t += 1  # later ones are not older just because the clock is coarse
    box.put("s0", "slack", "C1", {})
    assert ids(box) == ["w0", "w1", "w2", "w3", "w4"]
    assert ids(box, "slack") == ["s0"]
    assert [d.delivery_id for d in box.due("webhook", limit=2)] == ["w0", "w1"]
    assert (box.pending_count("webhook"), box.pending_count("slack"), box.pending_count()) == (5, 1, 6)


def test_a_group_goes_out_strictly_in_order(box: Outbox) -> None:
    box.put("a1", "webhook", "t", {}, group="A")
    box.put("b1", "webhook", "t", {}, group="B")
    box.put("a2", "webhook", "t", {}, group="A")
    box.put("free1", "webhook", "t", {})
    box.put("free2", "webhook", "t", {})
    assert ids(box) == ["a1", "b1", "free1", "free2"]  # a2 waits for a1; ungrouped ones never wait

    box.failed("a1", "HTTP 500", retry_after=60)  # a1 backs off, and a2 still waits behind it
    assert ids(box) == ["b1", "free1", "free2"]
    box.delivered("b1")
    assert ids(box) == ["free1", "free2"]
    assert box.next_due_in("webhook") == 0

    box.delivered("free1")
    box.delivered("free2")
    # Only a2 is pending-and-due by its own time, but its group's head is not due: nothing is due.
    assert ids(box) == []
    assert box.next_due_in("webhook") == pytest.approx(60)


def test_groups_are_per_channel(box: Outbox) -> None:
    box.put("w", "webhook", "t", {}, group="incident-1")
    box.put("s", "slack", "C1", {}, group="incident-1")
    assert ids(box) == ["w"]
    assert ids(box, "slack") == ["s"]


def test_backoff_grows_with_full_jitter_within_bounds(clock: FakeClock) -> None:
    """The n-th failure waits uniformly in [0, min(max_delay, base * 2**(n-1))]."""
    box = Outbox(":memory:", max_attempts=20, base_delay=0.5, max_delay=16.0, rng=random.Random(42), clock=clock)
    n_ids, n_attempts = 200, 8
    delays: list[list[float]] = [[] for _ in range(n_attempts)]
    for i in range(n_ids):
        box.put(f"d{i}", "webhook", "t", {})
    for attempt in range(n_attempts):
        for i in range(n_ids):
            assert box.failed(f"d{i}", "boom")
        assert box.due("webhook", limit=n_ids) == []  # every one waits
        rows = {d.delivery_id: d for d in _all_pending(box, clock, n_ids)}
        for i in range(n_ids):
            delays[attempt].append(rows[f"d{i}"].next_attempt_at - clock.t)
        clock.t += 1_000  # everything due again
    for attempt, observed in enumerate(delays):
        cap = min(16.0, 0.5 * 2**attempt)
        assert all(0 <= d <= cap for d in observed)
        assert max(observed) > 0.9 * cap  # jitter spans the whole window...
        assert min(observed) < 0.1 * cap  # ...down to almost no wait
        assert len(set(observed)) == n_ids  # and tells deliveries apart
    means = [sum(obs) / n_ids for obs in delays]
    assert means == sorted(means)  # grows until the cap
    assert means[-1] == pytest.approx(8.0, rel=0.2)  # capped at max_delay: mean of U(0, 16)


def _all_pending(box: Outbox, clock: FakeClock, n: int) -> list[Delivery]:
    """Every pending delivery, by looking from far in the future."""
    now = clock.t
    clock.t = now + 1e9
    try:
        return list(box.due("webhook", limit=n))
    finally:
        clock.t = now


def test_same_seed_same_schedule(clock: FakeClock) -> None:
    def schedule() -> list[float]:
        box = Outbox(":memory:", rng=random.Random(3), clock=clock)
        box.put("x", "webhook", "t", {})
        out = []
        for _ in range(5):
            box.failed("x", "boom")
            out.append(_all_pending(box, clock, 1)[0].next_attempt_at)
        return out

    assert schedule() == schedule()


def test_retry_after_is_a_floor(box: Outbox, clock: FakeClock) -> None:
    box.put("x", "webhook", "t", {})
    assert box.failed("x", "HTTP 429", retry_after=42.0)  # far above the jittered 0..1 s
    assert box.next_due_in("webhook") == pytest.approx(42.0)
    clock.t += 41.9
    assert ids(box) == []
    clock.t += 0.1
    assert ids(box) == ["x"]
    assert box.due("webhook")[0].attempts == 1

    box.failed("x", "HTTP 429", retry_after=0.0)  # a floor below the backoff does not shorten it
    delay = box.next_due_in("webhook")
    assert delay is not None and 0 <= delay <= 2.0


def test_dead_letter_after_max_attempts_keeps_the_reason_and_unblocks_the_group(box: Outbox, clock: FakeClock) -> None:
    box.put("a1", "webhook", "t", {"n": 1}, group="A")
    box.put("a2", "webhook", "t", {"n": 2}, group="A")
    for attempt in range(1, 5):
        assert box.failed("a1", f"refused #{attempt}")
        assert ids(box) == []  # backing off, a2 behind it
        clock.t += 100
        assert ids(box) == ["a1"]
    assert not box.failed("a1", "connection refused, for good")
    [(dead, reason)] = box.dead_letters("webhook")
    assert (dead.delivery_id, dead.attempts, dead.payload, reason) == (
        "a1",
        5,
        {"n": 1},
        "connection refused, for good",
    )
    assert box.dead_letters("slack") == []
    assert ids(box) == ["a2"]  # the group moves on
    assert not box.failed("a1", "late")  # a dead letter is not revived by a stray failure
    assert box.pending_count() == 1


def test_results_and_unknown_ids(box: Outbox) -> None:
    box.put("x", "webhook", "t", {})
    assert box.result("x") is None
    box.delivered("x", {"status": 204, "receiver": "gw-1"})
    assert box.result("x") == {"status": 204, "receiver": "gw-1"}
    assert box.result("nope") is None
    assert box.next_due_in("webhook") is None
    with pytest.raises(KeyError):
        box.failed("nope", "boom")
    with pytest.raises(KeyError):
        box.delivered("nope")


def test_give_up_dead_letters_at_once(box: Outbox) -> None:
    box.put("x", "webhook", "t", {}, group="A")
    box.put("y", "webhook", "t", {}, group="A")
    box.give_up("x", "endpoint removed")
    assert [(d.delivery_id, r) for d, r in box.dead_letters()] == [("x", "endpoint removed")]
    assert ids(box) == ["y"]


def test_prune_forgets_only_finished_deliveries(box: Outbox, clock: FakeClock) -> None:
    box.put("old", "webhook", "t", {})
    box.delivered("old")
    box.put("waiting", "webhook", "t", {})
    clock.t += 10
    assert box.prune(finished_before=clock.t) == 1
    assert box.put("old", "webhook", "t", {})  # forgotten, so new again
    assert box.pending_count() == 2


def test_everything_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_attempts=2, rng=random.Random(5), clock=clock)
    box.put("done", "webhook", "t", {"n": 0}, group="A")
    box.put("retrying", "webhook", "t", {"n": 1}, group="A")
    box.put("later", "webhook", "t", {"n": 2}, group="A")
    box.put("doomed", "slack", "C1", {"n": 3})
    box.delivered("done", {"status": 200})
    box.failed("retrying", "HTTP 502", retry_after=30)
    box.failed("doomed", "channel_not_found")
    box.failed("doomed", "channel_not_found")
    box.close()

    box = Outbox(path, max_attempts=2, clock=clock)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not box.put("done", "webhook", "t", {})
    assert box.result("done") == {"status": 200}
    assert box.pending_count() == 2
    assert ids(box) == []
    assert box.next_due_in("webhook") == pytest.approx(30)
    clock.t += 30
    [retrying] = box.due("webhook")
    assert (retrying.delivery_id, retrying.attempts, retrying.payload) == ("retrying", 1, {"n": 1})
    assert [(d.delivery_id, r) for d, r in box.dead_letters()] == [("doomed", "channel_not_found")]
    box.delivered("retrying")
    assert ids(box) == ["later"]
    box.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Outbox(":memory:", max_attempts=0)
    with pytest.raises(ValueError):
        Outbox(":memory:", base_delay=10, max_delay=1)
