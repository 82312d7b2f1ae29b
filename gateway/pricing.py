"""The price book: what a request costs, what the cache saved, what batching saved."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field


class ModelPrice(BaseModel):
    """USD per 1M tokens."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # defaults to `input`
    batch_discount: float = 0.5  # share of the price taken off batch lines
    # Self-hosted models: price derived from a GPU's hourly cost and the
    # measured throughput of the backend (`bearpaw pricing calibrate`).
    gpu_hourly_usd: float | None = None
    tokens_per_second: float | None = None


class PriceSettings(BaseModel):
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    default: ModelPrice = Field(default_factory=ModelPrice)


@dataclass(frozen=True)
class Cost:
    cost_usd: float
    batch_discount_usd: float = 0.0


class PriceBook:
    def __init__(self, settings: PriceSettings) -> None:
        self.settings = settings

    def price(self, model: str) -> ModelPrice:
        p = self.settings.models.get(model, self.settings.default)
        if p.gpu_hourly_usd and p.tokens_per_second and not (p.input or p.output):
            per_million = p.gpu_hourly_usd / 3600.0 / p.tokens_per_second * 1e6
            return p.model_copy(update={"input": per_million, "output": per_million})
        return p

    def list_cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        p = self.price(model)
        return (prompt_tokens * p.input + completion_tokens * p.output) / 1e6

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, source: str = "interactive"
    ) -> Cost:
        full = self.list_cost(model, prompt_tokens, completion_tokens)
        if source == "batch":
            discount = full * self.price(model).batch_discount
            return Cost(full - discount, discount)
        return Cost(full)

    def cached_cost(self, model: str, prompt_tokens: int) -> float:
        """What a cache hit is billed: the prompt at the cached-input price."""
        p = self.price(model)
        rate = p.cached_input if p.cached_input is not None else 0.0
        return prompt_tokens * rate / 1e6
