"""Price catalog: what a request costs when the producer did not say.

>>> catalog = PriceCatalog.default()
>>> round(catalog.cost("gpt-4o-2024-08-06", input_tokens=1_000_000, output_tokens=0), 2)
2.5
>>> round(catalog.cost("claude-sonnet-4-20250514", 300_000, 1000), 4)  # long-context tier
1.8225
>>> catalog.cost("some-private-model", 1000, 1000)
0.0
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PER_TOKEN = 1e-6


MAX_MEMO = 10_000  # model names remembered


class TierPrices(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0, description="USD per 1M input tokens")
    cached_input: float | None = Field(default=None, ge=0, description="USD per 1M cached input tokens")
    output: float = Field(ge=0, description="USD per 1M output tokens")


class LongContextPrices(TierPrices):
    above_input_tokens: int = Field(gt=0)


class ModelPrices(TierPrices):
    long_context: LongContextPrices | None = None


class PriceCatalog:
    """Longest-prefix lookup of model prices, memoised per model name (at most MAX_MEMO of them)."""

    def __init__(self, models: dict[str, ModelPrices]) -> None:
        self.models = dict(models)
        self._by_prefix = sorted(self.models, key=len, reverse=True)
        self._memo: dict[str, ModelPrices | None] = {}

    @classmethod
    def default(cls) -> PriceCatalog:
        raw = json.loads(resources.files("detector.data").joinpath("prices.json").read_text())
        return cls.from_mapping(raw["models"])

    @classmethod
    def from_mapping(cls, models: dict[str, Any]) -> PriceCatalog:
        return cls({name: ModelPrices.model_validate(p) for name, p in models.items()})

    def with_overrides(self, overrides: dict[str, ModelPrices]) -> PriceCatalog:
        return PriceCatalog({**self.models, **overrides})

    def lookup(self, model: str) -> ModelPrices | None:
        try:
            return self._memo[model]
        except KeyError:
            found = next((self.models[p] for p in self._by_prefix if model.startswith(p)), None)
            if len(self._memo) >= MAX_MEMO:  # model names come from events: a flood of new ones starts it again
                self._memo.clear()
            self._memo[model] = found
            return found

    def cost(self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """USD for one request; 0.0 for a model the catalog does not know (it is counted, not guessed)."""
        prices = self.lookup(model)
        if prices is None:
            return 0.0
        tier: TierPrices = prices
        if prices.long_context is not None and input_tokens > prices.long_context.above_input_tokens:
            tier = prices.long_context
        cached_price = tier.input if tier.cached_input is None else tier.cached_input
        fresh = input_tokens - cached_input_tokens
        return (fresh * tier.input + cached_input_tokens * cached_price + output_tokens * tier.output) * PER_TOKEN
