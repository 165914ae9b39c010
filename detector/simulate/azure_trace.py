"""Request sizes and burstiness measured on the Azure LLM inference trace 2023.

The trace (two CSVs, ``code`` and ``conv``, one row per request) is not shipped with the
package: :func:`derive_token_quantiles` turns it into ``detector/data/azure_llm_2023_tokens.json``
once, and the simulator reads only that file, through :class:`TraceProfile`. The tests keep a
gzipped copy (``tests/data/azure-llm-2023/``) to replay the trace's own requests through the
engine (:func:`trace_events`).

Regenerate the shipped file with::

    python -m detector.simulate.azure_trace ../shared/benchmarks/azure-llm-2023
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

DATA_FILE = "azure_llm_2023_tokens.json"
WORKLOADS = ("code", "conv")
N_QUANTILES = 200  # 201 cut points: 0, 0.5 %, ..., 100 %
HOUR_SECONDS = 3600.0  # the trace is one hour; trace_events lays it end to end

SOURCE = {
    "dataset": "Azure LLM inference trace 2023 (Azure/AzurePublicDataset: "
    "AzureLLMInferenceTrace_code.csv, AzureLLMInferenceTrace_conv.csv)",
    "paper": "Pratyush Patel, Esha Choukse, Chaojie Zhang, Aashaka Shah, Inigo Goiri, Saeed Maleki, "
    "Ricardo Bianchini. 'Splitwise: Efficient generative LLM inference using phase splitting', "
    "ISCA 2024.",
    "licence": "CC-BY 4.0 (Creative Commons Attribution 4.0 International); derived statistics only.",
    "derivation": "detector.simulate.azure_trace.derive_token_quantiles",
}


def derive_token_quantiles(csv_dir: Path) -> dict[str, Any]:
    """Quantiles of request sizes and arrival burstiness for each workload of the trace.

    Quantiles rather than raw rows: 2 x 201 numbers per workload keep the heavy tails and
    the package small, and sampling by inverse CDF is one ``np.interp``.
    """
    probabilities = np.linspace(0.0, 1.0, N_QUANTILES + 1)
    out: dict[str, Any] = {"_source": SOURCE, "probabilities": [round(float(p), 4) for p in probabilities]}
    for workload in WORKLOADS:
        seconds, context, generated = _read_trace(trace_path(csv_dir, workload))
        out[workload] = {
            "requests": len(seconds),
            "context_tokens": _rounded(np.quantile(context, probabilities)),
            "generated_tokens": _rounded(np.quantile(generated, probabilities)),
            "arrivals": arrival_stats(seconds),
        }
    return out


def arrival_stats(seconds: NDArray[np.float64]) -> dict[str, float]:
    """Burstiness of one arrival sequence, and the modulation that reproduces it.

    We model arrivals as a Poisson process whose rate is multiplied by two independent
    mean-1 gamma factors, one drawn per minute and one per second. The minute factor's
    squared CV is what the per-minute counts vary beyond Poisson; the second factor takes
    the rest of the per-second over-dispersion: for rate r, Var(count) = r + r^2 Var(M S).
    """
    seconds = np.sort(seconds)
    gaps = np.diff(seconds)
    per_second = np.bincount(np.floor(seconds - seconds[0]).astype(np.int64))
    per_minute = np.bincount(np.floor((seconds - seconds[0]) / 60.0).astype(np.int64))
    rate = float(per_second.mean())
    dispersion = float(per_second.var() / per_second.mean())
    minute_cv = float(per_minute.std() / per_minute.mean())
    minute_mod_sq = max(minute_cv**2 - 1.0 / float(per_minute.mean()), 0.0)
    total_mod_sq = max((dispersion - 1.0) / rate, 0.0)
    second_mod_sq = max((1.0 + total_mod_sq) / (1.0 + minute_mod_sq) - 1.0, 0.0)
    return {
        "mean_rate_per_s": round(rate, 4),
        "gap_cv": round(float(gaps.std() / gaps.mean()), 4),
        "per_second_dispersion": round(dispersion, 4),
        "per_minute_cv": round(minute_cv, 4),
        "minute_modulation_cv": round(math.sqrt(minute_mod_sq), 4),
        "second_modulation_cv": round(math.sqrt(second_mod_sq), 4),
    }


def _read_trace(path: Path) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(seconds since the first request, context tokens, generated tokens) of one workload's CSV."""
    instants, context, generated = _read_rows(path)
    seconds = (instants - instants.min()).astype(np.int64) / 1e6
    return seconds, context, generated


def _read_rows(path: Path) -> tuple[NDArray[np.datetime64], NDArray[np.float64], NDArray[np.float64]]:
    stamps: list[str] = []
    context: list[int] = []
    generated: list[int] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as fh:
        header = fh.readline().strip().split(",")
        if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path}: unexpected header {header}")
        for line in fh:
            stamp, ctx, gen = line.strip().split(",")
            stamps.append(stamp[:26].replace(" ", "T"))  # numpy parses at most microseconds
            context.append(int(ctx))
            generated.append(int(gen))
    instants = np.array(stamps, dtype="datetime64[us]")
    return instants, np.array(context, dtype=np.float64), np.array(generated, dtype=np.float64)


def trace_path(csv_dir: Path, workload: str) -> Path:
    """The CSV of ``workload`` in ``csv_dir``, as the dataset names it (gzipped or not)."""
    plain = Path(csv_dir) / f"AzureLLMInferenceTrace_{workload}.csv"
    gzipped = plain.with_name(plain.name + ".gz")
    return gzipped if gzipped.exists() and not plain.exists() else plain


def trace_events(
    csv_dir: Path,
    start: float,
    hours: int,
    team: str = "platform",
    models: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The trace's own requests as usage events: real arrivals and sizes, not samples of them.

    Each workload is one API key of ``team`` (``key-code``, ``key-conv``), on ``models``
    (default gpt-4o for code, gpt-4o-mini for conversation) and priced by the catalog. The
    trace's hour is laid end to end ``hours`` times from ``start`` (epoch seconds), the two
    workloads keeping their offsets from each other, so the detectors learn a day of it and
    are then judged on the very same bursts: the check that real burstiness raises no alarm.
    Events come in timestamp order, as JSON-ready dicts.
    """
    models = {"code": "gpt-4o", "conv": "gpt-4o-mini"} | dict(models or {})
    rows = [(w, *_read_rows(trace_path(csv_dir, w))) for w in WORKLOADS]
    first = min(instants.min() for _, instants, _, _ in rows)
    offsets = np.concatenate([(instants - first).astype(np.int64) / 1e6 for _, instants, _, _ in rows])
    if offsets.max() >= HOUR_SECONDS:
        raise ValueError(f"{csv_dir}: the trace spans more than an hour")
    workload = np.concatenate([np.full(len(instants), i) for i, (_, instants, _, _) in enumerate(rows)])
    context = np.concatenate([c for _, _, c, _ in rows]).astype(np.int64)
    generated = np.concatenate([g for _, _, _, g in rows]).astype(np.int64)
    order = np.argsort(offsets, kind="stable")
    offsets, workload, context, generated = offsets[order], workload[order], context[order], generated[order]
    names = [w for w, _, _, _ in rows]
    for hour in range(hours):
        base = start + hour * HOUR_SECONDS
        for i in range(len(offsets)):
            name = names[workload[i]]
            yield {
                "event_id": f"azure-{name}-{hour}-{i}",
                "timestamp": round(base + float(offsets[i]), 6),
                "team": team,
                "api_key_id": f"key-{name}",
                "provider": "openai",
                "model": models[name],
                "operation": "chat",
                "input_tokens": int(context[i]),
                "output_tokens": int(generated[i]),
                "status": "ok",
            }


def _rounded(values: NDArray[np.float64]) -> list[float]:
    return [round(float(v), 1) for v in values]


@dataclass(frozen=True)
class TokenSampler:
    """Inverse-CDF sampler of (context, generated) token counts for one workload."""

    probabilities: NDArray[np.float64]
    context: NDArray[np.float64]
    generated: NDArray[np.float64]
    minute_cv: float
    second_cv: float

    def context_tokens(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        return np.interp(rng.random(n), self.probabilities, self.context)

    def generated_tokens(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        return np.interp(rng.random(n), self.probabilities, self.generated)


@dataclass(frozen=True)
class TraceProfile:
    """The shipped derived statistics: one sampler per workload."""

    code: TokenSampler
    conv: TokenSampler

    @classmethod
    def load(cls) -> TraceProfile:
        raw = json.loads(resources.files("detector.data").joinpath(DATA_FILE).read_text())
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> TraceProfile:
        probabilities = np.asarray(raw["probabilities"], dtype=np.float64)

        def sampler(workload: str) -> TokenSampler:
            part = raw[workload]
            return TokenSampler(
                probabilities=probabilities,
                context=np.asarray(part["context_tokens"], dtype=np.float64),
                generated=np.asarray(part["generated_tokens"], dtype=np.float64),
                minute_cv=float(part["arrivals"]["minute_modulation_cv"]),
                second_cv=float(part["arrivals"]["second_modulation_cv"]),
            )

        return cls(code=sampler("code"), conv=sampler("conv"))


def main(argv: list[str]) -> None:
    """Write the derived JSON next to this package's other data files."""
    derived = derive_token_quantiles(Path(argv[0]))
    target = Path(__file__).resolve().parents[1] / "data" / DATA_FILE
    target.write_text(json.dumps(derived, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
