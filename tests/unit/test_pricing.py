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


def test_premium_variants_are_not_priced_as_their_base_model() -> None:
    """The longest prefix wins: without their own entries, o1-pro cost what o1 does (a tenth of its price)."""
    from detector.pricing import PriceCatalog

    catalog = PriceCatalog.default()
    for premium, base in (("o1-pro-2025-03-19", "o1"), ("o3-pro", "o3"), ("gpt-5-pro", "gpt-5")):
        assert catalog.cost(premium, 1_000_000, 0, 0) >= 7 * catalog.cost(base, 1_000_000, 0, 0), premium
    assert catalog.cost("gemini-2.5-flash-lite", 1_000_000, 0, 0) < catalog.cost("gemini-2.5-flash", 1_000_000, 0, 0)
