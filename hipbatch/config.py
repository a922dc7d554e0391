"""The config file (hipbatch.toml, or a seed-style config.json) and the precedence rules.

Precedence for every setting: command-line option > environment > config file > template defaults.
Keys are read from the environment only; a literal key in a config file is ignored with a warning.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipbatch.errors import UsageError
from hipbatch.providers import PROVIDERS, ProviderSettings, check_name

REQUEST_PARAMS = ("max_tokens", "temperature", "top_p")
PROVIDER_KEYS = {
    "model",
    "base_url",
    "api_key_env",
    "api_key",
    "timeout",
    "max_in_flight_batches",
    "max_enqueued_tokens",
    "prices",
    *REQUEST_PARAMS,
}
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}


@dataclass
class Config:
    """A parsed config file (empty when there is none)."""

    path: Path | None = None
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def provider(self, name: str) -> dict[str, Any]:
        return self.providers.get(name, {})


def load_config(path: Path | None) -> Config:
    """Read --config PATH, else ./hipbatch.toml, else ./config.json, else nothing."""
    if path is None:
        for candidate in (Path("hipbatch.toml"), Path("config.json")):
            if candidate.is_file():
                path = candidate
                break
        else:
            return Config()
    elif not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table/object at the top level")
    config = Config(path=path, data=data)
    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        raise UsageError(f"--config {path}: 'providers' must be a table of provider tables")
    for name, table in providers.items():
        if name not in PROVIDERS:
            config.warnings.append(f"{path}: ignoring unknown provider '{name}'")
            continue
        if not isinstance(table, dict):
            raise UsageError(f"--config {path}: providers.{name} must be a table")
        table = dict(table)
        if table.pop("api_key", None):
            env = table.get("api_key_env", PROVIDERS[name][1])
            config.warnings.append(
                f"{path}: providers.{name}.api_key holds a literal key; it is ignored and never copied. "
                f"Put the key in the environment variable {env} instead"
            )
        for key in list(table):
            if key not in PROVIDER_KEYS:
                config.warnings.append(f"{path}: ignoring unknown setting providers.{name}.{key}")
                table.pop(key)
        config.providers[name] = table
    return config


def resolve(
    config: Config, provider: str, template_defaults: dict[str, Any], model: str | None = None
) -> tuple[ProviderSettings, str, dict[str, Any]]:
    """(settings, model, request params) for a provider, applying the precedence rules."""
    check_name(provider)
    table = config.provider(provider)
    params = {k: template_defaults[k] for k in REQUEST_PARAMS if template_defaults.get(k) is not None}
    params.update({k: table[k] for k in REQUEST_PARAMS if table.get(k) is not None})
    chosen = model or os.environ.get("HIPBATCH_MODEL") or table.get("model") or template_defaults.get("model")
    if not chosen:
        raise UsageError(f"no model for {provider}: pass --model or set model in the template or config")
    base_url, source = os.environ.get(BASE_URL_ENV[provider]), BASE_URL_ENV[provider]
    if not base_url and table.get("base_url"):
        base_url, source = str(table["base_url"]), f"providers.{provider}.base_url in {config.path}"
    settings = ProviderSettings(
        name=provider,
        key_env=str(table.get("api_key_env") or PROVIDERS[provider][1]),
        base_url=base_url or None,
        timeout=float(table.get("timeout", 120.0)),
        params=params,
        base_url_source=source if base_url else None,
    )
    return settings, str(chosen), params
