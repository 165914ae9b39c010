"""Packs: many usage events of one team in one by-team record.

A usage partition forwards the valid events of each batch to the by-team topic, one record per
team and batch rather than one per event: producing is the dear part (about 10 µs a message in
aiokafka), so a pack of a few hundred events costs the price of one. Each event keeps its usage
offset, so the by-team side can drop what a restored usage partition forwards a second time.

Framing: per event, an 8-byte big-endian usage offset, a 4-byte length, then the event's
original bytes (any bytes: pretty-printed JSON with newlines is fine).

>>> blob = pack([(41, b'{"a": 1}'), (42, b'{\\n "b": 2}')])
>>> list(unpack(blob))
[(41, b'{"a": 1}'), (42, b'{\\n "b": 2}')]
>>> [len(list(unpack(b))) for b in packs_of([(i, b"x" * 100) for i in range(10)], max_bytes=400)]
[3, 3, 3, 1]
>>> list(unpack(blob[:-1]))
Traceback (most recent call last):
...
ValueError: truncated pack: event at byte 32 wants 10 bytes, 9 left
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

_HEAD = struct.Struct(">qI")


def pack(events: Iterable[tuple[int, bytes]]) -> bytes:
    """``(usage offset, event bytes)`` pairs, in offset order, as one record value."""
    head = _HEAD.pack
    return b"".join(head(offset, len(raw)) + raw for offset, raw in events)


def packs_of(events: Iterable[tuple[int, bytes]], max_bytes: int) -> Iterator[bytes]:
    """Packs of at most ``max_bytes`` each (a single bigger event gets a pack of its own)."""
    batch: list[tuple[int, bytes]] = []
    size = 0
    for offset, raw in events:
        cost = _HEAD.size + len(raw)
        if batch and size + cost > max_bytes:
            yield pack(batch)
            batch, size = [], 0
        batch.append((offset, raw))
        size += cost
    if batch:
        yield pack(batch)


def unpack(blob: bytes) -> Iterator[tuple[int, bytes]]:
    """The ``(usage offset, event bytes)`` pairs of a pack."""
    view, at, size, head = memoryview(blob), 0, len(blob), _HEAD.size
    while at < size:
        offset, length = _HEAD.unpack_from(view, at)
        at += head
        if at + length > size:
            raise ValueError(f"truncated pack: event at byte {at} wants {length} bytes, {size - at} left")
        yield offset, blob[at : at + length]
        at += length
