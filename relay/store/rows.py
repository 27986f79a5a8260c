"""Usage rows: the columns of the `usage` table, and how a call (or a lost call) becomes one."""

import time
from dataclasses import dataclass
from typing import Any

from relay.call import Call
from relay.metering import PriceTable, variant_of
from relay.tokens import estimate_tokens, prompt_text

Row = dict[str, Any]
USAGE_COLUMNS = (
    "ts",
    "key_id",
    "face",
    "method",
    "path",
    "model_requested",
    "model_served",
    "upstream",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_source",
    "cost",
    "status",
    "outcome",
    "latency_ms",
    "ttfb_ms",
    "end_user",
    "upstream_request_id",
    "bytes_out",
    "attempts",
    "call_id",
    "units",
    "unit",
    "charged_tokens",
)


@dataclass(frozen=True)
class Pricing:
    """What turns usage into money and quota tokens: RELAY_PRICES and RELAY_TOKENS_PER_MONEY."""

    prices: PriceTable
    tokens_per_money: float

    def token_cost(self, row: Row) -> float:
        """Money a row's tokens cost."""
        models = (row["model_served"], row["model_requested"])
        return self.prices.token_cost(models, row["prompt_tokens"], row["completion_tokens"])

    def unit_cost(self, row: Row, variant: tuple[str, ...] = ()) -> float:
        """Money a row's units (images, seconds, characters) cost."""
        if not (row["unit"] and row["units"]):
            return 0.0
        models = (row["model_served"], row["model_requested"])
        price = self.prices.unit_price(models, row["unit"], variant) or 0.0
        return price * float(row["units"])


def row_for(call: Call, pricing: Pricing) -> Row:
    """The usage row of a finished call."""
    usage = call.usage
    model = call.model_served or call.model
    row: Row = {
        "ts": call.started_wall,
        "key_id": call.key.id if call.key else None,
        "face": call.face,
        "method": call.method,
        "path": call.path,
        "model_requested": call.model_requested,
        "model_served": model,
        "upstream": call.upstream_name,
        "stream": int(call.stream_requested),
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.total,
        "usage_source": usage.source,
        "status": call.status,
        "outcome": call.outcome,
        "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
        "ttfb_ms": round(call.ttfb * 1000, 3) if call.ttfb is not None else None,
        "end_user": call.end_user,
        "upstream_request_id": call.upstream_request_id,
        "bytes_out": call.bytes_out,
        "attempts": call.attempts,
        "call_id": call.call_id,
        "units": usage.units,
        "unit": usage.unit,
    }
    return priced(row, pricing, variant_of(call.json))


def priced(row: Row, pricing: Pricing, variant: tuple[str, ...] = ()) -> Row:
    """A row with its cost and charged tokens filled in.

    A token quota is charged the row's tokens, plus its units' price in tokens
    (RELAY_TOKENS_PER_MONEY per 1.0 of money).
    """
    unit_cost = pricing.unit_cost(row, variant)
    row["cost"] = pricing.token_cost(row) + unit_cost
    row["charged_tokens"] = int(row["total_tokens"]) + round(unit_cost * pricing.tokens_per_money)
    return row


def draft_for(call: Call, completion_estimate: int = 0) -> Row:
    """The row a call would leave if its worker died now: what is known, tokens estimated.

    Written when the call is admitted and updated while a stream runs; `lost_row`
    completes it if the call never ends.
    """
    prompt = estimate_tokens(prompt_text(call.json))
    return {
        "ts": call.started_wall,
        "key_id": call.key.id if call.key else None,
        "face": call.face,
        "method": call.method,
        "path": call.path,
        "model_requested": call.model_requested,
        "model_served": call.model_served or call.model,
        "upstream": call.upstream_name,
        "stream": int(call.stream_requested),
        "prompt_tokens": prompt,
        "completion_tokens": completion_estimate,
        "total_tokens": prompt + completion_estimate,
        "status": call.status,
        "ttfb_ms": round(call.ttfb * 1000, 3) if call.ttfb is not None else None,
        "end_user": call.end_user,
        "upstream_request_id": call.upstream_request_id,
        "bytes_out": call.bytes_out,
        "attempts": call.attempts,
        "call_id": call.call_id,
        "units": call.usage.units,
        "unit": call.usage.unit,
    }


def lost_row(draft: Row, last_seen: float, pricing: Pricing) -> Row:
    """The usage row of a call whose worker died: its draft, estimated, outcome worker_lost."""
    row = {column: draft.get(column) for column in USAGE_COLUMNS}
    row.update(
        usage_source="estimated",
        outcome="worker_lost",
        status=row["status"] or 0,
        latency_ms=round(max(last_seen - draft["ts"], 0) * 1000, 3),
        units=row["units"] or 0.0,
        bytes_out=row["bytes_out"] or 0,
        attempts=row["attempts"] or 0,
    )
    return priced(row, pricing)
