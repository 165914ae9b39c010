"""``detector scorecard``: the detection quality table of the README, over several seeds.

Each seed simulates ``days`` days with incidents after a day of warm-up, replays them through
a fresh engine and scores the alerts; the table pools every seed. False incidents are counted
over the whole span, warm-up included.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from detector.evaluate import KindScore, Scorecard, score
from detector.settings import load_settings

WARMUP_HOURS = 24.0


def run_seed(seed: int, days: float, out: Path) -> Scorecard:
    from detector.cli import read_labels, run_replay
    from detector.simulate import SimulationSpec, write_simulation

    spec = SimulationSpec(seed=seed, days=days, warmup_hours=WARMUP_HOURS)
    paths = write_simulation(spec, out / f"seed-{seed}")
    _, _, alerts = run_replay(
        str(paths["events"]), load_settings(paths["config"]), out / f"seed-{seed}" / "alerts.jsonl", None, None
    )
    return score(
        read_labels(paths["labels"]), [a.model_dump(mode="json") for a in alerts], days=days + WARMUP_HOURS / 24
    )


def _merge(into: dict[str, KindScore], scores: dict[str, KindScore]) -> None:
    for name, s in scores.items():
        agg = into.setdefault(name, KindScore())
        agg.labels += s.labels
        agg.detected += s.detected
        agg.incidents += s.incidents
        agg.true_incidents += s.true_incidents
        agg.latencies.extend(s.latencies)


def pool(cards: list[Scorecard]) -> dict[str, Any]:
    kinds: dict[str, KindScore] = {}
    scenarios: dict[str, KindScore] = {}
    for card in cards:
        _merge(kinds, card.kinds)
        _merge(scenarios, card.scenarios)
    days = sum(c.days for c in cards)
    false = sum(len(c.false_incidents) for c in cards)
    return {
        "days": days,
        "false_incidents": false,
        "false_per_day": round(false / days, 2) if days else 0.0,
        "kinds": {
            name: {
                "labels": s.labels,
                "detected": s.detected,
                "recall": round(s.recall, 3),
                "precision": round(s.precision, 3),
                "median_latency_s": s.median_latency_s,
                "p90_latency_s": s.p90_latency_s,
                "max_latency_s": round(max(s.latencies), 1) if s.latencies else None,
            }
            for name, s in kinds.items()
        },
        "scenarios": {
            name: {"labels": s.labels, "detected": s.detected, "median_latency_s": s.median_latency_s}
            for name, s in sorted(scenarios.items())
        },
    }


def markdown(pooled: dict[str, Any], seeds: list[int], days: float) -> str:
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; each {days:g} days with incidents after a day of warm-up "
        f"({pooled['days']:g} simulated days in all).",
        "",
        "| kind | detected | recall | precision | median latency | p90 latency |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, k in pooled["kinds"].items():
        med = "-" if k["median_latency_s"] is None else f"{k['median_latency_s']:.0f} s"
        p90 = "-" if k["p90_latency_s"] is None else f"{k['p90_latency_s']:.0f} s"
        lines.append(
            f"| {name} | {k['detected']}/{k['labels']} | {k['recall']:.2f} | {k['precision']:.2f} | {med} | {p90} |"
        )
    lines += [
        "",
        f"False incidents, whole fleet: {pooled['false_incidents']} in {pooled['days']:g} days "
        f"= **{pooled['false_per_day']:g} per day**.",
        "",
        "| scenario | detected | median latency |",
        "|---|---:|---:|",
    ]
    for name, k in pooled["scenarios"].items():
        med = "-" if k["median_latency_s"] is None else f"{k['median_latency_s']:.0f} s"
        lines.append(f"| {name} | {k['detected']}/{k['labels']} | {med} |")
    return "\n".join(lines) + "\n"


def run_scorecard(seeds: list[int], days: float, out: Path, jobs: int, console: Console) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with (
        console.status(f"simulating, replaying and scoring {len(seeds)} seeds x {days:g} days ..."),
        ProcessPoolExecutor(max_workers=max(1, min(jobs, len(seeds)))) as ex,
    ):
        cards = list(ex.map(run_seed, seeds, [days] * len(seeds), [out] * len(seeds)))
    pooled = pool(cards)
    table = Table(title=markdown(pooled, seeds, days).splitlines()[0], title_justify="left")
    for column in ("kind", "detected", "recall", "precision", "median s", "p90 s", "max s"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for name, k in pooled["kinds"].items():
        table.add_row(
            name,
            f"{k['detected']}/{k['labels']}",
            f"{k['recall']:.2f}",
            f"{k['precision']:.2f}",
            *("-" if k[c] is None else f"{k[c]:.0f}" for c in ("median_latency_s", "p90_latency_s", "max_latency_s")),
        )
    console.print(table)
    console.print(f"false incidents: {pooled['false_incidents']} = {pooled['false_per_day']:g} per day")
    for seed, card in zip(seeds, cards, strict=True):
        for f in card.false_incidents:
            console.print(
                f"  seed {seed} [yellow]false[/] {f['detected_at']} {f['kind']} {f['owner']} "
                f"{f['entity']}: {f['summary']}",
                highlight=False,
            )
        for m in card.missed:
            console.print(
                f"  seed {seed} [red]missed[/] {m['start']} {m['scenario']} {m['team']} {m['entity']}", highlight=False
            )
    (out / "scorecard.json").write_bytes(
        orjson.dumps(
            {
                "seeds": seeds,
                "days": days,
                **pooled,
                "per_seed": {s: c.to_json() for s, c in zip(seeds, cards, strict=True)},
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
        )
    )
    (out / "scorecard.md").write_text(markdown(pooled, seeds, days))
    console.print(f"written: {out / 'scorecard.json'}, {out / 'scorecard.md'}")
    return 0
