"""What a run costs: the price table, token estimates calibrated on past results, the budget gate, and the
ledger queries behind `submit` (before), `status`, `cost` and `report` (after).

Money is counted once per request: est_cost_usd (worst case, at submit) and cost_usd (from the token columns
that collect *sets* for each answer) are only ever filled in where NULL, so any number of collects, status
checks or adopted batches leave the ledger as it is.
"""

from __future__ import annotations

import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hipbatch.config import Config
from hipbatch.errors import BudgetExceeded, UsageError
from hipbatch.records import RETRYABLE, RequestState
from hipbatch.store import Store

PRICE_KINDS = ("input", "output", "cache_read", "cache_write")
IN_FLIGHT = (RequestState.PENDING, RequestState.SUBMITTED)
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


def _actual_input_sql(includes_cache: bool) -> str:
    # Everything the model read: Anthropic reports cache reads and writes apart from input_tokens.
    return "input_tokens" if includes_cache else "input_tokens + cache_read_tokens + cache_write_tokens"


def calibration(store: Store, provider: str, model: str, includes_cache: bool) -> Calibration:
    """The ratio of actual to estimated input tokens over this model's answered requests."""
    actual = _actual_input_sql(includes_cache)
    n, est, act = store.db.execute(
        f"SELECT count(*), sum(est_input_tokens), sum({actual}) FROM requests "
        f"WHERE provider = ? AND model = ? AND answered_at IS NOT NULL AND est_input_tokens > 0 "
        f"AND ({actual}) > 0",
        [provider, model],
    ).fetchone()
    cal = Calibration(samples=int(n))
    if n and est:
        cal.ratio = float(act) / float(est)
    row = store.db.execute(
        "SELECT avg(output_tokens) FROM requests WHERE provider = ? AND model = ? AND state = ? AND output_tokens > 0",
        [provider, model, RequestState.SUCCEEDED],
    ).fetchone()
    cal.avg_output_tokens = float(row[0]) if row and row[0] is not None else None
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
    for provider, model, count, local, outs in store.db.execute(
        "SELECT provider, model, count(*), sum(est_input_tokens), sum(max_tokens) FROM requests "
        "WHERE state = ? GROUP BY provider, model",
        [RequestState.PENDING],
    ).fetchall():
        n += count
        price = prices.lookup(provider, model)
        if price is None:
            unknown = True
            continue
        cal = calibration(store, provider, model, price.input_includes_cache)
        total += price.worst_case((local or 0) * (cal.ratio or 1.0), outs or 0)
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


def estimate_lines(est: Estimate) -> list[str]:
    """The estimate in words, for stderr."""
    lines = [
        f"Estimate for {est.requests} request(s) to {est.provider}/{est.model}: "
        f"{est.input_tokens:,} input tokens, output at most {est.output_ceiling:,} tokens "
        f"({est.calibration_note})"
    ]
    if est.batch_usd is None:
        lines.extend(f"Warning: {w}" for w in est.warnings)
        return lines
    lines.append(
        f"Estimated cost, worst case (no cache hits, every reply at max_tokens): batch "
        f"{usd(est.batch_usd)}, "
        f"the same work live {usd(est.live_usd)} ({est.price_source})"
    )
    if est.likely_batch_usd is not None:
        lines.append(
            f"Likely cost at the {est.likely_output_tokens:,} output tokens replies of this model "
            f"averaged so far: batch {usd(est.likely_batch_usd)}, live {usd(est.likely_live_usd)}"
        )
    return lines


# ---- the ledger -----------------------------------------------------------------------------------


@dataclass
class SettleReport:
    estimated: int = 0  # requests given an est_cost_usd
    costed: int = 0  # requests given a cost_usd
    unpriced: list[str] = field(default_factory=list)  # provider/model with no price


def settle(store: Store, prices: PriceTable) -> SettleReport:
    """Fill est_cost_usd and cost_usd where they are NULL. Safe to run any number of times."""
    report = SettleReport()
    flight, answered = list(IN_FLIGHT), "state NOT IN (?, ?)"
    groups = store.db.execute(
        f"SELECT provider, model, coalesce(via, 'batch') = 'live', est_cost_usd IS NULL, "
        f"cost_usd IS NULL AND {answered} FROM requests WHERE est_cost_usd IS NULL OR (cost_usd IS NULL AND "
        f"{answered}) GROUP BY 1, 2, 3, 4, 5",
        [*flight, *flight],
    ).fetchall()
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
                cur = store.db.execute(
                    "UPDATE requests SET est_cost_usd = "
                    "(est_input_tokens * ? * ? + max_tokens * ?) * ? / 1e6 "
                    "WHERE provider = ? AND model = ? AND est_cost_usd IS NULL",
                    [cal.ratio or 1.0, price.worst_input, price.output, price.factor(False), provider, model],
                )
                report.estimated += max(cur.rowcount, 0)
            if needs_cost:
                cur = store.db.execute(
                    "UPDATE requests SET cost_usd = ((input_tokens - ? * cache_read_tokens) * ? "
                    "+ cache_read_tokens * ? + cache_write_tokens * ? + output_tokens * ?) * ? / 1e6 "
                    f"WHERE provider = ? AND model = ? AND (coalesce(via, 'batch') = 'live') = ? "
                    f"AND cost_usd IS NULL AND {answered}",
                    [
                        int(price.input_includes_cache),
                        price.input,
                        price.cache_read,
                        price.cache_write,
                        price.output,
                        price.factor(bool(live)),
                        provider,
                        model,
                        live,
                        *flight,
                    ],
                )
                report.costed += max(cur.rowcount, 0)
    return report


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


def _money(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def ledger(store: Store, prices: PriceTable, job: str | None = None) -> Ledger:
    """Per job and model: requests, tokens, actual cost, cost committed in flight, and the live price."""
    where, args = ("WHERE job = ?", [job]) if job else ("", [])
    marks = ",".join("?" * len(IN_FLIGHT))
    sql = (
        "SELECT job, provider, model, count(*), coalesce(sum(input_tokens), 0), "
        "coalesce(sum(output_tokens), 0), coalesce(sum(cache_read_tokens), 0), "
        f"coalesce(sum(cache_write_tokens), 0), sum(cost_usd), sum(cost_usd IS NOT NULL AND state NOT IN "
        f"({marks})), sum(state NOT IN ({marks})), sum(CASE WHEN state IN ({marks}) THEN est_cost_usd END) "
        f"FROM requests {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    result = store.db.execute(sql, [*IN_FLIGHT, *IN_FLIGHT, *IN_FLIGHT, *args]).fetchall()
    earlier = superseded(store, job)
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
        row["cost_usd"] = _money(cost or 0.0)
        row["committed_usd"] = _money(committed or 0.0)
        row["live_equivalent_usd"] = _money(price.cost(tin, tout, tcr, tcw, live=True))
    total: dict[str, Any] = {}
    for key in LEDGER_KEYS:
        values = [r[key] for r in rows]
        if key.endswith("_usd"):
            total[key] = None if any(v is None for v in values) else _money(sum(values))
        else:
            total[key] = sum(values)
    return Ledger(rows=rows, total=total, warnings=warnings, prices_checked=prices.checked)


def superseded(store: Store, job: str | None = None) -> list[tuple[Any, ...]]:
    """(job, provider, model, live, input, output, cache read, cache write, cost) of answers paid for and then
    asked again, summed per job, model and mode."""
    where, args = ("WHERE job = ?", [job]) if job else ("", [])
    return store.db.execute(
        "SELECT job, provider, model, coalesce(via, 'batch') = 'live', total(input_tokens), "
        "total(output_tokens), total(cache_read_tokens), total(cache_write_tokens), total(cost_usd) "
        f"FROM superseded {where} GROUP BY 1, 2, 3, 4",
        args,
    ).fetchall()


def _unsettled_cost(store: Store, price: Price, job: str, provider: str, model: str) -> float:
    total = 0.0
    for tin, tout, tcr, tcw, live in store.db.execute(
        "SELECT input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, "
        "coalesce(via, 'batch') = 'live' FROM requests WHERE job = ? AND provider = ? AND model = ? "
        "AND cost_usd IS NULL AND state NOT IN (?, ?)",
        [job, provider, model, *IN_FLIGHT],
    ):
        total += price.cost(tin or 0, tout or 0, tcr or 0, tcw or 0, live=bool(live))
    return total


# ---- status at a glance ---------------------------------------------------------------------------


def job_summaries(store: Store, job: str | None = None) -> dict[str, dict[str, Any]]:
    """Per job: requests done / failed / in flight / queued, and the money spent and still committed."""
    where, args = ("WHERE job = ?", [job]) if job else ("", [])
    sums: dict[str, dict[str, Any]] = {}
    # GROUP BY (job, state) over the covering index (job, state, cost_usd, est_cost_usd): no table reads.
    for name, state, n, cost, n_cost, committed, n_committed in store.db.execute(
        f"SELECT job, state, count(*), total(cost_usd), count(cost_usd), total(est_cost_usd), count(est_cost_usd) "
        f"FROM requests {where} GROUP BY job, state",
        args,
    ):
        s = sums.setdefault(
            name,
            {
                "requests": 0,
                "done": 0,
                "failed": 0,
                "in_flight": 0,
                "queued": 0,
                "cost": 0.0,
                "n_cost": 0,
                "final": 0,
                "committed": 0.0,
                "n_committed": 0,
                "states": {},
            },
        )
        s["requests"] += n
        s["states"][state] = n
        if state == RequestState.SUCCEEDED:
            s["done"] += n
        elif state in RETRYABLE:
            s["failed"] += n
        elif state == RequestState.SUBMITTED:
            s["in_flight"] += n
        elif state == RequestState.PENDING:
            s["queued"] += n
        s["cost"] += cost or 0.0
        if state in IN_FLIGHT:
            s["committed"] += committed or 0.0
            s["n_committed"] += n_committed
        else:
            s["final"] += n
            s["n_cost"] += n_cost
    for name, *_, cost in superseded(store, job):
        if name in sums:
            sums[name]["cost"] += cost  # paid answers asked again count too
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(sums):
        s = sums[name]
        out[name] = {
            "requests": s["requests"],
            "done": s["done"],
            "failed": s["failed"],
            "in_flight": s["in_flight"],
            "queued": s["queued"],
            # None when an answered request has no price yet (unknown model, or not settled)
            "cost_usd": _money(s["cost"]) if s["n_cost"] >= s["final"] else None,
            "committed_usd": _money(s["committed"]) if s["n_committed"] >= s["in_flight"] + s["queued"] else None,
            "states": dict(sorted(s["states"].items())),  # requests per ledger state
        }
    return out


def batch_figures(store: Store, batches: list[dict[str, Any]], now: float | None = None) -> dict[str, dict[str, Any]]:
    """Per batch: seconds to expiry while it runs, and the most common failure reason."""
    now = time.time() if now is None else now
    tops = _request_errors(store)
    out: dict[str, dict[str, Any]] = {}
    for b in batches:
        expires = b.get("expires_at")
        out[b["id"]] = {
            "expires_in_seconds": round(expires - now, 1) if expires and not b["is_final"] else None,
            "top_error": tops.get(b["id"]) or _batch_error(b),
        }
    return out


def _request_errors(store: Store) -> dict[str, dict[str, Any]]:
    """The most common failure reason of each batch's requests (index-only over (state, batch_id, error_code))."""
    marks = ",".join("?" * len(RETRYABLE))
    best: dict[str, tuple[int, str, str | None]] = {}
    for batch_id, state, code, n in store.db.execute(
        f"SELECT batch_id, state, error_code, count(*) FROM requests "
        f"WHERE state IN ({marks}) AND batch_id IS NOT NULL GROUP BY 1, 2, 3",
        list(RETRYABLE),
    ):
        seen = best.get(batch_id)
        if seen is None or (n, seen[1]) > (seen[0], state):  # most requests first, then state name
            best[batch_id] = (n, state, code)
    out = {}
    for batch_id, (n, state, code) in best.items():
        row = store.db.execute(
            "SELECT error_message FROM requests WHERE state = ? AND batch_id = ? AND error_code IS ? LIMIT 1",
            [state, batch_id, code],
        ).fetchone()
        reason = state if not code or code == state else f"{state}:{code}"
        out[batch_id] = {"reason": reason, "count": n, "message": row[0] if row else None}
    return out


def _batch_error(b: dict[str, Any]) -> dict[str, Any] | None:
    errors = json.loads(b["errors"]) if b.get("errors") else []
    if errors:  # a batch refused as a whole (validation, quota)
        first = errors[0]
        return {
            "reason": f"batch {b['status']}:{first.get('code')}",
            "count": b.get("total") or len(errors),
            "message": first.get("message"),
        }
    if b["is_final"] and (b.get("failed") or 0) > 0:
        if not b.get("collected"):
            return {
                "reason": "not collected yet",
                "count": b["failed"],
                "message": "run `hipbatch collect` to download the error lines and see why",
            }
    return None


def glance(
    store: Store, job: str | None = None, now: float | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(figures per batch id, summary per job) for `hipbatch status`."""
    return batch_figures(store, store.batches(job=job), now), job_summaries(store, job)


def summary_line(job: str, s: dict[str, Any]) -> str:
    """One line per job above the status table."""
    spent = usd(s["cost_usd"]) if s["cost_usd"] is not None else "unknown (no price for the model)"
    committed = ""
    if s["in_flight"] or s["queued"]:
        committed = f", up to {usd(s['committed_usd'])} committed in flight" if s["committed_usd"] is not None else ""
    return (
        f"{job}: {s['requests']} requests: {s['done']} done, {s['failed']} failed, {s['in_flight']} in "
        f"flight, {s['queued']} queued; cost so far {spent}{committed}"
    )
