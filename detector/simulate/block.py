"""Columnar batches of simulated requests, and their assembly into sorted event dicts.

Generators and injectors work on :class:`Block`, a set of equally long numpy columns (one row
per request), because sampling, masking and re-pricing whole columns is what keeps a
simulated day fast. Only at the very end are rows turned into JSON-ready dicts, in chunks,
so a long simulation can be streamed to disk without holding millions of dicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray

from detector.pricing import PriceCatalog, TierPrices

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Obj = NDArray[np.object_]

OK = "ok"
ERROR = "error"
RATE_LIMITED = "rate_limited"
TIMEOUT = "timeout"

COST_OMITTED_SHARE = 0.10  # of billed events, left for the consumer's price catalog


def obj(values: Any, n: int) -> Obj:
    """An object column of length ``n``: a scalar broadcast, or a sequence copied."""
    if isinstance(values, np.ndarray) and values.dtype == np.object_:
        return values
    out = np.empty(n, dtype=object)
    if isinstance(values, (list, tuple, np.ndarray)):
        out[:] = list(values)
    else:
        out[:] = [values] * n
    return out


def hex_ids(rng: np.random.Generator, n: int, nbytes: int) -> list[str]:
    """``n`` random lowercase hex strings of ``2 * nbytes`` characters, drawn from ``rng``."""
    if n == 0:
        return []
    width = 2 * nbytes
    h = rng.bytes(nbytes * n).hex()
    return [h[i : i + width] for i in range(0, width * n, width)]


@dataclass
class Block:
    """Requests as columns. Missing optional values are ``None`` (objects), 0 or NaN (numbers)."""

    t: F64  # epoch seconds at which the request finished
    team: Obj
    key: Obj
    provider: Obj
    model: Obj
    operation: Obj
    input_tokens: I64
    output_tokens: I64
    cached: I64  # 0 = omitted
    reasoning: I64  # 0 = omitted
    status: Obj
    http_status: I64  # 0 = omitted
    error_type: Obj
    retry: I64
    latency_ms: F64
    user: Obj
    agent: Obj
    session: Obj
    fingerprint: Obj
    tool: Obj
    fixed_cost: F64  # NaN = price from the catalog (0 for failed calls)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @classmethod
    def build(
        cls,
        t: F64,
        *,
        team: Any,
        key: Any,
        provider: Any,
        model: Any,
        input_tokens: Any,
        output_tokens: Any,
        operation: Any = "chat",
        cached: Any = 0,
        reasoning: Any = 0,
        status: Any = OK,
        http_status: Any = 0,
        error_type: Any = None,
        retry: Any = 0,
        latency_ms: Any = np.nan,
        user: Any = None,
        agent: Any = None,
        session: Any = None,
        fingerprint: Any = None,
        tool: Any = None,
        fixed_cost: Any = np.nan,
    ) -> Block:
        n = int(np.shape(t)[0])

        def ints(v: Any) -> I64:
            return np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)).copy()

        def floats(v: Any) -> F64:
            return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()

        return cls(
            t=np.asarray(t, dtype=np.float64),
            team=obj(team, n),
            key=obj(key, n),
            provider=obj(provider, n),
            model=obj(model, n),
            operation=obj(operation, n),
            input_tokens=ints(input_tokens),
            output_tokens=ints(output_tokens),
            cached=ints(cached),
            reasoning=ints(reasoning),
            status=obj(status, n),
            http_status=ints(http_status),
            error_type=obj(error_type, n),
            retry=ints(retry),
            latency_ms=floats(latency_ms),
            user=obj(user, n),
            agent=obj(agent, n),
            session=obj(session, n),
            fingerprint=obj(fingerprint, n),
            tool=obj(tool, n),
            fixed_cost=floats(fixed_cost),
        )

    def take(self, index: NDArray[Any]) -> Block:
        return Block(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concat(cls, blocks: Sequence[Block]) -> Block:
        blocks = [b for b in blocks if len(b)] or list(blocks[:1])
        return cls(**{f.name: np.concatenate([getattr(b, f.name) for b in blocks]) for f in fields(cls)})


def costs(block: Block, catalog: PriceCatalog) -> F64:
    """USD per row, as ``catalog.cost`` computes it (same float operations); 0 for failed calls."""
    out = np.zeros(len(block))
    billed = block.status == OK
    models = block.model
    for model in np.unique(models[billed]).tolist():
        rows = np.flatnonzero(billed & (models == model))
        prices = catalog.lookup(str(model))
        if prices is None:
            continue
        inp = block.input_tokens[rows].astype(np.float64)
        cached = block.cached[rows].astype(np.float64)
        out_tok = block.output_tokens[rows].astype(np.float64)
        tiers: list[tuple[NDArray[np.bool_], TierPrices]] = [(np.ones(rows.size, dtype=bool), prices)]
        if prices.long_context is not None:
            long = block.input_tokens[rows] > prices.long_context.above_input_tokens
            tiers = [(~long, prices), (long, prices.long_context)]
        for sel, tier in tiers:
            cached_price = tier.input if tier.cached_input is None else tier.cached_input
            fresh = inp[sel] - cached[sel]
            out[rows[sel]] = (fresh * tier.input + cached[sel] * cached_price + out_tok[sel] * tier.output) * 1e-6
    fixed = ~np.isnan(block.fixed_cost)
    out[fixed] = block.fixed_cost[fixed]
    return out


@dataclass
class Columns:
    """The final, time-sorted columns, ready to become event dicts."""

    block: Block
    cost: F64  # NaN = omit cost_usd
    event_id: list[str]
    timestamp: list[str]

    def __len__(self) -> int:
        return len(self.block)


def assemble(blocks: Sequence[Block], catalog: PriceCatalog, rng: np.random.Generator) -> Columns:
    """Concatenate, price, sort by finishing time (to the millisecond) and name every row."""
    merged = Block.concat(blocks)
    n = len(merged)
    millis = np.round(merged.t * 1000.0).astype(np.int64)
    order = np.argsort(millis, kind="stable")
    merged = merged.take(order)
    millis = millis[order]
    cost = costs(merged, catalog)
    omit = (rng.random(n) < COST_OMITTED_SHARE) & (merged.status == OK) & np.isnan(merged.fixed_cost)
    cost[omit] = np.nan
    stamps = np.datetime_as_string(millis.astype("datetime64[ms]"), unit="ms").tolist()
    return Columns(merged, cost, hex_ids(rng, n, 16), stamps)


def iter_dicts(cols: Columns, chunk: int = 50_000) -> Iterator[dict[str, Any]]:
    """JSON-ready event dicts in time order; absent optional fields are left out."""
    b = cols.block
    for lo in range(0, len(cols), chunk):
        hi = min(lo + chunk, len(cols))
        sl = slice(lo, hi)
        latency = np.round(b.latency_ms[sl], 1)
        rows = zip(
            cols.event_id[sl],
            cols.timestamp[sl],
            b.team[sl].tolist(),
            b.key[sl].tolist(),
            b.provider[sl].tolist(),
            b.model[sl].tolist(),
            b.operation[sl].tolist(),
            b.input_tokens[sl].tolist(),
            b.output_tokens[sl].tolist(),
            b.status[sl].tolist(),
            b.user[sl].tolist(),
            b.agent[sl].tolist(),
            b.session[sl].tolist(),
            b.cached[sl].tolist(),
            b.reasoning[sl].tolist(),
            cols.cost[sl].tolist(),
            latency.tolist(),
            b.http_status[sl].tolist(),
            b.error_type[sl].tolist(),
            b.retry[sl].tolist(),
            b.fingerprint[sl].tolist(),
            b.tool[sl].tolist(),
            strict=True,
        )
        for (
            eid,
            ts,
            team,
            key,
            prov,
            model,
            op,
            inp,
            out,
            st,
            user,
            agent,
            sess,
            cached,
            reas,
            cost,
            lat,
            http,
            et,
            retry,
            fp,
            tool,
        ) in rows:
            d: dict[str, Any] = {
                "event_id": eid,
                "timestamp": ts + "Z",
                "team": team,
                "api_key_id": key,
                "provider": prov,
                "model": model,
                "operation": op,
                "input_tokens": inp,
                "output_tokens": out,
                "status": st,
            }
            if user is not None:
                d["user"] = user
            if agent is not None:
                d["agent_id"] = agent
            if sess is not None:
                d["session_id"] = sess
            if cached:
                d["cached_input_tokens"] = cached
            if reas:
                d["reasoning_tokens"] = reas
            if cost == cost:  # not NaN
                d["cost_usd"] = round(cost, 6)
            if lat == lat:
                d["latency_ms"] = lat
            if http:
                d["http_status"] = http
            if et is not None:
                d["error_type"] = et
            if retry:
                d["retry_attempt"] = retry
            if fp is not None:
                d["request_fingerprint"] = fp
            if tool is not None:
                d["tool_name"] = tool
            yield d
