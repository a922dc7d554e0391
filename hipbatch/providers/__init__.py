"""get_provider(name): builds an adapter, importing its SDK only then (so `hipbatch --help` loads none)."""

from __future__ import annotations

import importlib
from typing import Any

from hipbatch.errors import UsageError
from hipbatch.providers.base import BatchProvider, LiveProvider, Provider, ProviderSettings

#: provider name -> (module, default key variable). A third provider is one module and one line here.
PROVIDERS: dict[str, tuple[str, str]] = {
    "openai": ("hipbatch.providers.openai", "OPENAI_API_KEY"),
    "anthropic": ("hipbatch.providers.anthropic", "ANTHROPIC_API_KEY"),
    "gemini": ("hipbatch.providers.gemini", "GEMINI_API_KEY"),
}


def check_name(name: str) -> str:
    if name not in PROVIDERS:
        raise UsageError(f"--provider {name}: unknown provider (choose from {', '.join(PROVIDERS)})")
    return name


def get_provider(settings: ProviderSettings, client: Any = None) -> Provider:
    """The adapter for settings.name; its SDK client is `client`, else built lazily on first call."""
    module = importlib.import_module(PROVIDERS[check_name(settings.name)][0])
    adapter: Provider = module.Adapter(settings, client)
    return adapter


__all__ = ["PROVIDERS", "BatchProvider", "LiveProvider", "Provider", "ProviderSettings", "check_name", "get_provider"]
