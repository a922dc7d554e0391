"""Structured output in templates: the [output] table, the json_schema request parameter (part of every custom_id)
and how each adapter maps it, checked against the installed SDKs' request types."""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest

from hipbatch.config import load_config, resolve
from hipbatch.errors import TemplateError
from hipbatch.extract import ExtractSettings
from hipbatch.providers import ProviderSettings, get_provider
from hipbatch.render import JSON_SCHEMA_PARAM, REPO_ROOT, default_json_schema, load_template
from tests.conftest import cli

JSON_TEMPLATE = REPO_ROOT / "templates" / "json"
DEFAULT_TEMPLATE = REPO_ROOT / "templates" / "default"


def json_params(provider: str, template: Path = JSON_TEMPLATE) -> dict[str, Any]:
    return resolve(load_config(None), provider, load_template(template).defaults_for(provider))[2]


def test_builtin_json_template() -> None:
    template = load_template(JSON_TEMPLATE)
    schema = json.loads((JSON_TEMPLATE / "schema.json").read_text())
    assert template.params[JSON_SCHEMA_PARAM] == {"name": "english_prompt", "schema": schema}
    assert template.extract == ExtractSettings(json_field="english_prompt")
    # OpenAI's strict mode needs every property required and no others allowed.
    assert schema["additionalProperties"] is False and schema["required"] == list(schema["properties"])
    system, user = template.render("__global__ void k() {}", "k.hip")
    assert '"english_prompt"' in system and "JSON" in system and "<prompt>" not in system
    assert "JSON object" in user and "__global__ void k() {}" in user
    assert JSON_SCHEMA_PARAM not in load_template(DEFAULT_TEMPLATE).params


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_json_schema_survives_resolve(provider: str) -> None:
    params = json_params(provider)
    assert params[JSON_SCHEMA_PARAM]["name"] == "english_prompt"
    assert set(params) == {"max_tokens", "temperature", JSON_SCHEMA_PARAM}
    assert JSON_SCHEMA_PARAM not in json_params(provider, DEFAULT_TEMPLATE)


def test_json_schema_is_not_taken_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "hipbatch.toml").write_text('[providers.openai]\nmax_tokens = 50\njson_schema = "x"\n')
    config = load_config(None)
    assert any("json_schema" in w for w in config.warnings)
    _, _, params = resolve(config, "openai", load_template(DEFAULT_TEMPLATE).defaults_for("openai"))
    assert params == {"max_tokens": 50, "temperature": 0.2}


def write_template(root: Path, toml: str, schema: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "system.j2").write_text("Answer in JSON.")
    (root / "user.j2").write_text("{{ code }}")
    (root / "template.toml").write_text(toml)
    if schema is not None:
        (root / "schema.json").write_text(schema)
    return root


def test_output_defaults_field_name_and_schema(tmp_path: Path) -> None:
    template = load_template(write_template(tmp_path / "t", '[output]\nformat = "json"\n'))
    assert template.params[JSON_SCHEMA_PARAM] == {
        "name": "english_prompt",
        "schema": default_json_schema("english_prompt"),
    }
    assert template.extract.json_field == "english_prompt"
    custom = load_template(write_template(tmp_path / "u", '[output]\nformat = "json"\nfield = "task"\n'))
    assert custom.params[JSON_SCHEMA_PARAM]["name"] == "task"
    assert custom.params[JSON_SCHEMA_PARAM]["schema"]["required"] == ["task"]
    assert custom.extract.json_field == "task"
    text = load_template(write_template(tmp_path / "v", '[output]\nformat = "text"\n'))
    assert JSON_SCHEMA_PARAM not in text.params and text.extract.json_field is None


@pytest.mark.parametrize(
    ("toml", "schema", "expected"),
    [
        ('[output]\nformat = "xml"\n', None, "template.toml: [output] format must be one of text, json"),
        ('[output]\nformat = "json"\nfeild = "x"\n', None, "unknown key(s) ['feild'] in [output]"),
        ('[output]\nfield = "x"\n', None, 'need format = "json"'),
        ('[output]\nformat = "json"\nfield = ""\n', None, "[output] field must be a non-empty property name"),
        ('[output]\nformat = "json"\nname = "has space"\n', None, "[output] name must match"),
        ('[output]\nformat = "json"\nschema_file = "schema.json"\n', None, "schema.json: cannot read the schema file"),
        ('[output]\nformat = "json"\nschema_file = "schema.json"\n', "{nope", "schema.json: not valid JSON"),
        ('[output]\nformat = "json"\nschema_file = "schema.json"\n', "[]", "schema.json: the schema must describe"),
        (
            '[output]\nformat = "json"\nschema_file = "schema.json"\n',
            '{"type": "object", "properties": {"english_prompt": {"type": "integer"}}}',
            "schema.json: the schema must declare 'english_prompt' as a string property",
        ),
        (
            '[output]\nformat = "json"\nschema_file = "schema.json"\n',
            '{"type": "object", "properties": {"english_prompt": {"type": "string"}}}',
            "schema.json: 'english_prompt' must be listed in \"required\"",
        ),
        (
            '[output]\nformat = "json"\n[extract]\njson_field = "other"\n',
            None,
            "[extract] json_field = 'other' differs from [output] field = 'english_prompt'",
        ),
        ("output = 3\n", None, "template.toml: [output] must be a table"),
    ],
)
def test_output_errors_name_the_file(
    tmp_path: Path, hip_dir: Path, toml: str, schema: str | None, expected: str
) -> None:
    root = write_template(tmp_path / "tpl", toml, schema)
    with pytest.raises(TemplateError) as caught:
        load_template(root)
    assert expected in str(caught.value)
    # The same through the CLI: one line naming the file, exit 2, no traceback.
    out = cli("submit", hip_dir, "--dry-run", "--model", "m", "--template-dir", root, code=2)
    assert expected in out.stderr and "Traceback" not in out.stderr


def dry_run_lines(tmp_path: Path, job: str) -> list[dict[str, Any]]:
    shards = sorted((tmp_path / "state" / "dry-run" / job).glob("*.jsonl"))
    return [json.loads(line) for shard in shards for line in shard.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_json_template_gives_other_custom_ids_than_the_default(provider: str, hip_dir: Path, tmp_path: Path) -> None:
    ids = {}
    lines = {}
    for name, template in (("default", DEFAULT_TEMPLATE), ("json", JSON_TEMPLATE)):
        cli("submit", hip_dir, "--dry-run", "--provider", provider, "--template-dir", template, "--job", name)
        lines[name] = dry_run_lines(tmp_path, name)
        ids[name] = {line["custom_id"] for line in lines[name]}
    assert len(ids["default"]) == len(ids["json"]) == 6 and not ids["default"] & ids["json"]
    schema = json.loads((JSON_TEMPLATE / "schema.json").read_text())
    for line in lines["json"]:
        if provider == "openai":
            assert line["body"]["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "english_prompt", "schema": schema, "strict": True},
            }
            assert JSON_SCHEMA_PARAM not in line["body"]
        else:
            assert line["params"]["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
            assert JSON_SCHEMA_PARAM not in line["params"]
    # A different schema is a different request, so a different id.
    other = tmp_path / "other"
    shutil.copytree(JSON_TEMPLATE, other)
    (other / "schema.json").write_text(json.dumps({**schema, "description": "another schema"}))
    cli("submit", hip_dir, "--dry-run", "--provider", provider, "--template-dir", other, "--job", "other")
    other_ids = {line["custom_id"] for line in dry_run_lines(tmp_path, "other")}
    assert len(other_ids) == 6 and not other_ids & ids["json"]


def _typed_dict_keys(cls: Any) -> set[str]:
    keys: set[str] = set()
    for klass in reversed(cls.__mro__):
        keys |= set(getattr(klass, "__annotations__", {}))
    return keys | set(typing.get_type_hints(cls))


def test_mapped_keys_exist_in_the_installed_sdk_request_types() -> None:
    """The keys the adapters map json_schema to are fields of the SDK's own request types (a misspelt key would be
    ignored or rejected by the real service). anthropic 2.15 declares output_config.format as JSONOutputFormatParam
    {type: "json_schema", schema}; openai 3.57 declares response_format as ResponseFormatJSONSchema."""
    from anthropic.types import json_output_format_param, output_config_param
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
    from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
    from openai.types.shared_params import response_format_json_schema

    line = get_provider(ProviderSettings(name="openai", key_env="UNUSED")).to_line(
        "id", "m", json_params("openai"), "sys", "user"
    )
    assert "response_format" in _typed_dict_keys(CompletionCreateParamsNonStreaming)
    fmt = line["body"]["response_format"]
    assert set(fmt) <= _typed_dict_keys(response_format_json_schema.ResponseFormatJSONSchema)
    assert set(fmt["json_schema"]) <= _typed_dict_keys(response_format_json_schema.JSONSchema)

    params = get_provider(ProviderSettings(name="anthropic", key_env="UNUSED")).to_line(
        "id", "m", json_params("anthropic"), "sys", "user"
    )["params"]
    assert "output_config" in _typed_dict_keys(MessageCreateParamsNonStreaming)
    assert set(params["output_config"]) <= _typed_dict_keys(output_config_param.OutputConfigParam)
    assert set(params["output_config"]["format"]) == _typed_dict_keys(json_output_format_param.JSONOutputFormatParam)
