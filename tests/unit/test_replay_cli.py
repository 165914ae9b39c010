"""``detector replay`` and friends as a user runs them: files, gzip, stdin, rejects, --strict."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from detector.cli import main
from tests.conftest import T0

GOOD = {
    "team": "search",
    "api_key_id": "k1",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "operation": "chat",
    "input_tokens": 900,
    "output_tokens": 120,
    "status": "ok",
}


def storm_lines() -> list[bytes]:
    """Half an hour of calm, then a retry storm, as JSON Lines with RFC 3339 timestamps."""

    def line(i: int, t: float, **extra: object) -> bytes:
        return orjson.dumps({**GOOD, "event_id": f"e{i}", "timestamp": datetime.fromtimestamp(t, UTC), **extra})

    lines = [line(i, T0 + 2 * i) for i in range(900)]
    lines += [
        line(10_000 + i, T0 + 1800 + 0.1 * i, status="error", retry_attempt=i % 30 + 1, output_tokens=0)
        for i in range(1200)
    ]
    return lines


def write(path: Path, lines: list[bytes]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    return path


def test_replay_writes_alerts_and_rejects_with_line_numbers(tmp_path: Path) -> None:
    lines = storm_lines()
    lines.insert(10, b'{"event_id": "broken", ')
    lines.insert(20, orjson.dumps({**GOOD, "event_id": "neg", "timestamp": "2026-11-06T08:00:30Z", "input_tokens": -5}))
    events = write(tmp_path / "events.jsonl.gz", lines)
    alerts = tmp_path / "alerts.jsonl"
    assert main(["replay", str(events), "--alerts-out", str(alerts), "--quiet"]) == 0
    records = [json.loads(x) for x in alerts.read_text().splitlines()]
    assert records and records[0]["kind"] == "retry_storm" and records[0]["status"] == "firing"
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [(11, "not valid JSON"), (21, "input_tokens")]
    assert "greater than or equal to 0" in rejects[1]["reason"]


def test_an_event_from_the_future_is_a_reject_not_the_end_of_detection(tmp_path: Path) -> None:
    lines = storm_lines()
    lines.insert(300, orjson.dumps({**GOOD, "event_id": "y2100", "timestamp": "2100-01-01T00:00:00Z"}))
    events = write(tmp_path / "events.jsonl", lines)
    alerts = tmp_path / "alerts.jsonl"
    assert main(["replay", str(events), "--alerts-out", str(alerts), "--quiet"]) == 0
    assert "retry_storm" in {json.loads(x)["kind"] for x in alerts.read_text().splitlines()}
    (reject,) = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert (
        reject["line"] == 301
        and reject["reason"].startswith("timestamp: ")
        and "ahead of the clock" in reject["reason"]
    )


def test_strict_exits_non_zero_on_rejects(tmp_path: Path) -> None:
    events = write(tmp_path / "events.jsonl", [b"not json at all", *storm_lines()[:10]])
    assert main(["replay", str(events), "--quiet", "--strict", "--rejects-out", str(tmp_path / "r.jsonl")]) == 2
    assert main(["replay", str(events), "--quiet", "--rejects-out", str(tmp_path / "r.jsonl")]) == 0


def test_a_replay_without_alerts_still_writes_its_alerts_file(tmp_path: Path) -> None:
    """A script's next step reads the file: no alerts is an empty file, not a missing one."""
    events = write(tmp_path / "events.jsonl", storm_lines()[:10])
    alerts = tmp_path / "out" / "alerts.jsonl"
    assert main(["replay", str(events), "--alerts-out", str(alerts), "--quiet"]) == 0
    assert alerts.read_bytes() == b""
    assert not (tmp_path / "out" / "rejects.jsonl").exists(), "and no rejects file when nothing was rejected"


def test_replay_reads_stdin_and_prints_a_summary(tmp_path: Path) -> None:
    data = b"\n".join(storm_lines()) + b"\n"
    proc = subprocess.run(
        [sys.executable, "-m", "detector.cli", "replay", "-", "--alerts-out", str(tmp_path / "a.jsonl")],
        input=data,
        capture_output=True,
        check=True,
        cwd=tmp_path,
    )
    out = proc.stdout.decode()
    assert "2,100" in out and "retry_storm firing" in out
    assert (tmp_path / "a.jsonl").read_text().count('"firing"') == 1


def test_schemas_check_passes_on_the_repo() -> None:
    root = Path(__file__).resolve().parents[2]
    assert main(["schemas", "--check", "--dir", str(root / "schemas")]) == 0
