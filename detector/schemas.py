"""JSON Schemas of every message Stormwatch reads or writes, generated from the models.

``detector schemas --write`` refreshes ``schemas/``; ``--check`` (and a test) fails on drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from detector.events import CONTRACTS

DIALECT = "https://json-schema.org/draft/2020-12/schema"


READ = {"usage-event.v1.json"}  # schemas of input describe what we accept, the rest what we emit


def render(filename: str) -> str:
    mode: Literal["validation", "serialization"] = "validation" if filename in READ else "serialization"
    schema = {"$schema": DIALECT, **CONTRACTS[filename].model_json_schema(mode=mode)}
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename in CONTRACTS:
        path = directory / filename
        path.write_text(render(filename))
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from what the models generate."""
    return [
        filename
        for filename in CONTRACTS
        if not (directory / filename).exists() or (directory / filename).read_text() != render(filename)
    ]
