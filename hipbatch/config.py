"""The config file (hipbatch.toml, or a seed-style config.json) and the precedence rules.

Precedence for every setting: command-line option > environment > config file > template defaults.
Keys are read from the environment only; a literal key in a config file is ignored with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hipbatch.errors import UsageError
from hipbatch.providers import PROVIDERS, ProviderSettings, check_name
from hipbatch.text import shown

REQUEST_PARAMS = ("max_tokens", "temperature", "top_p")
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL", "gemini": "GOOGLE_GEMINI_BASE_URL"}
TEMPLATE_ONLY_PARAMS = ("json_schema",)  # set by a template's [output] table, never by the config file
DEFAULT_BASE_URL = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}  # for docs
SECTIONS = ("providers", "prices")  # the config file's top-level tables


@dataclass(frozen=True)
class Setting:
    """One key of a [providers.NAME] table (and of a template's [request] tables when in_request)."""

    name: str
    kind: str  # "string", "url", "env", "number", "integer" or "table"
    doc: str
    example: str  # a TOML value, shown commented out in the example hipbatch.toml
    default: str  # what applies when the key is not set
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False  # the minimum itself is not allowed
    in_request: bool = False

    def expected(self) -> str:
        """What a valid value is, as said in an error: 'a number > 0', 'a whole number >= 1', ..."""
        if self.kind not in ("number", "integer"):
            return _KIND_TEXT[self.kind]
        noun = "a number" if self.kind == "number" else "a whole number"
        low = None if self.minimum is None else f"{'>' if self.above_minimum else '>='} {self.minimum:g}"
        high = None if self.maximum is None else f"<= {self.maximum:g}"
        if low and high and not self.above_minimum:
            return f"{noun} between {self.minimum:g} and {self.maximum:g}"
        return " and ".join(part for part in (f"{noun} {low}" if low else noun, high) if part)

    def accepts(self, value: Any) -> bool:
        if self.kind in ("number", "integer"):
            if isinstance(value, bool) or not isinstance(value, int if self.kind == "integer" else int | float):
                return False
            if not math.isfinite(value):
                return False
            if self.minimum is not None and (value < self.minimum or (self.above_minimum and value == self.minimum)):
                return False
            return self.maximum is None or value <= self.maximum
        if self.kind == "table":
            return isinstance(value, dict)
        if not isinstance(value, str) or not value.strip():
            return False
        if self.kind == "env":
            return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) is not None
        if self.kind == "url":
            parts = urlsplit(value)
            return parts.scheme in ("http", "https") and bool(parts.netloc)
        return True


_KIND_TEXT = {
    "string": "a non-empty string",
    "url": "an http:// or https:// URL",
    "env": "the name of an environment variable (letters, digits and _)",
    "table": "a table",
}

#: Every key a [providers.NAME] table may hold: type, range, meaning, default. Request parameters (in_request)
#: may also be set in a template's [request] and [request.PROVIDER] tables. `hipbatch init` writes them all.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("model", "string", "model to ask", '"gpt-4o-mini"', "the template's", in_request=True),
        Setting("base_url", "url", "API base URL", '""', "the SDK's"),
        Setting("api_key_env", "env", "NAME of the environment variable holding the key", '""', ""),
        Setting("timeout", "number", "seconds allowed for each HTTP call", "120", "120", 0, above_minimum=True),
        Setting("max_in_flight_batches", "integer", "batches at the provider at once", "100", "100", 1),
        Setting("max_enqueued_tokens", "integer", "enqueued input tokens per model", "2000000", "no limit", 1),
        Setting("max_tokens", "integer", "reply ceiling per request", "1024", "the template's", 1, in_request=True),
        Setting("temperature", "number", "sampling temperature", "0.2", "the template's", 0, 2, in_request=True),
        Setting("top_p", "number", "nucleus sampling", "1.0", "the template's", 0, 1, True, in_request=True),
        Setting("prices", "table", "price overrides, as [prices.PROVIDER.MODEL]", "{}", "prices.toml"),
    )
}
PROVIDER_KEYS = {*SETTINGS, "api_key", *REQUEST_PARAMS}
_EXAMPLES = {
    "openai": {"model": '"gpt-4o-mini"'},
    "anthropic": {"model": '"claude-haiku-4-5"'},
    "gemini": {"model": '"gemini-2.5-flash"'},
}


def shown_value(value: Any) -> str:
    """A config value as an error message shows it: TOML-like, control characters escaped, cut at 80."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    text = shown(text)
    return text if len(text) <= 80 else text[:77] + "..."


def check_value(key: str, value: Any, where: str) -> Any:
    """value, if it suits the key's Setting (keys without one pass), else UsageError '<where>: expected ...'."""
    setting = SETTINGS.get(key)
    if setting is not None and not setting.accepts(value):
        raise UsageError(f"{where}: expected {setting.expected()}, got {shown_value(value)}")
    return value


def check_request(request: Any, where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[str]]:
    """A template's [request] table checked: (params, {provider: params}, warnings), errors naming where."""
    if not isinstance(request, dict):
        raise UsageError(f"{where}: [request] must be a table")
    params: dict[str, Any] = {}
    per_provider: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for key, value in request.items():
        if isinstance(value, dict):
            if key not in PROVIDERS:
                warnings.append(f"{where}: [request.{key}] is for an unknown provider; it is not used")
            per_provider[key] = _check_request_keys(value, f"{where}: request.{key}", warnings)
        else:
            params.update(_check_request_keys({key: value}, f"{where}: request", warnings))
    return params, per_provider, warnings


def _check_request_keys(table: dict[str, Any], where: str, warnings: list[str]) -> dict[str, Any]:
    for key, value in table.items():
        setting = SETTINGS.get(key)
        if key not in REQUEST_PARAMS and (setting is None or not setting.in_request):
            warnings.append(f"{where}.{key}: unknown request setting; it is not used")
        else:
            check_value(key, value, f"{where}.{key}")
    return table


def check_output_path(path: Path, option: str) -> Path:
    """path, if a file can be written there; else UsageError naming the option ('', '/', a folder, ...)."""
    text = shown(str(path))
    if str(path) in ("", "."):
        raise UsageError(f"{option}: empty path; give a file name such as data/prompts.json")
    if path.is_dir():
        raise UsageError(f"{option} {text}: is a folder; give a file name, such as {text.rstrip('/')}/prompts.json")
    if path.exists() and not path.is_file():
        raise UsageError(f"{option} {text}: exists and is not a regular file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {text}: {shown(str(parent))} is a file, not a folder")
            break
    return path


def example_config() -> str:
    """A hipbatch.toml with every setting commented out, with its meaning and default (for `hipbatch init`)."""
    lines = [
        "# hipbatch.toml: settings per provider. Every setting is commented out: uncomment what you need.",
        "# Precedence: command-line option > environment > this file > the template's template.toml.",
        "# API keys come from the environment only (see api_key_env): never write a key in this file.",
        "",
    ]
    for provider, (_, key_env) in PROVIDERS.items():
        lines.append(f"[providers.{provider}]")
        for setting in SETTINGS.values():
            if setting.kind == "table":
                continue
            example = _EXAMPLES.get(provider, {}).get(setting.name, setting.example)
            default = setting.default
            if setting.name == "base_url":
                example = json.dumps(DEFAULT_BASE_URL.get(provider, "https://example.com/v1"))
                default = f"{setting.default}; {BASE_URL_ENV.get(provider, 'the environment')} overrides it"
            elif setting.name == "api_key_env":
                example = default = json.dumps(key_env)
            lines.append(f"# {setting.name} = {example}".ljust(44) + f"# {setting.doc} (default: {default})")
        lines.append("")
    lines += [
        "# Prices in USD per 1M tokens for models missing from the shipped table (see README, Cost):",
        '# [prices.openai."my-fine-tune"]',
        "# input = 0.30",
        "# output = 1.20",
        "",
    ]
    return "\n".join(lines)


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
    for section in data:
        if section not in SECTIONS:
            config.warnings.append(f"{path}: ignoring unknown section [{shown(str(section))}]")
    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        raise UsageError(f"--config {path}: 'providers' must be a table of provider tables")
    for name, table in providers.items():
        if name not in PROVIDERS:
            config.warnings.append(f"{path}: ignoring unknown provider '{shown(name)}'")
            continue
        if not isinstance(table, dict):
            raise UsageError(f"--config {path}: providers.{name} must be a table")
        config.providers[name] = _provider_table(path, name, table, config.warnings)
    return config


def _provider_table(path: Path, name: str, table: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """One [providers.NAME] table: the literal key dropped, unknown keys dropped, every value checked."""
    table = dict(table)
    if table.pop("api_key", None):
        env = table.get("api_key_env", PROVIDERS[name][1])
        warnings.append(
            f"{path}: providers.{name}.api_key holds a literal key; it is ignored and never copied. "
            f"Put the key in the environment variable {shown(str(env))} instead"
        )
    for key in list(table):
        if key not in PROVIDER_KEYS:
            warnings.append(f"{path}: ignoring unknown setting providers.{name}.{shown(key)}")
            table.pop(key)
        else:
            check_value(key, table[key], f"{path}: providers.{name}.{key}")
    return table


def resolve(
    config: Config, provider: str, template_defaults: dict[str, Any], model: str | None = None
) -> tuple[ProviderSettings, str, dict[str, Any]]:
    """(settings, model, request params) for a provider, applying the precedence rules."""
    check_name(provider)
    table = config.provider(provider)
    params = {k: template_defaults[k] for k in REQUEST_PARAMS if template_defaults.get(k) is not None}
    params.update({k: table[k] for k in REQUEST_PARAMS if table.get(k) is not None})
    params.update({k: template_defaults[k] for k in TEMPLATE_ONLY_PARAMS if template_defaults.get(k) is not None})
    chosen = model or os.environ.get("HIPBATCH_MODEL") or table.get("model") or template_defaults.get("model")
    if not chosen:
        raise UsageError(f"no model for {provider}: pass --model or set model in the template or config")
    base_url, source = os.environ.get(BASE_URL_ENV[provider], "").strip() or None, BASE_URL_ENV[provider]
    if base_url:
        check_value("base_url", base_url, BASE_URL_ENV[provider])
    elif table.get("base_url"):
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
