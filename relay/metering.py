"""What a call consumes and costs: the billing rule of each endpoint, prices, and reservations.

Every forwarded endpoint falls in one class (README "Usage records" lists them):
tokens (the upstream reports usage, or the estimate rule), units (images, audio
seconds, speech characters, priced per unit in RELAY_PRICES), free (model lists,
moderations), or unbillable (batches, fine-tuning, assistants...: the relay cannot see
what they spend). Keys with a quota or a budget may only make calls the relay can bill.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.call import Call
from relay.tokens import GENERATION_PATHS, MAX_TOKENS, estimate_tokens, prompt_text

Billing = Literal["tokens", "units", "free", "unbillable"]
Unit = Literal["image", "second", "character"]
UNITS: tuple[Unit, ...] = ("image", "second", "character")
TOKEN_PATHS = (*GENERATION_PATHS, "embeddings", "responses")
IMAGE_PATHS = ("images/generations", "images/edits", "images/variations")
SECONDS_PATHS = ("audio/transcriptions", "audio/translations")
FREE_PATHS = ("models", "moderations")
# Models an endpoint uses when the request names none (OpenAI's documented defaults).
IMPLIED_MODELS = {
    "images/generations": "dall-e-2",
    "images/edits": "dall-e-2",
    "images/variations": "dall-e-2",
    "moderations": "omni-moderation-latest",
}
# Audio whose length the upstream does not report is timed by its size at this rate
# (128 kbit/s, a common MP3 rate), marked estimated.
AUDIO_BYTES_PER_SECOND = 16_000
MAX_REPORTED_UNITS = 1_000_000  # a reply claiming more units than this is not believed


def billing_of(path: str, method: str) -> Billing:
    """The billing class of a forwarded call by its upstream path."""
    if path in TOKEN_PATHS:
        return "tokens" if method == "POST" else "free"
    if path in IMAGE_PATHS or path in SECONDS_PATHS or path == "audio/speech":
        return "units" if method == "POST" else "free"
    if path in FREE_PATHS or path.startswith("models/"):
        return "free"
    return "unbillable"


def unit_of(path: str) -> Unit | None:
    """The unit an endpoint is priced in, if it is priced per unit."""
    if path in IMAGE_PATHS:
        return "image"
    if path in SECONDS_PATHS:
        return "second"
    if path == "audio/speech":
        return "character"
    return None


def implied_model(path: str) -> str | None:
    """The model an endpoint uses when the request names none."""
    return IMPLIED_MODELS.get(path)


@dataclass(frozen=True)
class PriceTable:
    """RELAY_PRICES: money per 1000 tokens by model, and money per unit by model and variant."""

    tokens: dict[str, tuple[float, float]] = field(default_factory=dict)
    units: dict[str, tuple[Unit, float]] = field(default_factory=dict)

    def token_rates(self, *models: str | None) -> tuple[float, float] | None:
        """(prompt, completion) money per 1000 tokens for the first model with a price.

        Exact names first; then the longest price-table name a model starts with, so a
        dated name the upstream serves (gpt-4o-2024-08-06) is priced as its family.
        """
        names = [m for m in models if m]
        for name in names:
            if name in self.tokens:
                return self.tokens[name]
        for name in names:
            family = max((k for k in self.tokens if name.startswith(k)), key=len, default=None)
            if family is not None:
                return self.tokens[family]
        return None

    def token_cost(self, models: tuple[str | None, ...], prompt: int, completion: int) -> float:
        """Money for tokens under the table, 0 when no model has a token price."""
        rates = self.token_rates(*models)
        if rates is None:
            return 0.0
        return (prompt * rates[0] + completion * rates[1]) / 1000.0

    def unit_price(
        self, models: tuple[str | None, ...], unit: Unit, variant: tuple[str, ...] = ()
    ) -> float | None:
        """Money per unit, the most specific `model@size@quality` entry of the first model."""
        for model in models:
            if not model:
                continue
            names = [model]
            if variant:
                names = [
                    "@".join([model, *variant]),
                    *("@".join([model, part]) for part in variant),
                    model,
                ]
            for name in names:
                entry = self.units.get(name)
                if entry is not None and entry[0] == unit:
                    return entry[1]
        return None


def parse_prices(value: object) -> PriceTable:
    """Parse RELAY_PRICES: `model=prompt:completion` (per 1000 tokens), `model[@variant]=P/unit`.

    Raises ValueError naming the item that is not understood.
    """
    if isinstance(value, PriceTable):
        return value
    tokens: dict[str, tuple[float, float]] = {}
    units: dict[str, tuple[Unit, float]] = {}
    if isinstance(value, Mapping):
        items = [
            f"{k}={v[0]}:{v[1]}" if isinstance(v, list | tuple) else f"{k}={v}"
            for k, v in value.items()
        ]
    else:
        items = str(value or "").split(",")
    for item in items:
        if not item.strip():
            continue
        name, _, rate = item.partition("=")
        name, rate = name.strip(), rate.strip()
        if not name or not rate:
            raise ValueError(item.strip())
        if "/" in rate:
            amount, _, unit = rate.partition("/")
            if unit.strip() not in UNITS:
                raise ValueError(item.strip())
            units[name] = (unit.strip(), _money(amount, item))  # type: ignore[assignment]
        else:
            prompt, _, completion = rate.partition(":")
            tokens[name] = (_money(prompt, item), _money(completion or prompt, item))
    return PriceTable(tokens, units)


def _money(text: str, item: str) -> float:
    """A non-negative finite price, else ValueError naming the item."""
    try:
        number = float(text)
    except ValueError:
        raise ValueError(item.strip()) from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(item.strip())
    return number


def variant_of(body: object) -> tuple[str, ...]:
    """The size and quality an image request asks for (both optional), for unit prices."""
    if not isinstance(body, dict):
        return ()
    return tuple(str(body[f]) for f in ("size", "quality") if isinstance(body.get(f), str))


def requested_images(body: object) -> int:
    """How many images a request asks for (`n`, default 1)."""
    n = body.get("n") if isinstance(body, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 100 else 1


def planned_units(path: str, body: object, raw_size: int) -> float:
    """Units a call will likely use, known before it runs (for its reservation)."""
    unit = unit_of(path)
    if unit == "image":
        return float(requested_images(body))
    if unit == "character":
        text = body.get("input") if isinstance(body, dict) else None
        return float(len(text)) if isinstance(text, str) else 0.0
    if unit == "second":
        return raw_size / AUDIO_BYTES_PER_SECOND
    return 0.0


def measured_units(
    path: str, body: object, reply: Mapping[str, Any] | None, raw_size: int
) -> tuple[float, bool]:
    """(units used, whether they are estimated) from a finished call's request and reply."""
    unit = unit_of(path)
    if unit == "image":
        data = reply.get("data") if reply is not None else None
        if isinstance(data, list) and 0 < len(data) <= MAX_REPORTED_UNITS:
            return float(len(data)), False
        return float(requested_images(body)), True
    if unit == "character":
        return planned_units(path, body, raw_size), False
    if unit == "second":
        usage = reply.get("usage") if reply is not None else None
        seconds = usage.get("seconds") if isinstance(usage, dict) else None
        if seconds is None and reply is not None:
            seconds = reply.get("duration")
        if _sane_number(seconds):
            return float(seconds), False  # type: ignore[arg-type]
        return raw_size / AUDIO_BYTES_PER_SECOND, True
    return 0.0, False


def _sane_number(value: object) -> bool:
    """Whether a reported amount is a finite, non-negative, believable number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0 <= value <= MAX_REPORTED_UNITS


def completion_budget(body: object) -> int | None:
    """The most tokens a request lets the model write (max_tokens or its newer names, times n)."""
    if not isinstance(body, dict):
        return None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            choices = body.get("n")
            many = choices if isinstance(choices, int) and not isinstance(choices, bool) else 1
            # No model writes more than MAX_TOKENS: a larger number is as good as that.
            return min(value, MAX_TOKENS) * max(1, min(many, 128))
    return None


def planned_tokens(path: str, body: object, default_completion: int) -> tuple[int, int]:
    """(prompt, completion) tokens a call will likely use: the prompt estimate, and what it
    may write (max_tokens, or `default_completion` when it sets none)."""
    prompt = estimate_tokens(prompt_text(body)) + _token_ids(body)
    if path == "embeddings":
        return prompt, 0
    budget = completion_budget(body)
    return prompt, budget if budget is not None else default_completion


def _token_ids(body: object) -> int:
    """Prompt tokens given as token ids (`input` or `prompt` as lists of integers)."""
    count = 0
    for name in ("input", "prompt"):
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, list):
            continue
        for item in value:
            if isinstance(item, int):
                count += 1
            elif isinstance(item, list):
                count += sum(1 for token in item if isinstance(token, int))
    return count


def measure_units(call: Call, reply: Mapping[str, Any] | None) -> None:
    """Fill in the units a successful unit-priced call used (from its reply when it has one)."""
    unit = unit_of(call.path)
    if unit is None or call.usage.unit is not None or (call.status or 0) >= 400:
        return
    units, estimated = measured_units(call.path, call.json, reply, len(call.body))
    call.usage.units, call.usage.unit = units, unit
    if estimated and call.usage.source == "none":
        call.usage.source = "estimated"


@dataclass(frozen=True)
class Need:
    """What a call may use (reserved while its key has room) and the least it needs."""

    tokens: int
    least_tokens: int  # a call is admitted only with room for this much
    cost: float
    least_cost: float


def need_of(
    call: Call, prices: PriceTable, tokens_per_money: float, default_completion: int
) -> Need:
    """What a call is likely to use (tokens of a token quota, money of a budget)."""
    billing = billing_of(call.path, call.method)
    models = (call.model, call.model_requested)
    if billing == "tokens":
        prompt, completion = planned_tokens(call.path, call.json, default_completion)
        cost = prices.token_cost(models, prompt, completion)
        # A call that states its max_tokens is held to all of it; one that does not may
        # start with less room than the default reservation (its prompt must fit).
        least = completion if completion_budget(call.json) is not None else 0
        least_cost = prices.token_cost(models, prompt, least)
        return Need(prompt + completion, prompt + least, cost, least_cost)
    unit = unit_of(call.path)
    if billing == "units" and unit is not None:
        units = planned_units(call.path, call.json, len(call.body))
        cost = (prices.unit_price(models, unit, variant_of(call.json)) or 0.0) * units
        tokens = round(cost * tokens_per_money)
        return Need(tokens, tokens, cost, cost)  # units are known up front: all or nothing
    return Need(0, 0, 0.0, 0.0)
