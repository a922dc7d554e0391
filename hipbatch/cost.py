"""What a run costs: the price table, token estimates calibrated on past results, the budget gate, and the
ledger queries behind `submit` (before), `status`, `cost` and `report` (after).

Money is counted once per request: est_cost_usd (worst case, at submit) and cost_usd (from the token columns
that collect *sets* for each answer) are only ever filled in where NULL, so any number of collects, status
checks or adopted batches leave the ledger as it is.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hipbatch.config import Config
from hipbatch.errors import BudgetExceeded, UsageError
from hipbatch.store import Store, TokenRates

PRICE_KINDS = ("input", "output", "cache_read", "cache_write")
_DATE_SUFFIX = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2}|latest)$")


# ---- prices ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Price:
    """List (live) prices of one model in USD per 1M tokens, and how its provider counts input tokens."""

    provider: str
    model: str
    input: float
    output: float
    cache_read: float
    cache_write: float
    batch_discount: float = 0.5
    input_includes_cache: bool = False  # OpenAI: prompt_tokens already include the cached tokens
    source: str = ""  # "prices.toml checked 2026-11-27" or the config file that set it
    matched: str = ""  # the table entry used, when the model name was matched by alias or date suffix

    def factor(self, live: bool) -> float:
        return 1.0 if live else 1.0 - self.batch_discount

    def cost(
        self,
        input_tokens: float,
        output_tokens: float,
        cache_read: float = 0,
        cache_write: float = 0,
        live: bool = False,
    ) -> float:
        """USD for these tokens, counted as the provider reports them."""
        plain = input_tokens - cache_read if self.input_includes_cache else input_tokens
        total = (
            plain * self.input
            + cache_read * self.cache_read
            + cache_write * self.cache_write
            + output_tokens * self.output
        )
        return total * self.factor(live) / 1_000_000

    @property
    def worst_input(self) -> float:
        # No cache hits, and every cacheable prefix written again (Anthropic bills writes above input).
        return max(self.input, self.cache_write)

    def worst_case(self, input_tokens: float, output_tokens: float, live: bool = False) -> float:
        """USD if no input hits the cache (every prefix written) and every reply runs to max_tokens."""
        return (input_tokens * self.worst_input + output_tokens * self.output) * self.factor(live) / 1_000_000

    def rates(self, live: bool) -> TokenRates:
        """These prices as the store's cost columns apply them."""
        return TokenRates(
            self.input, self.output, self.cache_read, self.cache_write, self.factor(live), self.input_includes_cache
        )

    def plain(self, input_tokens: float, output_tokens: float, live: bool = False) -> float:
        """USD with every input token at the plain input price (no cache reads or writes)."""
        return (input_tokens * self.input + output_tokens * self.output) * self.factor(live) / 1_000_000


@dataclass
class PriceTable:
    """The shipped table merged with the config file's [prices] tables."""

    checked: str
    batch_discount: float
    providers: dict[str, dict[str, Any]]
    models: dict[tuple[str, str], dict[str, Any]]
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)

    def lookup(self, provider: str, model: str) -> Price | None:
        """The price of provider/model, or None: never a guess."""
        key = self._find(provider, model)
        if key is None:
            return None
        entry = self.models[key]
        extra = self.providers.get(provider, {})
        return Price(
            provider=provider,
            model=model,
            input=entry["input"],
            output=entry["output"],
            cache_read=entry.get("cache_read", entry["input"]),
            cache_write=entry.get("cache_write", entry["input"]),
            batch_discount=float(entry.get("batch_discount", self.batch_discount)),
            input_includes_cache=bool(extra.get("input_includes_cache", False)),
            source=entry.get("_source", f"prices checked {self.checked}"),
            matched="" if key[1] == model else key[1],
        )

    def _find(self, provider: str, model: str) -> tuple[str, str] | None:
        names = [model, model.lower()]
        stripped = _DATE_SUFFIX.sub("", model.lower())
        names.append(stripped)
        for name in names:
            if (provider, name) in self.models:
                return (provider, name)
            if (provider, name) in self.aliases:
                return (provider, self.aliases[(provider, name)])
        return None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"{where}: expected a price in USD per 1M tokens (a number >= 0), got {value!r}")
    return float(value)


def _add_prices(table: PriceTable, prices: Any, where: str, source: str | None) -> None:
    """Merge a [prices] table ({provider: {model: {input, output, ...}}}) into the table."""
    if not isinstance(prices, dict):
        raise UsageError(f"{where}: [prices] must be a table of provider tables")
    for provider, models in prices.items():
        if provider == "batch_discount":
            table.batch_discount = _number(models, f"{where}: prices.batch_discount")
            if table.batch_discount > 1:
                raise UsageError(f"{where}: prices.batch_discount is a share (0.5 = half), got {models}")
            continue
        if not isinstance(models, dict):
            raise UsageError(f"{where}: prices.{provider} must be a table of model tables")
        for model, entry in models.items():
            at = f'{where}: prices.{provider}."{model}"'
            if not isinstance(entry, dict):
                raise UsageError(f"{at} must be a table with input and output prices")
            key = (provider, model.lower())
            merged = dict(table.models.get(key, {}))
            for name, value in entry.items():
                if name in PRICE_KINDS or name == "batch_discount":
                    merged[name] = _number(value, f"{at}.{name}")
                elif name == "aliases":
                    for alias in value if isinstance(value, list) else [value]:
                        table.aliases[(provider, str(alias).lower())] = model.lower()
                else:
                    raise UsageError(f"{at}: unknown key {name!r} (use {', '.join(PRICE_KINDS)})")
            missing = [k for k in ("input", "output") if k not in merged]
            if missing:
                raise UsageError(f"{at}: missing {' and '.join(missing)} (USD per 1M tokens)")
            if source:
                merged["_source"] = source
            table.models[key] = merged


def load_prices(config: Config | None = None) -> PriceTable:
    """The shipped price table, with the config file's [prices] (or providers.NAME.prices) on top."""
    text = resources.files("hipbatch").joinpath("data/prices.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    table = PriceTable(
        checked=str(data["checked"]),
        batch_discount=float(data["batch_discount"]),
        providers=data.get("providers", {}),
        models={},
    )
    _add_prices(table, data["prices"], "hipbatch/data/prices.toml", None)
    if config is not None and config.path is not None:
        where = str(config.path)
        source = f"prices from {where}"
        if "prices" in config.data:
            _add_prices(table, config.data["prices"], where, source)
        for provider, settings in config.providers.items():
            if "prices" in settings:
                _add_prices(table, {provider: settings["prices"]}, where, source)
    return table


def no_price_warning(provider: str, model: str, table: PriceTable) -> str:
    return (
        f"no price known for {provider} model {model!r} (price table checked {table.checked}): no dollar "
        f'figures for it. Add [prices.{provider}."{model}"] with input and output (USD per 1M tokens) '
        "to hipbatch.toml"
    )


def usd(value: float | None) -> str:
    """$1,234.57 for large amounts, more digits for small ones; '-' when unknown."""
    if value is None:
        return "-"
    if value == 0:
        return "$0.00"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    # Small runs: four significant digits, so a demo's $0.001670 does not read as $0.00.
    decimals = min(8, 3 - math.floor(math.log10(abs(value))))
    return f"${value:.{decimals}f}"


# ---- calibration and estimates --------------------------------------------------------------------


@dataclass
class Calibration:
    """How the local token count compares with what the provider reported for this model."""

    samples: int = 0  # answered requests the ratio is based on
    ratio: float | None = None  # actual input tokens / local estimate
    avg_output_tokens: float | None = None  # per successful reply

    def describe(self, provider: str, model: str) -> str:
        if self.ratio is None:
            return (
                f"input tokens are a local count (about 3.6 characters per token), not yet calibrated: "
                f"calibrated once results of {provider}/{model} are in the store"
            )
        return (
            f"input tokens calibrated on {self.samples} answered request(s) of {provider}/{model}: "
            f"x{self.ratio:.3f} the local count"
        )


def calibration(store: Store, provider: str, model: str, includes_cache: bool) -> Calibration:
    """The ratio of actual to estimated input tokens over this model's answered requests."""
    n, est, act = store.calibration_sums(provider, model, includes_cache)
    cal = Calibration(samples=n)
    if n and est:
        cal.ratio = act / est
    cal.avg_output_tokens = store.avg_output_tokens(provider, model)
    return cal


def _includes_cache(prices: PriceTable, provider: str) -> bool:
    return bool(prices.providers.get(provider, {}).get("input_includes_cache", False))


@dataclass
class Estimate:
    """What a set of requests will cost, before it is sent."""

    provider: str
    model: str
    requests: int
    local_input_tokens: int  # the local count
    input_tokens: int  # calibrated when results exist
    output_ceiling: int  # requests x max_tokens
    calibrated: bool
    calibration_ratio: float | None
    calibration_samples: int
    calibration_note: str
    batch_usd: float | None = None  # worst case: calibrated input + every reply at max_tokens
    live_usd: float | None = None  # the same work through live calls
    likely_output_tokens: int | None = None  # at the average reply length seen so far
    likely_batch_usd: float | None = None
    likely_live_usd: float | None = None
    prices_checked: str = ""
    price_source: str | None = None
    warnings: list[str] = field(default_factory=list)


def estimate(
    store: Store, prices: PriceTable, provider: str, model: str, requests: int, local_input_tokens: int, max_tokens: int
) -> Estimate:
    """Tokens and cost of `requests` new requests, worst case and likely, batch and live."""
    cal = calibration(store, provider, model, _includes_cache(prices, provider))
    tokens = round(local_input_tokens * cal.ratio) if cal.ratio else local_input_tokens
    ceiling = requests * max_tokens
    est = Estimate(
        provider=provider,
        model=model,
        requests=requests,
        local_input_tokens=local_input_tokens,
        input_tokens=tokens,
        output_ceiling=ceiling,
        calibrated=cal.ratio is not None,
        calibration_ratio=cal.ratio,
        calibration_samples=cal.samples,
        calibration_note=cal.describe(provider, model),
        prices_checked=prices.checked,
    )
    if cal.avg_output_tokens is not None:
        per_reply = min(cal.avg_output_tokens, max_tokens) if max_tokens else cal.avg_output_tokens
        est.likely_output_tokens = round(requests * per_reply)
    price = prices.lookup(provider, model)
    if price is None:
        est.warnings.append(no_price_warning(provider, model, prices))
        return est
    est.price_source = price.source + (f" (as {price.matched})" if price.matched else "")
    est.batch_usd = price.worst_case(tokens, ceiling)
    est.live_usd = price.worst_case(tokens, ceiling, live=True)
    if est.likely_output_tokens is not None:
        est.likely_batch_usd = price.plain(tokens, est.likely_output_tokens)
        est.likely_live_usd = price.plain(tokens, est.likely_output_tokens, live=True)
    return est


def queued_commitment(store: Store, prices: PriceTable) -> tuple[int, float | None]:
    """(requests, worst-case USD) already waiting in the local queue, which the next feed sends too."""
    total, n, unknown = 0.0, 0, False
    for provider, model, count, local, outs in store.queued_by_model():
        n += count
        price = prices.lookup(provider, model)
        if price is None:
            unknown = True
            continue
        cal = calibration(store, provider, model, price.input_includes_cache)
        total += price.worst_case(local * (cal.ratio or 1.0), outs)
    return n, None if unknown else total


def check_budget(est: Estimate, max_cost: float, queued: tuple[int, float | None] = (0, 0.0)) -> None:
    """Raise BudgetExceeded when the worst case of this run (plus what is queued) is over max_cost."""
    queued_n, queued_usd = queued
    if est.batch_usd is None or queued_usd is None:
        raise BudgetExceeded(
            f"--max-cost {max_cost:g}: cannot check the budget: "
            + (est.warnings[0] if est.warnings else "a request queued earlier is for a model with no price")
        )
    worst = est.batch_usd + queued_usd
    if worst > max_cost:
        extra = f" plus {usd(queued_usd)} for {queued_n} request(s) queued earlier" if queued_n else ""
        raise BudgetExceeded(
            f"estimated worst case {usd(worst)} is over --max-cost {max_cost:g} ({est.requests} requests to "
            f"{est.provider}/{est.model}: {est.input_tokens:,} input tokens and up to {est.output_ceiling:,} "
            f"output tokens at batch prices{extra}); nothing was sent. Raise --max-cost, send fewer files "
            "(--limit) or lower max_tokens"
        )


def for_prepare(store: Store, prices: PriceTable, prep: Any) -> Estimate:
    """The estimate of the new requests a submit.prepare() found (a PrepareReport)."""
    return estimate(store, prices, prep.provider, prep.model, prep.new, prep.est_input_tokens, prep.max_tokens)


# ---- the ledger -----------------------------------------------------------------------------------


@dataclass
class SettleReport:
    estimated: int = 0  # requests given an est_cost_usd
    costed: int = 0  # requests given a cost_usd
    unpriced: list[str] = field(default_factory=list)  # provider/model with no price


def settle(store: Store, prices: PriceTable) -> SettleReport:
    """Fill est_cost_usd and cost_usd where they are NULL. Safe to run any number of times."""
    report = SettleReport()
    groups = store.unsettled_groups()
    with store.atomic():
        for provider, model, live, needs_est, needs_cost in groups:
            price = prices.lookup(provider, model)
            if price is None:
                name = f"{provider}/{model}"
                if name not in report.unpriced:
                    report.unpriced.append(name)
                continue
            if needs_est:
                cal = calibration(store, provider, model, price.input_includes_cache)
                report.estimated += store.fill_estimated_costs(provider, model, cal.ratio or 1.0, price.rates(False))
            if needs_cost:
                report.costed += store.fill_costs(provider, model, live, price.rates(live))
    return report


def request_estimator(
    store: Store, prices: PriceTable, provider: str, model: str
) -> Callable[[int, int], float] | None:
    """The est_cost_usd settle() gives a new request of this model, from its estimated input tokens and its
    max_tokens (the same calibration and arithmetic, so the same float), or None when the model has no price:
    submit records it with the request instead of updating every row afterwards."""
    price = prices.lookup(provider, model)
    if price is None:
        return None
    ratio = calibration(store, provider, model, price.input_includes_cache).ratio or 1.0
    rates = price.rates(False)
    worst_input = max(rates.input, rates.cache_write)

    def est_cost(tokens: int, max_tokens: int) -> float:
        return (tokens * ratio * worst_input + max_tokens * rates.output) * rates.factor / 1e6

    return est_cost


LEDGER_KEYS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "committed_usd",
    "live_equivalent_usd",
)


@dataclass
class Ledger:
    rows: list[dict[str, Any]]
    total: dict[str, Any]
    warnings: list[str]
    prices_checked: str

    def as_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "total": self.total}


def money(value: float | None) -> float | None:
    """USD rounded to the micro-dollar, as the ledger reports it."""
    return None if value is None else round(value, 6)


def ledger(store: Store, prices: PriceTable, job: str | None = None) -> Ledger:
    """Per job and model: requests, tokens, actual cost, cost committed in flight, and the live price."""
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    result = store.ledger_sums(job)
    earlier = store.superseded_sums(job)
    for job_name, provider, model, n, tin, tout, tcr, tcw, cost, n_cost, n_final, committed in result:
        # Answers paid for and then asked again (retry, live): their tokens count too, once.
        old = [e for e in earlier if e[:3] == (job_name, provider, model)]
        tin += int(sum(e[4] for e in old))
        tout += int(sum(e[5] for e in old))
        tcr += int(sum(e[6] for e in old))
        tcw += int(sum(e[7] for e in old))
        row: dict[str, Any] = {
            "job": job_name,
            "provider": provider,
            "model": model,
            "requests": n,
            "input_tokens": tin,
            "output_tokens": tout,
            "cache_read_tokens": tcr,
            "cache_write_tokens": tcw,
            "cost_usd": None,
            "committed_usd": None,
            "live_equivalent_usd": None,
        }
        rows.append(row)
        price = prices.lookup(provider, model)
        if price is None:
            warning = no_price_warning(provider, model, prices)
            if warning not in warnings:
                warnings.append(warning)
            continue
        if (n_cost or 0) < (n_final or 0):
            # Answered since the last settle(): count those from their tokens, as settle() will.
            cost = (cost or 0.0) + _unsettled_cost(store, price, job_name, provider, model)
        cost = (cost or 0.0) + sum(price.cost(e[4], e[5], e[6], e[7], live=bool(e[3])) for e in old)
        row["cost_usd"] = money(cost or 0.0)
        row["committed_usd"] = money(committed or 0.0)
        row["live_equivalent_usd"] = money(price.cost(tin, tout, tcr, tcw, live=True))
    total: dict[str, Any] = {}
    for key in LEDGER_KEYS:
        values = [r[key] for r in rows]
        if key.endswith("_usd"):
            total[key] = None if any(v is None for v in values) else money(sum(values))
        else:
            total[key] = sum(values)
    return Ledger(rows=rows, total=total, warnings=warnings, prices_checked=prices.checked)


def _unsettled_cost(store: Store, price: Price, job: str, provider: str, model: str) -> float:
    return sum(
        price.cost(tin, tout, tcr, tcw, live=live)
        for tin, tout, tcr, tcw, live in store.unsettled_tokens(job, provider, model)
    )
