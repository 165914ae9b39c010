from __future__ import annotations

import pytest

from detector.pricing import ModelPrices, PriceCatalog


def test_longest_prefix_wins() -> None:
    catalog = PriceCatalog.default()
    mini = catalog.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0)
    full = catalog.cost("gpt-4o-2024-08-06", 1_000_000, 0)
    assert mini == pytest.approx(0.15)
    assert full == pytest.approx(2.5)


def test_cached_tokens_are_cheaper() -> None:
    catalog = PriceCatalog.default()
    assert catalog.cost("gpt-4o", 1000, 0, cached_input_tokens=1000) < catalog.cost("gpt-4o", 1000, 0)


def test_overrides_replace_and_add() -> None:
    catalog = PriceCatalog.default().with_overrides(
        {"in-house-llm": ModelPrices(input=1.0, output=2.0), "gpt-4o": ModelPrices(input=0.0, output=0.0)}
    )
    assert catalog.cost("in-house-llm-v2", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert catalog.cost("gpt-4o", 1_000_000, 1_000_000) == 0.0
    assert catalog.cost("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)  # a longer prefix still wins


def test_unknown_model_costs_nothing_and_is_not_guessed() -> None:
    catalog = PriceCatalog.default()
    assert catalog.lookup("mystery") is None
    assert catalog.cost("mystery", 10, 10) == 0.0
