"""The local queue and its windows: how much each provider may hold at once, kept across polls, and the
queued shards that live mode answered in part.

`hipbatch drain`, `collect --wait` and `status --watch` keep one Windows for their whole run, so a window
shrunk after a `token_limit_exceeded` refusal stays shrunk until batches of that model succeed again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipbatch.config import Config
from hipbatch.pack import Shard, ShardWriter, shard_prefix
from hipbatch.providers.base import line_id
from hipbatch.records import ShardRow, ShardState
from hipbatch.store import Store

DEFAULT_MAX_IN_FLIGHT = 100  # batches per provider at once: the practical limit of both services


@dataclass
class Window:
    """How much may be at the provider at once."""

    max_in_flight_batches: int = DEFAULT_MAX_IN_FLIGHT
    max_enqueued_tokens: int | None = None  # per model; None = unlimited
    shrunk: dict[str, int] = field(default_factory=dict)  # model -> tokens allowed after a quota refusal

    def refused(self, model: str, in_flight_tokens: int) -> None:
        """A batch of model was refused for quota: send no more than what the provider holds now."""
        held = max(in_flight_tokens, 1)
        self.shrunk[model] = min(self.shrunk.get(model, held), held)

    def succeeded(self, model: str, tokens: int) -> None:
        """A batch of model went through: a shrunk window grows back by its size, up to the configured one."""
        if model in self.shrunk:
            grown = self.shrunk[model] + max(tokens, 1)
            if self.max_enqueued_tokens is not None and grown >= self.max_enqueued_tokens:
                del self.shrunk[model]
            else:
                self.shrunk[model] = grown

    def allows(self, store: Store, shard: ShardRow) -> bool:
        """Whether this shard may go now, given what its provider (and model) already hold."""
        batches, _ = store.in_flight(shard.provider)
        if batches >= self.max_in_flight_batches:
            return False
        limit = self.shrunk.get(shard.model, self.max_enqueued_tokens)
        if limit is None:
            return True
        _, tokens = store.in_flight(shard.provider, shard.model)
        # A shard bigger than the whole quota still goes alone, or it would never go.
        return tokens == 0 or tokens + shard.est_tokens <= limit


def window_for(
    config: Config, provider: str, max_in_flight: int | None = None, max_tokens: int | None = None
) -> Window:
    """One provider's window: the option if given, else `[providers.X]` in the config, else the default."""
    table = config.provider(provider)
    tokens = max_tokens or table.get("max_enqueued_tokens")
    return Window(
        max_in_flight_batches=max_in_flight or int(table.get("max_in_flight_batches") or DEFAULT_MAX_IN_FLIGHT),
        max_enqueued_tokens=int(tokens) if tokens else None,
    )


class Windows(dict[str, Window]):
    """provider -> Window, each built from the config (and command-line overrides) on first use."""

    def __init__(self, config: Config, max_in_flight: int | None = None, max_tokens: int | None = None) -> None:
        super().__init__()
        self.config, self.max_in_flight, self.max_tokens = config, max_in_flight, max_tokens

    def __missing__(self, provider: str) -> Window:
        window = self[provider] = window_for(self.config, provider, self.max_in_flight, self.max_tokens)
        return window


def pick_window(window: Window | Mapping[str, Window] | None, provider: str) -> Window:
    """The window for one provider, from a single window or a per-provider mapping (Windows)."""
    if window is None:
        return Window()
    return window if isinstance(window, Window) else window[provider]


def stalled(unfinished: int, queued: int, created: int, adopted: int) -> bool:
    """Nothing runs, shards wait, and this round sent none: waiting longer cannot help (a missing key,
    a provider that keeps failing, a shard that needs --force)."""
    return unfinished == 0 and queued > 0 and created == 0 and adopted == 0


def without_answered(store: Store, shard: ShardRow) -> ShardRow | None:
    """The queued shard to send instead of this one, once some of its requests were answered live: its
    still-pending lines copied into a new queued shard that the pending requests move to, or None when none is
    left. The old shard becomes `answered` and its file stays whole (retry copies lines from it). The new file
    is written before anything is recorded, so a crash leaves at worst an unused file."""
    if store.pending_count(shard.id) == shard.n_requests:
        return shard  # the usual case, answered by a count: no ids loaded for every queued shard at every poll
    pending = store.pending_in_shard(shard.id)
    if len(pending) == shard.n_requests:
        return shard
    if not pending:
        store.update_shard(shard.id, state=ShardState.ANSWERED)
        return None
    path = Path(shard.path)
    per_line = shard.est_tokens // max(shard.n_requests, 1)
    moved: list[int] = []

    def record(new: Shard) -> None:
        row: dict[str, Any] = {"job": shard.job, "provider": shard.provider, "model": shard.model}
        row.update(endpoint=shard.endpoint, key=new.key, path=str(new.path), n_requests=new.n_requests)
        row.update(n_bytes=new.n_bytes, est_tokens=new.est_tokens)
        with store.atomic():
            moved.append(store.move_requests_to_shard(sorted(new.ids), row))
            store.update_shard(shard.id, state=ShardState.ANSWERED)

    writer = ShardWriter(
        path.parent, shard_prefix(shard.job, store.next_shard_number()), len(pending), 1 << 62, on_close=record
    )
    with path.open("rb") as src:
        for raw in src:
            custom_id = line_id(json.loads(raw)) if raw.strip() else None
            if custom_id in pending:
                writer.add(raw if raw.endswith(b"\n") else raw + b"\n", custom_id, per_line)
    writer.close()
    # Its pending lines are not in the file (none was moved): never send the answered ones instead.
    return store.shard(moved[0]) if moved else None
