"""Seeded fleet-traffic simulator: realistic token-usage events with labelled incidents.

It generates a mid-sized company's LLM traffic (teams, API keys, users, agents with
sessions), injects labelled incidents of the four kinds Stormwatch detects (cost spikes,
budget burn, retry storms, agent loops) and benign look-alikes that must stay quiet
(nightly batches, new keys ramping up, lunch peaks, provider rate-limit blips, ...), and
writes events, labels and team budgets to measure detectors' recall, precision and latency.

Request sizes and arrival burstiness are drawn from statistics of the Azure LLM inference
trace 2023 (Azure/AzurePublicDataset, CC-BY 4.0), published with Pratyush Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024; see
:mod:`detector.simulate.azure_trace`.

Modules: ``fleet`` (who sends traffic and when), ``traffic`` (normal requests, SDK retries,
agent sessions), ``scenarios`` (one injector per incident or look-alike), ``block``
(columnar rows to sorted event dicts), ``simulation`` (the spec and entry points),
``writer`` (files).
"""

from detector.simulate.simulation import Simulation, SimulationSpec, iter_events, plan, simulate
from detector.simulate.writer import write_simulation

__all__ = ["Simulation", "SimulationSpec", "iter_events", "plan", "simulate", "write_simulation"]
