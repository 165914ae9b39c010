"""``detector``: the command line.

Commands: ``replay`` (events file through the engine), ``simulate`` (labelled synthetic fleet
traffic), ``evaluate`` (score alerts against labels), ``demo`` (the two put together),
``bench`` (throughput and memory), ``worker`` (the Kafka worker), ``scorecard`` (several seeds, the README table),
``config`` (the settings in effect) and ``schemas`` (write or check ``schemas/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from detector import __version__, breaker_cli
from detector.alerting.dispatch import Dispatcher
from detector.engine import Engine
from detector.events import Alert, FeedbackLabel, IncidentFeedback, IncidentLabel
from detector.replay import Reject, ReplayResult, open_events, replay
from detector.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from detector.web import Feed


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except BrokenPipeError:  # `detector replay ... | head`
        return 0
    except ConfigError as e:
        print(f"detector: {e}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detector", description="Stormwatch: catch runaway LLM spend as it happens.")
    parser.add_argument("--version", action="version", version=f"stormwatch {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("replay", help="run usage events from a file through the engine")
    p.add_argument("events", help="JSON Lines file, .gz file, or - for stdin")
    p.add_argument("--alerts-out", metavar="ALERTS.jsonl", help="write alert records here (- for stdout)")
    p.add_argument(
        "--rejects-out",
        metavar="REJECTS.jsonl",
        help="where rejected lines go (default: rejects.jsonl beside the alerts, or ./stormwatch-rejects.jsonl)",
    )
    _config_arg(p)
    p.add_argument("--strict", action="store_true", help="exit 2 if any line was rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    act = p.add_mutually_exclusive_group()
    act.add_argument(
        "--notify", action="store_true", help="send the alerts as [alerting] says: Slack, webhooks, breakers"
    )
    act.add_argument("--dry-run", action="store_true", help="print what --notify would send, send nothing")
    _serve_arg(p)
    p.set_defaults(run=_replay)

    p = sub.add_parser("simulate", help="write labelled synthetic fleet traffic")
    _spec_args(p)
    p.add_argument("--out", type=Path, default=Path("out/sim"), help="directory for events, labels, config")
    p.set_defaults(run=_simulate)

    p = sub.add_parser("evaluate", help="score alerts against incident labels")
    p.add_argument("labels", type=Path)
    p.add_argument("alerts", type=Path)
    p.add_argument("--days", type=float, help="span of the traffic (default: from the labels file's meta)")
    p.add_argument("--json", action="store_true", help="print the scorecard as JSON")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("demo", help="simulate a day of traffic with incidents, replay it, show the alerts")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=float, default=1.0, help="days with incidents, after a day of warm-up")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    _serve_arg(p)
    p.set_defaults(run=_demo)

    p = sub.add_parser("scorecard", help="simulate several seeds, replay and evaluate each (README table)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--days", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=Path("out/scorecard"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.set_defaults(run=_scorecard)

    p = sub.add_parser(
        "bench", help="replay throughput against decode-only, memory with 1M sessions, a worker on Kafka"
    )
    p.add_argument("what", choices=["replay", "sessions", "kafka"], nargs="?", default="replay")
    p.add_argument("--events", type=Path, help="events file to replay or produce (default: simulate one)")
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best is kept")
    p.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP"),
        help="kafka: broker host:port (default: $KAFKA_BOOTSTRAP, else start one with deploy/kafka/kafka.sh)",
    )
    p.add_argument("--partitions", type=int, default=8, help="kafka: partitions of the benchmark topics")
    p.add_argument("--rate", type=float, default=10_000.0, help="kafka: events/s of the alert-latency stream")
    p.add_argument("--seconds", type=float, default=20.0, help="kafka: length of the alert-latency stream")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="kafka: also time a worker with these [kafka] settings, on the same events (repeatable)",
    )
    p.set_defaults(run=_bench)

    p = sub.add_parser("worker", help="consume usage events from Kafka, publish alerts (settings: [kafka])")
    _config_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=_worker)

    p = sub.add_parser(
        "produce", help="send usage events from a file to the usage topic, keyed by api_key_id ([kafka])"
    )
    p.add_argument("events", help="JSON Lines of usage events (.gz, or - for stdin)")
    p.add_argument(
        "--rate", type=float, default=0.0, help="events per second (default: as fast as the broker takes them)"
    )
    _config_arg(p)
    p.set_defaults(run=_produce)

    p = sub.add_parser("breaker", help="list, open or close circuit breakers on the breakers topic ([kafka])")
    breaker_cli.add_arguments(p, _config_arg)
    p.set_defaults(run=breaker_cli.run)

    p = sub.add_parser("alerter", help="alerts topic -> Slack, kill-switch webhooks and breakers ([alerting])")
    _config_arg(p)
    p.set_defaults(run=_alerter)

    p = sub.add_parser("feedback", help="label an incident real, false_alarm or planned (on the alerts topic)")
    p.add_argument("incident_id")
    p.add_argument("label", choices=[x.value for x in FeedbackLabel])
    p.add_argument("--by", default=os.environ.get("USER", "unknown"), help="who labels it (default: $USER)")
    p.add_argument("--note", default="", help="why, for the record")
    p.add_argument("--silence", default=None, help="how long the pattern stays quiet, e.g. 12h (default: config)")
    _config_arg(p)
    p.set_defaults(run=_feedback)

    p = sub.add_parser(
        "config", help="check the settings (file and STORMWATCH_* variables); print them in effect, secrets masked"
    )
    _config_arg(p)
    p.set_defaults(run=_config)

    p = sub.add_parser("schemas", help="write or check the JSON Schemas in schemas/")
    p.add_argument("--dir", type=Path, default=Path("schemas"))
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    p.set_defaults(run=_schemas)
    return parser


def _serve_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--serve",
        action="store_true",
        help="then keep the dashboard, API and /metrics up on [web] host:port (127.0.0.1:8080) until Ctrl-C",
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("STORMWATCH_CONFIG"),
        help="TOML or YAML config file (default: $STORMWATCH_CONFIG); STORMWATCH_* variables override it",
    )


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=float, default=1.0, help="days with labelled incidents")
    p.add_argument("--warmup-hours", type=float, default=24.0, help="normal traffic before the first incident")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every request rate")


def _settings(path: Path | None) -> Settings:
    return load_settings(Path(path) if path else None)


# -- replay -------------------------------------------------------------------------------


class _Sink:
    """JSON Lines to a file or stdout, opened on first write."""

    def __init__(self, target: str | Path | None) -> None:
        self.target = target
        self._fh: IO[bytes] | None = None
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        if self.target is None:
            return
        if self._fh is None:
            if str(self.target) == "-":
                self._fh = sys.stdout.buffer
            else:
                Path(self.target).parent.mkdir(parents=True, exist_ok=True)
                self._fh = Path(self.target).open("wb")  # noqa: SIM115 - closed by close()
        self._fh.write(orjson.dumps(record) + b"\n")
        self.count += 1

    def close(self, create: bool = False) -> None:
        """``create``: an empty file where nothing was written (a script's next step can read it)."""
        if create and self._fh is None and self.target is not None and str(self.target) != "-":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            Path(self.target).write_bytes(b"")
        if self._fh is not None and self._fh is not sys.stdout.buffer:
            self._fh.close()
        elif self._fh is not None:
            self._fh.flush()


def _lines_with_progress(lines: BinaryIO, raw: BinaryIO, source: str, console: Console) -> Iterator[bytes]:
    size = Path(source).stat().st_size if source != "-" else None
    columns = [TextColumn("[bold]replay"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("replay", total=size)
        for i, line in enumerate(lines):
            if i & 0xFFFF == 0 and size:
                progress.update(task, completed=raw.tell())
            yield line


def run_replay(
    source: str,
    settings: Settings,
    alerts_out: str | Path | None,
    rejects_out: str | Path | None,
    console: Console | None,
    feed: Feed | None = None,
) -> tuple[ReplayResult, Engine, list[Alert]]:
    """Replay ``source`` into a fresh engine; alerts go to ``alerts_out`` and are returned too.

    With a ``feed`` (``--serve``), a live view sees every event, alert and reject as well.
    """
    engine = Engine.from_settings(settings)
    alerts: list[Alert] = []
    alert_sink, reject_sink = _Sink(alerts_out), _Sink(rejects_out)

    def on_alert(alert: Alert) -> None:
        alerts.append(alert)
        alert_sink.write(alert.model_dump(mode="json"))
        if feed is not None:
            feed.observe_alert(alert)

    def on_reject(reject: Reject) -> None:
        reject_sink.write(reject.to_json())
        if feed is not None:
            feed.observe_reject(reject.reason)
        if console is not None and reject_sink.count <= 5:
            console.print(f"[yellow]line {reject.line} rejected:[/] {reject.reason}", highlight=False)

    try:
        with open_events(source) as (lines, raw):
            show = console is not None and console.is_terminal
            stream = _lines_with_progress(lines, raw, source, console) if show and console else lines
            on_event = feed.observe_event if feed is not None else None
            result = replay(stream, engine, on_alert, on_reject, on_event=on_event)
    finally:
        alert_sink.close(create=True)  # no alerts: an empty file, not none
        reject_sink.close()
    return result, engine, alerts


def _replay(args: argparse.Namespace) -> int:
    to_stdout = args.alerts_out == "-"
    console = None if args.quiet else Console(stderr=to_stdout)
    rejects = args.rejects_out or (
        Path(args.alerts_out).with_name("rejects.jsonl")
        if args.alerts_out and not to_stdout
        else Path("stormwatch-rejects.jsonl")
    )
    settings = _settings(args.config)
    feed = _live_feed() if args.serve else None
    result, engine, alerts = run_replay(args.events, settings, args.alerts_out, rejects, console, feed)
    if console is not None:
        _print_summary(console, result, engine, alerts, rejects)
    if args.notify or args.dry_run:
        left = asyncio.run(notify(settings, alerts, dry_run=args.dry_run, console=console or Console(stderr=True)))
        if left:
            return 3
    if feed is not None:
        _serve(feed, settings, alerts, console or Console(stderr=True))
    return 2 if args.strict and result.rejected else 0


def _live_feed() -> Feed:
    from detector.web import Feed, LiveView, Metrics

    view = LiveView()
    return Feed(view, Metrics(view))


def _serve(feed: Feed, settings: Settings, alerts: Sequence[Alert], console: Console) -> None:
    """The dashboard over a finished replay, until Ctrl-C: breakers as the [alerting] policy set them."""
    from detector.web import (
        LocalBreakerControl,
        LocalFeedback,
        answers_to,
        bound_port,
        create_web_app,
        serve,
        url_host,
    )

    policy = Dispatcher(settings, dry_run=True, echo=lambda line: None, on_change=feed.observe_breaker)

    async def run() -> None:
        for alert in alerts:  # what the policy would have done, in event time, shown on the page
            await policy.handle(alert, alert.detected_at.timestamp())
        await policy.advance(feed.view.watermark)
        w = settings.web
        token = w.api_token.get_secret_value() if w.api_token is not None else None
        app = create_web_app(
            feed.view,
            feed.metrics,
            breaker_control=LocalBreakerControl(feed.view),
            feedback_sink=LocalFeedback(),
            api_token=token,
            allowed_hosts=answers_to(w.host, w.allowed_hosts),
        )
        runner = await serve(app, w.host, w.port)
        access = "changes need the bearer token" if token else "read-only: set STORMWATCH_WEB__API_TOKEN for changes"
        console.print(
            f"dashboard: http://{url_host(w.host)}:{bound_port(runner)}/  "
            f"(API /api/incidents, metrics /metrics; {access})  Ctrl-C stops it.",
            highlight=False,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


async def notify(settings: Settings, alerts: Sequence[Alert], *, dry_run: bool, console: Console) -> int:
    """The alerting agents over a replay's alerts, in event time; returns the deliveries still pending."""
    dispatcher = Dispatcher(settings, dry_run=dry_run, echo=lambda line: console.print(line, highlight=False))
    try:
        for alert in alerts:
            await dispatcher.handle(alert, alert.detected_at.timestamp())
        left = await dispatcher.drain(timeout=60.0)
        if left:
            console.print(f"[red]{left} deliveries still pending in {settings.alerting.outbox_path}[/]")
        console.print(f"alerting: {dispatcher.summary()}", highlight=False)
        return left
    finally:
        await dispatcher.close()


def _print_summary(
    console: Console, result: ReplayResult, engine: Engine, alerts: list[Alert], rejects: Path | str
) -> None:
    stats = engine.stats
    table = Table(title="replay", show_header=False, title_justify="left")
    table.add_row("events", f"{result.events:,}")
    table.add_row("rejected", f"{result.rejected:,}" + (f"  (see {rejects})" if result.rejected else ""))
    table.add_row("late (> lateness)", f"{stats.late_events:,}")
    table.add_row("unpriced (unknown model, no cost_usd)", f"{stats.unpriced_events:,}")
    table.add_row("spend", f"${sum(stats.spend_by_team.values()):,.2f}")
    table.add_row("incidents", f"{len({a.incident_id for a in alerts})}")
    for (kind, status), n in sorted(stats.alerts.items()):
        table.add_row(f"  {kind} {status}", str(n))
    console.print(table)
    if alerts:
        print_incidents(console, alerts)


def print_incidents(console: Console, alerts: list[Alert], limit: int = 40) -> None:
    """One entry per incident, from its firing record: a header line, then what happened."""
    firing = [a for a in alerts if a.status.value == "firing"]
    console.print(f"[bold]incidents ({len(firing)})[/]")
    colour = {"critical": "red", "warning": "yellow", "info": "blue"}
    for a in firing[:limit]:
        sev = a.severity.value
        console.print(
            f"[bold]{a.detected_at:%a %H:%M:%S}[/]  {a.kind.value:<11} [{colour[sev]}]{sev:<8}[/] "
            f"team {a.owner}  {a.entity}  ${a.cost_rate_usd_per_hour:,.2f}/h",
            highlight=False,
        )
        console.print(f"    {a.explanation.summary}", highlight=False, soft_wrap=False)
    if len(firing) > limit:
        console.print(f"... and {len(firing) - limit} more in the alerts file")


# -- simulate, evaluate, demo ----------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from detector.simulate import SimulationSpec, write_simulation

    spec = SimulationSpec(seed=args.seed, days=args.days, warmup_hours=args.warmup_hours, scale=args.scale)
    paths = write_simulation(spec, args.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def read_labels(path: Path) -> list[IncidentLabel]:
    with path.open("rb") as fh:
        return [IncidentLabel.model_validate_json(line) for line in fh if line.strip()]


def read_alerts(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def _evaluate(args: argparse.Namespace) -> int:
    from detector.evaluate import score

    labels = read_labels(args.labels)
    days = args.days or _days_from_meta(args.labels) or 1.0
    card = score(labels, read_alerts(args.alerts), days=days)
    if args.json:
        sys.stdout.write(orjson.dumps(card.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_scorecard(Console(), card)
    return 0


def _days_from_meta(labels_path: Path) -> float | None:
    meta = labels_path.with_name("simulation.json")
    if not meta.exists():
        return None
    days: float = orjson.loads(meta.read_bytes())["span_days"]
    return days


def print_scorecard(console: Console, card: Any) -> None:
    from detector.evaluate import table_rows

    table = Table(title=f"evaluation over {card.days:g} days", title_justify="left")
    for column in ("kind / scenario", "detected", "recall", "precision", "median s", "p90 s"):
        table.add_column(column, justify="left" if column.startswith("kind") else "right")
    for row in table_rows(card):
        table.add_row(*row)
    console.print(table)
    console.print(f"false incidents: {len(card.false_incidents)} ({card.false_per_day:g} per day)")
    if card.feedback:
        counts = ", ".join(f"{sum(kinds.values())} {label}" for label, kinds in sorted(card.feedback.items()))
        precision = card.owner_precision
        console.print(
            f"owners' labels: {counts}"
            + (f"; precision by their labels {precision:.0%}" if precision is not None else ""),
            highlight=False,
        )
    for f in card.false_incidents[:10]:
        console.print(
            f"  [yellow]false[/] {f['detected_at']} {f['kind']} {f['owner']}: {f['summary']}", highlight=False
        )
    for m in card.missed[:10]:
        console.print(f"  [red]missed[/] {m['start']} {m['scenario']} {m['team']} {m['entity']}", highlight=False)


def _demo(args: argparse.Namespace) -> int:
    from detector.evaluate import score
    from detector.simulate import SimulationSpec, write_simulation

    console = Console()
    spec = SimulationSpec(seed=args.seed, days=args.days, warmup_hours=24.0)
    with console.status(f"simulating {args.days:g} day(s) of fleet traffic after a day of warm-up ..."):
        paths = write_simulation(spec, args.out)
    console.print(f"simulated traffic: {paths['events']}  (labels: {paths['labels']}, config: {paths['config']})")
    settings = load_settings(paths["config"])
    alerts_path = args.out / "alerts.jsonl"
    feed = _live_feed() if args.serve else None
    result, engine, alerts = run_replay(
        str(paths["events"]), settings, alerts_path, args.out / "rejects.jsonl", console, feed
    )
    _print_summary(console, result, engine, alerts, args.out / "rejects.jsonl")
    card = score(
        read_labels(paths["labels"]),
        [a.model_dump(mode="json") for a in alerts],
        days=spec.days + spec.warmup_hours / 24,
    )
    print_scorecard(console, card)
    console.print(f"alerts written to {alerts_path}")
    if feed is not None:
        _serve(feed, settings, alerts, console)
    return 0


def _scorecard(args: argparse.Namespace) -> int:
    from detector.scorecard import run_scorecard

    return run_scorecard(args.seeds, args.days, args.out, args.jobs, Console())


def _bench(args: argparse.Namespace) -> int:
    from detector import bench

    console = Console()
    if args.what == "kafka":
        from detector import bench_kafka

        variants = [dict(kv.split("=", 1) for kv in also.split(",")) for also in args.also]
        bench_kafka.kafka(
            args.bootstrap, args.events, args.repeat, args.partitions, args.rate, args.seconds, console, variants
        )
    elif args.what == "sessions":
        bench.sessions(args.sessions, console)
    else:
        bench.throughput(args.events, args.repeat, console)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from detector.worker.app import run_worker

    return run_worker(_settings(args.config), loglevel=args.log_level)


def _produce(args: argparse.Namespace) -> int:
    from detector.produce import produce

    k = _settings(args.config).kafka
    console = Console(stderr=True)
    started = time.monotonic()
    sent = asyncio.run(produce(k, args.events, args.rate))
    took = time.monotonic() - started
    console.print(f"sent {sent:,} events to {k.usage_topic} on {k.bootstrap_servers} in {took:.1f} s")
    return 0


def _alerter(args: argparse.Namespace) -> int:
    from detector.alerting.alerter import run_alerter

    return run_alerter(_settings(args.config))


def _feedback(args: argparse.Namespace) -> int:
    from detector.alerting.alerter import find_incident, publish_feedback
    from detector.breakers import parse_duration

    settings = _settings(args.config)
    console = Console(stderr=True)
    alert = asyncio.run(find_incident(settings, args.incident_id))
    if alert is None:
        console.print(f"[red]no incident {args.incident_id} on {settings.kafka.alerts_topic}[/]")
        return 1
    silence = parse_duration(args.silence) if args.silence else settings.alerting.silence_seconds
    feedback = IncidentFeedback(
        feedback_id=str(uuid.uuid4()),
        incident_id=alert.incident_id,
        kind=alert.kind,
        entity=alert.entity,
        team=alert.owner,
        label=FeedbackLabel(args.label),
        actor=args.by,
        labelled_at=datetime.now(UTC),
        silence_seconds=0 if args.label == "real" else silence,
        note=args.note,
    )
    asyncio.run(publish_feedback(settings, feedback))
    console.print(f"{alert.kind.value} on {alert.entity} labelled {args.label} by {args.by}", highlight=False)
    return 0


def _config(args: argparse.Namespace) -> int:
    """Every setting in effect, defaults included, as JSON; a wrong one exits 2 (see :func:`main`)."""
    settings = _settings(args.config)
    sys.stdout.buffer.write(orjson.dumps(settings.model_dump(mode="json"), option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from detector import schemas

    if args.check:
        if not args.dir.is_dir():
            print(f"no {args.dir}/ here: run it in the repository, or give --dir", file=sys.stderr)
            return 1
        stale = schemas.drift(args.dir)
        for name in stale:
            print(f"{args.dir / name} differs from the models; run `detector schemas --write`", file=sys.stderr)
        return 1 if stale else 0
    if args.write:
        for path in schemas.write(args.dir):
            print(path)
        return 0
    for name in schemas.FILES:
        print(schemas.render(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
