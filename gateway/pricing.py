"""The price book: what a request costs, what the cache saved, what batching saved.

Prices are USD per 1M tokens, per model, from the `prices:` section of the
settings:

    prices:
      default: {input: 0.0, output: 0.0}
      models:
        gpt-4o-mini: {input: 0.15, output: 0.60, cached_input: 0.075}
        tiny:                       # self-hosted: derived from the GPU's cost
          gpu_hourly_usd: 2.50
          tokens_per_second: 1850   # measured by `bearpaw pricing calibrate`
          prompt_tokens_per_second: 21000

A self-hosted model's price is what its GPU costs per token it produces: the
hourly cost over the tokens it generates in an hour at the measured
throughput. Prompt tokens are priced the same way from the measured prefill
throughput when known, else like output tokens (the conservative choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field


class ModelPrice(BaseModel):
    """USD per 1M tokens."""

    input: float = 0.0
    output: float = 0.0
    # What a prompt answered from the semantic cache is billed per 1M tokens;
    # None bills cache hits nothing (no GPU ran for them).
    cached_input: float | None = None
    batch_discount: float = Field(0.5, ge=0.0, le=1.0)  # share taken off batch lines
    # Self-hosted models: price derived from a GPU's hourly cost and the
    # measured throughput of the backend (`bearpaw pricing calibrate`).
    gpu_hourly_usd: float | None = None
    tokens_per_second: float | None = None  # output tokens/s at the measured load
    prompt_tokens_per_second: float | None = None  # prefill tokens/s

    @property
    def self_hosted(self) -> bool:
        return bool(self.gpu_hourly_usd and self.tokens_per_second)


class PriceSettings(BaseModel):
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    default: ModelPrice = Field(default_factory=ModelPrice)


def per_million(gpu_hourly_usd: float, tokens_per_second: float) -> float:
    """USD per 1M tokens of a GPU that costs `gpu_hourly_usd` and produces
    `tokens_per_second`."""
    if tokens_per_second <= 0:
        raise ValueError("throughput must be positive")
    return gpu_hourly_usd / 3600.0 / tokens_per_second * 1e6


@dataclass(frozen=True)
class Cost:
    cost_usd: float
    batch_discount_usd: float = 0.0


class PriceBook:
    def __init__(self, settings: PriceSettings) -> None:
        self.settings = settings
        self._resolved: dict[str, ModelPrice] = {}

    def price(self, model: str) -> ModelPrice:
        """The effective price of a model, self-hosted prices derived."""
        found = self._resolved.get(model)
        if found is None:
            found = _resolve(self.settings.models.get(model, self.settings.default))
            self._resolved[model] = found
        return found

    def list_cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """What the tokens cost at the model's full price."""
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

    def table(self) -> dict[str, ModelPrice]:
        """Every priced model with its effective price (the default under "*")."""
        rows = {name: self.price(name) for name in self.settings.models}
        rows["*"] = _resolve(self.settings.default)
        return rows


def _resolve(p: ModelPrice) -> ModelPrice:
    # An explicit input/output price wins over a derived one, so an operator
    # can override a calibration without deleting it.
    if not p.self_hosted or p.input or p.output:
        return p
    assert p.gpu_hourly_usd is not None and p.tokens_per_second is not None
    output = per_million(p.gpu_hourly_usd, p.tokens_per_second)
    prompt = (
        per_million(p.gpu_hourly_usd, p.prompt_tokens_per_second)
        if p.prompt_tokens_per_second
        else output
    )
    return p.model_copy(update={"input": prompt, "output": output})
