"""JSON Schemas of every message Stormwatch reads or writes, and of its config file, generated from the models.

``detector schemas --write`` refreshes ``schemas/``; ``--check`` (and a test) fails on drift.
``config.v1.json`` lets an editor check ``stormwatch.toml`` as it is typed (e.g. taplo's
``#:schema`` directive, or YAML language servers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from detector.events import CONTRACTS, SCHEMA_BASE
from detector.settings import Settings

DIALECT = "https://json-schema.org/draft/2020-12/schema"

FILES: dict[str, type[BaseModel]] = {**CONTRACTS, "config.v1.json": Settings}
READ = {"usage-event.v1.json", "config.v1.json"}  # schemas of input describe what we accept, the rest what we emit


def render(filename: str) -> str:
    mode: Literal["validation", "serialization"] = "validation" if filename in READ else "serialization"
    schema = {"$schema": DIALECT, **FILES[filename].model_json_schema(mode=mode)}
    schema.setdefault("$id", f"{SCHEMA_BASE}/{filename}")
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename in FILES:
        path = directory / filename
        path.write_text(render(filename))
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from what the models generate."""
    return [
        filename
        for filename in FILES
        if not (directory / filename).exists() or (directory / filename).read_text() != render(filename)
    ]
