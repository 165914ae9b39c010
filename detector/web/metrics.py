"""Prometheus metrics of a Stormwatch shell, on a registry of their own (never the global one).

Counters and the latency histogram are fed by the shell, like the view (:class:`Metrics`
has the same ``observe_*`` methods). The consumer lag and snapshot gauges are set by the
Kafka worker. Breaker states, open incidents and the event-time watermark are read from the
:class:`~detector.web.view.LiveView` at scrape time, so they are never out of step with the page.

Every label has a bounded set of values: reject reasons are classes
(:func:`~detector.web.view.reason_class`), and spend is labelled by at most
``max_spend_series`` (team, model) pairs; past that, new pairs count as ``(other)``.

>>> from detector.events import UsageEvent
>>> m = Metrics()
>>> m.observe_event(UsageEvent.model_validate({
...     "event_id": "e1", "timestamp": "2026-11-02T09:30:10Z", "team": "search", "api_key_id": "k1",
...     "provider": "openai", "model": "gpt-4o", "operation": "chat", "input_tokens": 1000,
...     "output_tokens": 100, "status": "ok"}), cost_usd=0.25)
>>> m.observe_reject("not valid JSON: expected value")
>>> text = m.render().decode()
>>> 'stormwatch_spend_usd_total{model="gpt-4o",team="search"} 0.25' in text
True
>>> 'stormwatch_events_rejected_total{reason="not_json"} 1.0' in text
True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from detector.events import Alert, AlertKind, BreakerState, Severity, Usage
from detector.web.view import BREAKER_ENTITY_TYPES, OTHER, LiveView, reason_class

PREFIX: Final = "stormwatch_"

#: Seconds, from 50 µs (one event through the engine) to 10 s (a stalled shell).
LATENCY_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Every metric this module exports, by its name in the exposition (counters with ``_total``,
#: the histogram with its ``_bucket``/``_sum``/``_count`` series). The Grafana and Prometheus
#: files in ``deploy/`` may use only these; a test holds them to it.
EXPORTED: Final[frozenset[str]] = frozenset(
    {
        "stormwatch_events_processed_total",
        "stormwatch_events_rejected_total",
        "stormwatch_alerts_total",
        "stormwatch_spend_usd_total",
        "stormwatch_processing_latency_seconds_bucket",
        "stormwatch_processing_latency_seconds_sum",
        "stormwatch_processing_latency_seconds_count",
        "stormwatch_consumer_lag",
        "stormwatch_snapshot_timestamp_seconds",
        "stormwatch_snapshot_bytes",
        "stormwatch_breakers",
        "stormwatch_breaker_oldest_open_timestamp_seconds",
        "stormwatch_incidents_active",
        "stormwatch_event_time_watermark_seconds",
        "stormwatch_last_event_timestamp_seconds",
    }
)


class Metrics:
    """The shell's metrics. ``view`` (optional) supplies the breaker, incident and watermark gauges."""

    def __init__(self, view: LiveView | None = None, *, max_spend_series: int = 2_000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_spend_series = max_spend_series
        r = self.registry
        self.events_processed = Counter(
            f"{PREFIX}events_processed", "Valid usage events run through the engine.", registry=r
        )
        self.events_rejected = Counter(
            f"{PREFIX}events_rejected",
            "Messages refused (not JSON, or breaking the event contract), by reason class.",
            ["reason"],
            registry=r,
        )
        self.alerts = Counter(
            f"{PREFIX}alerts",
            "Alert records produced, by kind, status and severity.",
            ["kind", "status", "severity"],
            registry=r,
        )
        self.spend = Counter(
            f"{PREFIX}spend_usd",
            "Spend of the events processed, in US dollars, by team and model.",
            ["team", "model"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}processing_latency_seconds",
            "Wall-clock time the shell took to process one event (validation, engine, sinks).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}consumer_lag",
            "Messages of the usage topic not yet processed, per partition (the worker sets it).",
            ["topic", "partition"],
            registry=r,
        )
        self.snapshot_timestamp = Gauge(
            f"{PREFIX}snapshot_timestamp_seconds",
            "Wall-clock time of the newest engine snapshot written, per partition.",
            ["partition"],
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            f"{PREFIX}snapshot_bytes",
            "Size of the newest engine snapshot, compressed, per partition.",
            ["partition"],
            registry=r,
        )
        self.last_event = Gauge(
            f"{PREFIX}last_event_timestamp_seconds",
            "Wall-clock time at which the shell last processed an event (set by mark_event_seen).",
            registry=r,
        )
        self._spend_children: dict[tuple[str, str], Counter] = {}
        self._reject_children: dict[str, Counter] = {}
        self._alert_children: dict[tuple[str, str, str], Counter] = {}
        for kind in AlertKind:  # zero series exist from the start, so rates and absent() behave
            for severity in Severity:
                self._alert_child(kind.value, "firing", severity.value)
        if view is not None:
            r.register(_ViewCollector(view))

    # -- fed by the shell ---------------------------------------------------------------------

    def observe_event(self, ev: Usage, cost_usd: float) -> None:
        self.events_processed.inc()
        key = (ev.team, ev.model)
        child = self._spend_children.get(key)
        if child is None:
            if len(self._spend_children) >= self.max_spend_series:
                key = (ev.team, OTHER) if (ev.team, OTHER) in self._spend_children else (OTHER, OTHER)
                child = self._spend_children.get(key)
            if child is None:
                child = self._spend_children[key] = self.spend.labels(team=key[0], model=key[1])
        if cost_usd > 0:
            child.inc(cost_usd)

    def observe_reject(self, reason: str) -> None:
        cls = reason_class(reason)
        child = self._reject_children.get(cls)
        if child is None:
            child = self._reject_children[cls] = self.events_rejected.labels(reason=cls)
        child.inc()

    def observe_alert(self, alert: Alert) -> None:
        self._alert_child(alert.kind.value, alert.status.value, alert.severity.value).inc()

    def observe_latency(self, seconds: float) -> None:
        """Processing time of one event, in seconds (a batch of n: call with total / n, n times, or once)."""
        self.latency.observe(seconds)

    def mark_event_seen(self, wall_time: float) -> None:
        """Wall-clock time of the last event processed; Prometheus alerts when it stops moving."""
        self.last_event.set(wall_time)

    def set_consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a partition's series when it moves to another worker (it reports them from now on)."""
        for gauge, labels in (
            (self.consumer_lag, (topic, str(partition))),
            (self.snapshot_timestamp, (str(partition),)),
            (self.snapshot_bytes, (str(partition),)),
        ):
            with contextlib.suppress(KeyError):  # never set on this worker
                gauge.remove(*labels)

    def mark_snapshot(self, partition: int, wall_time: float, size_bytes: int) -> None:
        self.snapshot_timestamp.labels(partition=str(partition)).set(wall_time)
        self.snapshot_bytes.labels(partition=str(partition)).set(size_bytes)

    # -- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def _alert_child(self, kind: str, status: str, severity: str) -> Counter:
        key = (kind, status, severity)
        child = self._alert_children.get(key)
        if child is None:
            child = self._alert_children[key] = self.alerts.labels(kind=kind, status=status, severity=severity)
        return child


class _ViewCollector(Collector):
    """Gauges read from the view when Prometheus scrapes."""

    def __init__(self, view: LiveView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view
        breakers = GaugeMetricFamily(
            f"{PREFIX}breakers",
            "Circuit breakers by entity type and state, as the view last saw them.",
            labels=["entity_type", "state"],
        )
        counts = view.breaker_counts()
        for entity_type in BREAKER_ENTITY_TYPES:
            for state in BreakerState:
                breakers.add_metric([entity_type, state.value], counts.get((entity_type, state.value), 0))
        yield breakers

        oldest = view.oldest_open_breaker()
        oldest_open = GaugeMetricFamily(
            f"{PREFIX}breaker_oldest_open_timestamp_seconds",
            "When the longest-open breaker opened (0 when none is open).",
        )
        oldest_open.add_metric([], oldest if oldest is not None else 0.0)
        yield oldest_open

        incidents = GaugeMetricFamily(
            f"{PREFIX}incidents_active",
            "Open incidents (firing or updated, not resolved) by kind and severity.",
            labels=["kind", "severity"],
        )
        active = view.active_incident_counts()
        for kind in AlertKind:
            for severity in Severity:
                incidents.add_metric([kind.value, severity.value], active.get((kind.value, severity.value), 0))
        yield incidents

        watermark = GaugeMetricFamily(
            f"{PREFIX}event_time_watermark_seconds",
            "Newest event time seen (epoch seconds); time() minus it is how far event time trails the clock.",
        )
        wm = view.watermark
        watermark.add_metric([], wm if math.isfinite(wm) else 0.0)
        yield watermark
