"""Normal traffic: per-key request streams with SDK retries, and agent sessions.

A key's arrivals are Poisson within each minute, at a rate that follows its team's day
(:meth:`Fleet.activity`) times a slowly varying mean-1 gamma factor whose spread comes from
the Azure trace's minute-level burstiness. Request sizes are drawn from the trace's
quantiles and scaled per key.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detector.simulate.azure_trace import TokenSampler, TraceProfile
from detector.simulate.block import ERROR, F64, I64, OK, RATE_LIMITED, TIMEOUT, Block, Obj, hex_ids
from detector.simulate.fleet import MINUTE, AgentProfile, Fleet, KeyProfile

Multiplier = Callable[[F64], F64]  # minute-start epoch seconds -> rate multiplier

REASONING_MODELS = ("o1", "o3", "o4")
SDK_RETRY_DELAYS = (1.0, 2.0, 4.0)
MAX_AGENT_INPUT = 150_000
TOOL_SHARE = 0.3  # of agent steps that are followed by a tool call


def sampler(trace: TraceProfile, key: KeyProfile) -> TokenSampler:
    return trace.code if key.workload == "code" else trace.conv


def arrival_times(
    fleet: Fleet,
    trace: TraceProfile,
    key: KeyProfile,
    t0: float,
    t1: float,
    rng: np.random.Generator,
    mult: Multiplier | None = None,
    *,
    burst: bool = True,
) -> F64:
    """Request times of ``key`` in ``[t0, t1)``: minute-level Poisson under a gamma-modulated rate."""
    first = np.floor(t0 / MINUTE) * MINUTE
    starts = np.arange(first, t1, MINUTE)
    if starts.size == 0:
        return np.empty(0)
    rate = key.peak_rps * fleet.scale * fleet.activity(key.team, starts + MINUTE / 2)
    if mult is not None:
        rate = rate * mult(starts + MINUTE / 2)
    if burst:
        cv = min(sampler(trace, key).minute_cv, 1.0) * key.burst
        if cv > 0:
            shape = 1.0 / cv**2
            raw = rng.gamma(shape, 1.0 / shape, size=starts.size + 2)
            rate = rate * (raw[:-2] + raw[1:-1] + raw[2:]) / 3.0  # smoothed over three minutes
    counts = rng.poisson(np.maximum(rate, 0.0) * MINUTE)
    t = np.repeat(starts, counts) + rng.random(int(counts.sum())) * MINUTE
    t = t[(t >= t0) & (t < t1)]
    return np.sort(t)


def sizes(trace: TraceProfile, key: KeyProfile, rng: np.random.Generator, n: int) -> tuple[I64, I64, I64]:
    """(input, output, cached) tokens for ``n`` requests of ``key``."""
    smp = sampler(trace, key)
    inp = np.maximum(np.round(smp.context_tokens(rng, n) * key.ctx_scale), 1).astype(np.int64)
    out = np.round(smp.generated_tokens(rng, n) * key.out_scale).astype(np.int64)
    cached = np.zeros(n, dtype=np.int64)
    if key.cached_share > 0:
        share = np.clip(rng.uniform(0.0, 2.0 * key.cached_share, n), 0.0, 0.95)
        hit = (rng.random(n) < 0.6) & (inp >= 1024)
        cached = np.where(hit, np.floor(inp * share), 0).astype(np.int64)
    return inp, out, cached


def reasoning_split(model: Obj, out: I64, rng: np.random.Generator) -> tuple[I64, I64]:
    """Reasoning models think before they answer: output grows, and the thinking is reported."""
    is_reasoning = np.array([str(m).startswith(REASONING_MODELS) for m in model.tolist()], dtype=bool)
    think = np.where(is_reasoning, np.round(out * rng.uniform(1.0, 4.0, out.size)), 0).astype(np.int64)
    return out + think, think


def ok_latency(out: I64, inp: I64, operation: str, rng: np.random.Generator) -> F64:
    n = out.size
    if operation == "embedding":
        base = 30.0 + inp * 0.02
    else:
        base = rng.uniform(200.0, 600.0, n) + out * rng.uniform(8.0, 25.0) + inp * 0.02
    noise: F64 = base * rng.lognormal(0.0, 0.25, n)
    return noise


def fail(block: Block, rows: I64, kinds: Obj, rng: np.random.Generator) -> None:
    """Turn ``rows`` into failed calls of the given statuses (in place): no output, no cost."""
    n = rows.size
    block.status[rows] = kinds
    block.output_tokens[rows] = 0
    block.reasoning[rows] = 0
    block.cached[rows] = 0
    is_rl = kinds == RATE_LIMITED
    is_to = kinds == TIMEOUT
    http = np.where(is_rl, 429, rng.choice(np.array([500, 502, 503]), n, p=[0.5, 0.2, 0.3]))
    block.http_status[rows] = np.where(is_to, 0, http)
    block.error_type[rows] = np.where(is_rl, "rate_limit_exceeded", np.where(is_to, "timeout", "server_error"))
    block.latency_ms[rows] = np.where(
        is_rl,
        rng.uniform(20.0, 200.0, n),
        np.where(is_to, rng.uniform(30_000.0, 60_000.0, n), rng.uniform(100.0, 2000.0, n)),
    )


def requests(
    fleet: Fleet,
    trace: TraceProfile,
    key: KeyProfile,
    t: F64,
    rng: np.random.Generator,
    *,
    background_errors: bool = True,
) -> Block:
    """Successful requests of ``key`` finishing at ``t`` (background failures and SDK retries added)."""
    n = t.size
    models = np.array(key.models, dtype=object)
    model = models[rng.choice(len(key.models), n, p=np.asarray(key.weights) / sum(key.weights))]
    inp, out, cached = sizes(trace, key, rng, n)
    out, think = reasoning_split(model, out, rng)
    user = None
    if key.has_users:
        users = fleet.teams[key.team].users
        p = 1.0 / np.arange(1, len(users) + 1)
        user = np.array(users, dtype=object)[rng.choice(len(users), n, p=p / p.sum())]
    block = Block.build(
        t,
        team=key.team,
        key=key.key_id,
        provider=key.provider,
        model=model,
        operation=key.operation,
        input_tokens=inp,
        output_tokens=out,
        cached=cached,
        reasoning=think,
        latency_ms=ok_latency(out, inp, key.operation, rng),
        user=user,
    )
    if not background_errors or n == 0:
        return block
    u = rng.random(n)
    e, r, o = key.error_rate, key.rate_limit_rate, key.timeout_rate
    kinds = np.where(u < e, ERROR, np.where(u < e + r, RATE_LIMITED, np.where(u < e + r + o, TIMEOUT, OK)))
    failed = np.flatnonzero(kinds != OK)
    if failed.size == 0:
        return block
    original_out = block.output_tokens[failed].copy()
    original_think = block.reasoning[failed].copy()
    original_cached = block.cached[failed].copy()
    fail(block, failed, kinds[failed].astype(object), rng)
    block.fingerprint[failed] = hex_ids(rng, failed.size, 8)
    return Block.concat([block, sdk_retries(block, failed, original_out, original_think, original_cached, rng)])


def sdk_retries(
    block: Block,
    failed: I64,
    out: I64,
    think: I64,
    cached: I64,
    rng: np.random.Generator,
    delays: tuple[float, ...] = SDK_RETRY_DELAYS,
    p_retry: float = 0.9,
    p_fail_again: float = 0.35,
    fail_until: float | None = None,
) -> Block:
    """Well-behaved client retries of failed calls: exponential backoff with jitter, few attempts.

    ``fail_until``: when given, a retry before this instant fails with ``p_fail_again`` and
    every later one succeeds (a short provider outage); otherwise each fails with ``p_fail_again``.
    """
    parts: list[Block] = []
    rows = failed[rng.random(failed.size) < p_retry]
    keep = np.flatnonzero(np.isin(failed, rows))
    out, think, cached = out[keep], think[keep], cached[keep]
    t = block.t[rows].copy()
    for attempt, delay in enumerate(delays, start=1):
        if rows.size == 0:
            break
        t = t + delay * rng.uniform(1.0, 1.25, rows.size) + rng.uniform(0.05, 0.5, rows.size)
        retry = block.take(rows)
        retry.t = t
        retry.retry[:] = attempt
        retry.status[:] = OK
        retry.http_status[:] = 0
        retry.error_type[:] = None
        retry.output_tokens[:] = out
        retry.reasoning[:] = think
        retry.cached[:] = cached
        retry.latency_ms[:] = ok_latency(out, retry.input_tokens, str(retry.operation[0]), rng)
        again = rng.random(rows.size) < p_fail_again
        if fail_until is not None:
            again &= t < fail_until
        again_idx = np.flatnonzero(again)
        fail(retry, again_idx, block.status[rows][again_idx], rng)
        parts.append(retry)
        rows, t, out, think, cached = rows[again], t[again], out[again], think[again], cached[again]
    if not parts:
        return block.take(np.empty(0, dtype=np.int64))
    return Block.concat(parts)


def key_traffic(
    fleet: Fleet,
    trace: TraceProfile,
    key: KeyProfile,
    t0: float,
    t1: float,
    rng: np.random.Generator,
    mult: Multiplier | None = None,
) -> Block:
    return requests(fleet, trace, key, arrival_times(fleet, trace, key, t0, t1, rng, mult), rng)


# -- agents -------------------------------------------------------------------------------------


def normal_steps(agent: AgentProfile, n: int, rng: np.random.Generator) -> tuple[F64, F64]:
    """(gaps before each step, output tokens) of ``n`` ordinary steps."""
    gaps = np.clip(agent.gap_median_s * rng.lognormal(0.0, 0.5, n), 2.0, 20.0)
    gaps[0] = 0.0
    outputs = agent.out_median * rng.lognormal(0.0, 0.7, n)
    return gaps, outputs


def session_length(agent: AgentProfile, rng: np.random.Generator) -> int:
    return int(np.clip(round(agent.median_steps * float(rng.lognormal(0.0, agent.steps_sigma))), 2, 39))


def session_block(
    fleet: Fleet,
    agent: AgentProfile,
    times: F64,
    fingerprints: list[str],
    outputs: F64,
    rng: np.random.Generator,
    session_id: str,
    user: str | None,
) -> Block:
    """The LLM calls of one agent session (one per step), each possibly followed by a tool call."""
    n = times.size
    key = fleet.keys[agent.key_id]
    step = np.arange(n)
    inp = np.minimum(agent.ctx_base + agent.ctx_step * step * rng.uniform(0.8, 1.2, n), MAX_AGENT_INPUT)
    inp_i = np.round(inp).astype(np.int64)
    cached = np.where(step > 0, np.floor(inp_i * 0.75), 0).astype(np.int64)
    out = np.maximum(np.round(outputs), 1).astype(np.int64)
    think = np.round(out * 0.6).astype(np.int64) if agent.model.startswith(REASONING_MODELS) else 0
    calls = Block.build(
        times,
        team=agent.team,
        key=agent.key_id,
        provider=key.provider,
        model=agent.model,
        input_tokens=inp_i,
        output_tokens=out,
        cached=cached,
        reasoning=think,
        latency_ms=ok_latency(out, inp_i, "chat", rng),
        user=user,
        agent=agent.agent_id,
        session=session_id,
        fingerprint=np.array(fingerprints, dtype=object),
    )
    errs = np.flatnonzero(rng.random(n) < 0.003)
    fail(calls, errs, np.full(errs.size, ERROR, dtype=object), rng)
    tool_rows = np.flatnonzero(rng.random(n) < TOOL_SHARE)
    m = tool_rows.size
    tools = Block.build(
        times[tool_rows] + rng.uniform(0.3, 1.5, m),
        team=agent.team,
        key=agent.key_id,
        provider="internal",
        model="tool",
        operation="tool",
        input_tokens=0,
        output_tokens=0,
        latency_ms=rng.uniform(200.0, 1500.0, m),
        user=user,
        agent=agent.agent_id,
        session=session_id,
        tool=np.array(agent.tools, dtype=object)[rng.integers(0, len(agent.tools), m)],
        fixed_cost=np.round(rng.uniform(0.0001, 0.002, m), 6),
    )
    return Block.concat([calls, tools])


def session_user(fleet: Fleet, agent: AgentProfile, rng: np.random.Generator) -> str:
    users = fleet.teams[agent.team].users
    return users[int(rng.integers(0, len(users)))]


def new_session_id(rng: np.random.Generator) -> str:
    return "sess-" + hex_ids(rng, 1, 8)[0]


def agent_sessions(fleet: Fleet, agent: AgentProfile, t0: float, t1: float, rng: np.random.Generator) -> Block:
    """Ordinary sessions of ``agent`` starting in ``[t0, t1)``."""
    starts = np.arange(np.floor(t0 / MINUTE) * MINUTE, t1, MINUTE)
    rate = agent.sessions_per_hour / 60.0 * fleet.scale * fleet.activity(agent.team, starts + MINUTE / 2)
    counts = rng.poisson(rate)
    begins = np.repeat(starts, counts) + rng.random(int(counts.sum())) * MINUTE
    begins = np.sort(begins[(begins >= t0) & (begins < t1)])
    parts = []
    for begin in begins.tolist():
        n = session_length(agent, rng)
        gaps, outputs = normal_steps(agent, n, rng)
        parts.append(
            session_block(
                fleet,
                agent,
                begin + np.cumsum(gaps),
                hex_ids(rng, n, 8),
                outputs,
                rng,
                new_session_id(rng),
                session_user(fleet, agent, rng),
            )
        )
    if not parts:
        return Block.build(
            np.empty(0), team=agent.team, key=agent.key_id, provider="", model="", input_tokens=0, output_tokens=0
        )
    return Block.concat(parts)
