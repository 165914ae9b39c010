"""Whether aiokafka runs its compiled record classes: without them throughput drops several times."""

from __future__ import annotations

from aiokafka import util as aiokafka_util  # type: ignore[import-untyped]
from aiokafka.record import default_records, legacy_records, memory_records  # type: ignore[import-untyped]


def c_extension_in_use() -> bool:
    """Whether aiokafka runs its compiled record classes (the pure-Python fallback is several times slower)."""
    # `import aiokafka.record._crecords` succeeds even when the compiled modules are missing or
    # disabled: what matters is which classes the record modules actually export.
    classes = (
        default_records.DefaultRecordBatchBuilder,
        default_records.DefaultRecordBatch,
        legacy_records.LegacyRecordBatchBuilder,
        memory_records.MemoryRecords,
    )
    return not aiokafka_util.NO_EXTENSIONS and all(
        c.__module__.startswith("aiokafka.record._crecords.") for c in classes
    )
