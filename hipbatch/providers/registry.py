"""Adapters by provider name for a run (built on first use, keys from the environment), and the adapter, model and
request parameters of a submit after the precedence rules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from hipbatch.config import Config, resolve
from hipbatch.providers import get_provider
from hipbatch.providers.base import Provider, ProviderSettings

if TYPE_CHECKING:  # jinja2 loads only for commands that render
    from hipbatch.render import Template

Factory = Callable[[ProviderSettings], Provider]


class Adapters:
    """One adapter per provider, built on first use from the config (keys from the environment)."""

    def __init__(self, config: Config, factory: Factory = get_provider, ready: Iterable[Provider] = ()) -> None:
        self.config = config
        self.factory = factory
        # Adapters already built for this run (submit's, which checked the model): one SDK client, not two.
        self._cache: dict[str, Provider] = {adapter.name: adapter for adapter in ready}

    def get(self, name: str) -> Provider:
        """The adapter of provider `name` (the same object for the whole run)."""
        if name not in self._cache:
            settings, _, _ = resolve(self.config, name, {"model": "-"})
            self._cache[name] = self.factory(settings)
        return self._cache[name]


def provider_for_job(
    config: Config, template: Template, provider_name: str, model: str | None, factory: Factory = get_provider
) -> tuple[Provider, str, dict[str, Any]]:
    """The adapter, model and request params for a submit, after the precedence rules."""
    settings, chosen, params = resolve(config, provider_name, template.defaults_for(provider_name), model)
    return factory(settings), chosen, params
