"""Write a simulation to disk: gzipped JSONL events, JSONL labels, a TOML config with budgets."""

from __future__ import annotations

import gzip
from itertools import islice
from pathlib import Path

import orjson

from detector.simulate.simulation import Plan, SimulationSpec, plan


def write_simulation(spec: SimulationSpec, out_dir: Path) -> dict[str, Path]:
    """Write ``events.jsonl.gz``, ``labels.jsonl``, ``stormwatch.toml`` and ``simulation.json``.

    Byte-identical for the same spec: the gzip header carries no name and no time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = plan(spec)
    paths = {
        "events": out_dir / "events.jsonl.gz",
        "labels": out_dir / "labels.jsonl",
        "config": out_dir / "stormwatch.toml",
        "meta": out_dir / "simulation.json",
    }
    with (
        paths["events"].open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=4) as gz,
    ):
        events = p.events()
        while chunk := list(islice(events, 20_000)):
            gz.write(b"\n".join(map(orjson.dumps, chunk)) + b"\n")
    paths["labels"].write_bytes(b"".join(orjson.dumps(lb.model_dump(mode="json")) + b"\n" for lb in p.labels))
    paths["config"].write_text(config_toml(p))
    paths["meta"].write_bytes(orjson.dumps(meta(p), option=orjson.OPT_INDENT_2) + b"\n")
    return paths


ALERTING_TOML = """\
# What happens to alerts (try `detector replay ... --dry-run`): retry storms and agent loops
# trip the breaker of their key, agent or session; everything else notifies the owner.
[alerting]
default_owner = "platform"

[[alerting.rules]]
kind = "retry_storm"
min_severity = "warning"
action = "trip"
breaker_ttl = "15m"

[[alerting.rules]]
kind = "agent_loop"
min_severity = "warning"
action = "trip"
breaker_ttl = "30m"

[[alerting.rules]]
kind = "*"
min_severity = "warning"
action = "notify"
"""


def config_toml(p: Plan) -> str:
    lines = [f"# Budgets of the simulated fleet (seed {p.spec.seed}); normal traffic stays well inside them.", ""]
    for team in sorted(p.budgets):
        lines += [
            f"[teams.{team}]",
            f"monthly_budget_usd = {p.budgets[team]:.2f}",
            f"spent_to_date_usd = {p.spent_to_date.get(team, 0.0):.2f}",
            f'slack_channel = "C-{team.upper()}"  # the Slack channel id of the team',
            "",
        ]
    return "\n".join(lines) + "\n" + ALERTING_TOML


def meta(p: Plan) -> dict[str, object]:
    spec = p.spec
    return {
        "seed": spec.seed,
        "days": spec.days,
        "warmup_hours": spec.warmup_hours,
        "scale": spec.scale,
        "start": spec.start.isoformat(),
        "span_days": spec.span_days,
        "events": len(p.columns),
        "labels": len(p.labels),
        "skipped_scenarios": p.skipped,
        "source": "request sizes from the Azure LLM inference trace 2023 "
        "(CC-BY 4.0; Patel et al., Splitwise, ISCA 2024)",
    }
