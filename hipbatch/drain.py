"""The local queue's windows: how much each provider may hold at once, kept across polls.

`hipbatch drain`, `collect --wait` and `status --watch` keep one Windows for their whole run, so a window
shrunk after a `token_limit_exceeded` refusal stays shrunk until batches of that model succeed again.
"""

from __future__ import annotations

from typing import Any

from hipbatch.submit import DEFAULT_MAX_IN_FLIGHT, Window


def window_for(config: Any, provider: str, max_in_flight: int | None = None, max_tokens: int | None = None) -> Window:
    """One provider's window: the option if given, else `[providers.X]` in the config, else the default."""
    table = config.provider(provider)
    tokens = max_tokens or table.get("max_enqueued_tokens")
    return Window(
        max_in_flight_batches=max_in_flight or int(table.get("max_in_flight_batches") or DEFAULT_MAX_IN_FLIGHT),
        max_enqueued_tokens=int(tokens) if tokens else None,
    )


class Windows(dict[str, Window]):
    """provider -> Window, each built from the config (and command-line overrides) on first use."""

    def __init__(self, config: Any, max_in_flight: int | None = None, max_tokens: int | None = None) -> None:
        super().__init__()
        self.config, self.max_in_flight, self.max_tokens = config, max_in_flight, max_tokens

    def __missing__(self, provider: str) -> Window:
        window = self[provider] = window_for(self.config, provider, self.max_in_flight, self.max_tokens)
        return window


def stalled(unfinished: int, queued: int, created: int, adopted: int) -> bool:
    """Nothing runs, shards wait, and this round sent none: waiting longer cannot help (a missing key,
    a provider that keeps failing, a shard that needs --force)."""
    return unfinished == 0 and queued > 0 and created == 0 and adopted == 0
