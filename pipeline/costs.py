"""What the teacher cost: prices as settings, the tokens every request used, and the ledger of
a run (all generate rounds) that the filter, `make report` and the model card turn into a cost
per kept trace and per covered question.

Prices are per million tokens, in whatever currency the user prices in (the ledger never
names one). Requests sent through a batch API cost `batch_discount` times the live price
(OpenAI's Batch API: 50% of the price, https://platform.openai.com/docs/guides/batch). Local
engines (hf, vllm) are charged by the hour of the engine (`price_hour`, a GPU-hour) and by
their tokens where token prices are set, else nothing: their tokens and seconds are still
recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

# the ledger's counters, per shard and summed per stage (`Stage` sums counters)
LEDGER_KEYS = ("prompt_tokens", "completion_tokens", "batch_tokens", "engine_s", "cost")


@dataclass(frozen=True)
class Prices:
    """Prices per million input (prompt) and output (completion) tokens, the factor of a batch
    request, and the price of an engine hour."""

    input: float = 0.0
    output: float = 0.0
    batch_discount: float = 0.5
    hour: float = 0.0

    @classmethod
    def of(cls, g) -> "Prices":
        """From the generate section of a config."""
        return cls(g.price_input, g.price_output, g.batch_discount, g.price_hour)

    @property
    def priced(self) -> bool:
        return bool(self.input or self.output or self.hour)

    def cost(self, prompt_tokens: float, completion_tokens: float, batch: bool = False,
             seconds: float = 0.0) -> float:
        tokens = (prompt_tokens * self.input + completion_tokens * self.output) / 1e6
        return tokens * (self.batch_discount if batch else 1.0) + seconds * self.hour / 3600


def money(value: float) -> str:
    """A cost with enough digits to tell small ones apart (no currency sign: prices are in the
    user's own)."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def ledger(manifests: list[tuple[str, dict]]) -> dict:
    """The ledger of a run's generate rounds from their manifests: per round and in all, the
    requests sent and answered from the cache, tokens, engine seconds and cost (at the prices
    each round ran with)."""
    rounds, total = [], {k: 0 for k in LEDGER_KEYS}
    total.update(requests=0, cached=0, traces=0)
    for name, manifest in manifests:
        c = manifest.get("counters", {})
        row = {"round": name, **{k: c.get(k, 0) for k in LEDGER_KEYS},
               "requests": c.get("requests", 0), "cached": c.get("cached", 0),
               "traces": c.get("traces", 0)}
        rounds.append(row)
        for key in total:
            total[key] += row[key]
    prices = next((m.get("facts", {}).get("prices") for _, m in manifests
                   if m.get("facts", {}).get("prices")), None)
    # the rounds share one request cache: its requests sent without a stored answer, as the
    # last round to finish counted them (the count only grows)
    unconfirmed = max((m.get("facts", {}).get("unconfirmed") or {} for _, m in manifests),
                      key=lambda u: (u.get("requests", 0), u.get("cost", 0.0)), default={})
    book = {"rounds": rounds, "total": total, "prices": prices}
    if unconfirmed:
        book["unconfirmed"] = unconfirmed
        book["bill_at_most"] = round(total["cost"] + unconfirmed.get("cost", 0.0), 9)
    return book


def ledger_lines(book: dict | None, kept: int | None = None,
                 covered: int | None = None) -> list[str]:
    """The ledger in words: tokens and cost in all, and per kept trace and covered question
    when the filter's counts are given. Empty without a ledger."""
    if not book or not book.get("total"):
        return []
    t = book["total"]
    prompt, completion = t.get("prompt_tokens", 0), t.get("completion_tokens", 0)
    if not (prompt or completion):
        return []
    line = f"teacher usage: {prompt:,} prompt + {completion:,} completion tokens"
    if t.get("batch_tokens"):
        line += f" ({t['batch_tokens']:,} through a batch API)"
    if t.get("engine_s"):
        line += f", {t['engine_s'] / 3600:.2f} engine-hours"
    lines = [line]
    cost = t.get("cost", 0.0)
    if cost or (book.get("prices") or {}).get("priced"):
        line = f"teacher cost: {money(cost)} in all"
        if kept is not None:
            line += f", {money(cost / max(1, kept))} per kept trace"
        if covered is not None:
            line += f", {money(cost / max(1, covered))} per covered question"
        lines.append(line)
    u = book.get("unconfirmed")
    if u:
        line = (f"unconfirmed: {u['requests']} request(s) sent without an answer stored (a "
                "kill, a timeout, a lost connection), at most "
                f"{u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion tokens")
        if u.get("cost"):
            line += (f", up to {money(u['cost'])}: the provider may have billed them, so the "
                     f"bill is at most {money(book['bill_at_most'])} (the budget counts them)")
        lines.append(line)
    return lines
