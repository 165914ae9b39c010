"""The offline shell: JSON Lines of usage events in, alerts out, through the same engine.

Input is a file, a ``.gz`` file or ``-`` for stdin. A line that is not JSON, or breaks the
event contract, is rejected with its line number and the reason and the replay goes on.

>>> import io
>>> lines = [b'{"event_id":"e1","timestamp":"2026-11-02T09:30:00Z","team":"t","api_key_id":"k",'
...          b'"provider":"openai","model":"gpt-4o","operation":"chat","input_tokens":10,'
...          b'"output_tokens":5,"status":"ok"}', b'{"event_id": oops', b'']
>>> rejects = []
>>> result = replay(lines, Engine.default(), on_reject=rejects.append)
>>> result.events, result.rejected, rejects[0].line, rejects[0].reason
(1, 1, 2, 'not valid JSON: expected value at line 1 column 14')
"""

from __future__ import annotations

import gzip
import io
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from detector.engine import MAX_CLOCK_SKEW, Engine, OutOfTime
from detector.events import Alert, Usage
from detector.wire import decode_usage


@dataclass(frozen=True, slots=True)
class Reject:
    line: int
    reason: str
    raw: bytes

    def to_json(self) -> dict[str, object]:
        return {"line": self.line, "reason": self.reason, "raw": self.raw.decode("utf-8", "replace")[:4096]}


@dataclass
class ReplayResult:
    lines: int = 0
    events: int = 0
    rejected: int = 0
    alerts: int = 0


def explain(error: ValidationError) -> str:
    """One line naming each wrong field and what is wrong with it."""
    parts = []
    for e in error.errors(include_url=False):
        if e["type"] == "json_invalid":
            return f"not valid JSON: {e['ctx']['error']}" if "ctx" in e else "not valid JSON"
        where = ".".join(str(p) for p in e["loc"]) or "event"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def replay(
    lines: Iterable[bytes],
    engine: Engine,
    on_alert: Callable[[Alert], None] | None = None,
    on_reject: Callable[[Reject], None] | None = None,
    finish: bool = True,
    on_event: Callable[[Usage, float], None] | None = None,
) -> ReplayResult:
    """Feed every line to ``engine``; blank lines are skipped, bad ones rejected.

    ``on_event(event, cost_usd)`` sees every valid event after the engine (a live view's feed).
    """
    result = ReplayResult()
    validate = decode_usage
    process = engine.process
    engine.horizon = min(engine.horizon, time.time() + MAX_CLOCK_SKEW)  # no event from the future

    def reject(number: int, reason: str, raw: bytes) -> None:
        result.rejected += 1
        if on_reject is not None:
            on_reject(Reject(number, reason, raw.rstrip(b"\n")))

    for number, raw in enumerate(lines, start=1):
        result.lines = number
        if not raw.strip():
            continue
        try:
            ev = validate(raw)
        except ValidationError as error:
            reject(number, explain(error), raw)
            continue
        try:
            alerts = process(ev)
        except OutOfTime as error:  # dated before 2000 or past the clock
            reject(number, str(error), raw)
            continue
        result.events += 1
        if on_event is not None:
            on_event(ev, engine.last_cost)
        if alerts:
            result.alerts += len(alerts)
            if on_alert is not None:
                for alert in alerts:
                    on_alert(alert)
    if finish:
        for alert in engine.finish():
            result.alerts += 1
            if on_alert is not None:
                on_alert(alert)
    return result


@contextmanager
def open_events(source: str) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Open a path, a ``.gz`` path or ``-``; yields (lines, raw) where ``raw.tell()`` tracks progress."""
    if source == "-":
        yield sys.stdin.buffer, sys.stdin.buffer
        return
    path = Path(source)
    with path.open("rb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield io.BufferedReader(unzipped, buffer_size=1 << 20), raw
        else:
            yield raw, raw
