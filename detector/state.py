"""Bounded per-entity state, driven by event time.

LLM sessions are a high-cardinality key space: millions a day. Every detector keeps its
per-entity state in an :class:`EntityStore`, which forgets entities idle for longer than a
TTL and never holds more than ``max_entities``, oldest-touched first out.

>>> store = EntityStore(factory=lambda key, now: {"first": now}, ttl=60.0, max_entities=2, touch_every=1.0)
>>> _ = store.get("a", 0.0); _ = store.get("b", 10.0); _ = store.get("c", 20.0)
>>> list(store)  # "a" was pushed out by the size bound
['b', 'c']
>>> store.evict(now=75.0)  # "b" was last seen at 10 s, more than 60 s ago
1
>>> list(store)
['c']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S")


class EntityStore(Generic[S]):
    """An LRU map of entity id to state, with an idle TTL in event time.

    Touching an entry moves it to the back at most once per ``touch_every`` seconds of
    event time, so a hot entity costs one dict lookup per event, not a re-link.
    ``pinned`` entities (an open incident) are kept past their TTL.
    """

    def __init__(
        self,
        factory: Callable[[str, float], S],
        ttl: float,
        max_entities: int,
        touch_every: float = 30.0,
        on_evict: Callable[[str, S], None] | None = None,
    ) -> None:
        self.factory = factory
        self.on_evict = on_evict
        self.ttl = ttl
        self.max_entities = max_entities
        self.touch_every = touch_every
        self._items: OrderedDict[str, S] = OrderedDict()
        self._touched: dict[str, float] = {}
        self.pinned: set[str] = set()
        self.evicted = 0

    def get(self, key: str, now: float) -> S:
        items = self._items
        state = items.get(key)
        if state is None:
            state = items[key] = self.factory(key, now)
            self._touched[key] = now
            if len(items) > self.max_entities:
                self._drop_oldest()
        elif now - self._touched[key] >= self.touch_every:
            self._touched[key] = now
            items.move_to_end(key)
        return state

    def peek(self, key: str) -> S | None:
        return self._items.get(key)

    def evict(self, now: float) -> int:
        """Forget entities idle past the TTL; returns how many went."""
        cutoff = now - self.ttl
        items, touched = self._items, self._touched
        gone = 0
        # Oldest-touched first; stop at the first that may have been seen since the cutoff
        # (``touched`` lags the true last event by up to ``touch_every``). Pinned ones go to the back.
        for _ in range(len(items)):
            key = next(iter(items))
            if touched[key] + self.touch_every > cutoff:
                break
            if key in self.pinned:
                touched[key] = now
                items.move_to_end(key)
                continue
            self._forget(key)
            gone += 1
        self.evicted += gone
        return gone

    def _drop_oldest(self) -> None:
        for key in self._items:
            if key not in self.pinned:
                self._forget(key)
                self.evicted += 1
                return

    def _forget(self, key: str) -> None:
        state = self._items.pop(key)
        del self._touched[key]
        if self.on_evict is not None:
            self.on_evict(key, state)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self) -> Iterator[tuple[str, S]]:
        return iter(self._items.items())

    def drop(self, which: Callable[[str], bool]) -> int:
        """Forget the entities whose key ``which`` picks, pinned or not; returns how many went."""
        gone = [key for key in self._items if which(key)]
        for key in gone:
            self._forget(key)
            self.pinned.discard(key)
        return len(gone)

    def take(self, old: EntityStore[S]) -> None:
        """Hold ``old``'s entities (a restored snapshot's) under this store's own TTL and size bound."""
        self._items, self._touched, self.pinned, self.evicted = old._items, old._touched, old.pinned, old.evicted
        while len(self._items) > self.max_entities:
            self._drop_oldest()
