from __future__ import annotations

import pickle

from detector.state import EntityStore


def _new(key: str, now: float) -> list[float]:
    return [now]


def test_size_bound_drops_least_recently_touched_but_keeps_pinned() -> None:
    store: EntityStore[list[float]] = EntityStore(_new, ttl=1e9, max_entities=3, touch_every=0.0)
    store.pinned.add("a")
    for i, key in enumerate("abcde"):
        store.get(key, float(i))
    assert "a" in store and len(store) == 3
    assert list(store) == ["a", "d", "e"]


def test_ttl_eviction_calls_back_and_spares_recently_seen() -> None:
    gone: list[str] = []
    store: EntityStore[list[float]] = EntityStore(
        _new, ttl=100.0, max_entities=10, touch_every=1.0, on_evict=lambda k, s: gone.append(k)
    )
    store.get("old", 0.0)
    store.get("new", 0.0)
    store.get("new", 150.0)
    assert store.evict(now=160.0) == 1
    assert gone == ["old"] and list(store) == ["new"]


def test_store_pickles_with_its_state() -> None:
    store: EntityStore[list[float]] = EntityStore(_new, ttl=10.0, max_entities=10)
    store.get("a", 5.0)
    copy = pickle.loads(pickle.dumps(store))
    assert copy.peek("a") == [5.0]


def test_a_store_takes_a_restored_stores_entities_under_its_own_bounds() -> None:
    old: EntityStore[list[float]] = EntityStore(_new, ttl=1e9, max_entities=10, touch_every=0.0)
    for i, key in enumerate("abcd"):
        old.get(key, float(i))
    old.pinned.add("a")
    store: EntityStore[list[float]] = EntityStore(_new, ttl=5.0, max_entities=3, touch_every=0.0)
    store.take(pickle.loads(pickle.dumps(old)))
    assert list(store) == ["a", "c", "d"] and store.peek("c") == [2.0]  # "b" is over the new bound; "a" is pinned
    assert store.evict(now=7.5) == 1 and sorted(store) == ["a", "d"]  # by the new TTL
