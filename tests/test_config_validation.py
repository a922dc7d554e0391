"""Config and template values are checked once, against one table: each error is one line naming key and file."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from hipbatch.config import SETTINGS, check_output_path, example_config, load_config, resolve
from hipbatch.errors import UsageError
from tests.conftest import cli

BAD_PROVIDER_VALUES = [
    ("timeout", '"abc"', 'expected a number > 0, got "abc"'),
    ("timeout", "1e999", "expected a number > 0, got inf"),
    ("timeout", "inf", "expected a number > 0, got inf"),
    ("timeout", "nan", "expected a number > 0, got nan"),
    ("timeout", "0", "expected a number > 0, got 0"),
    ("timeout", "-5", "expected a number > 0, got -5"),
    ("timeout", "true", "expected a number > 0, got true"),
    ("max_tokens", '"lots"', 'expected a whole number >= 1, got "lots"'),
    ("max_tokens", "0", "expected a whole number >= 1, got 0"),
    ("max_tokens", "1.5", "expected a whole number >= 1, got 1.5"),
    ("max_in_flight_batches", '"ten"', 'expected a whole number >= 1, got "ten"'),
    ("max_in_flight_batches", "-3", "expected a whole number >= 1, got -3"),
    ("max_in_flight_batches", "0", "expected a whole number >= 1, got 0"),
    ("max_enqueued_tokens", "0", "expected a whole number >= 1, got 0"),
    ("temperature", '"hot"', 'expected a number between 0 and 2, got "hot"'),
    ("temperature", "2.5", "expected a number between 0 and 2, got 2.5"),
    ("temperature", "-0.1", "expected a number between 0 and 2, got -0.1"),
    ("top_p", "0", "expected a number > 0 and <= 1, got 0"),
    ("top_p", "1.5", "expected a number > 0 and <= 1, got 1.5"),
    ("model", '""', 'expected a non-empty string, got ""'),
    ("model", "3", "expected a non-empty string, got 3"),
    ("base_url", '"ftp://example.com/v1"', "expected an http:// or https:// URL"),
    ("base_url", '"localhost:8000"', "expected an http:// or https:// URL"),
    ("api_key_env", '"MY KEY"', "expected the name of an environment variable"),
    (
        "api_key_env",
        '"\\u001b[31mRED"',
        'expected the name of an environment variable (letters, digits and _), got "\\u001b[31mRED"',
    ),
    ("prices", '"cheap"', 'expected a table, got "cheap"'),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_PROVIDER_VALUES)
def test_bad_config_value_is_one_line_naming_file_and_key(
    hip_dir: Path, tmp_path: Path, key: str, value: str, expected: str
) -> None:
    (tmp_path / "hipbatch.toml").write_text(f"[providers.openai]\n{key} = {value}\n", encoding="utf-8")
    out = cli("submit", hip_dir, "--dry-run", code=None)
    assert out.exit_code == 2, out.stderr
    assert out.stderr.startswith(f"Error: hipbatch.toml: providers.openai.{key}: {expected}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "\x1b" not in out.stderr


def test_bad_value_in_a_json_config_names_that_file(hip_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"providers": {"anthropic": {"timeout": "abc"}}}))
    out = cli("submit", hip_dir, "--dry-run", code=None)
    assert out.exit_code == 2
    assert out.stderr.strip() == 'Error: config.json: providers.anthropic.timeout: expected a number > 0, got "abc"'


def test_the_queue_window_never_sees_a_bad_value(hip_dir: Path, tmp_path: Path) -> None:
    # max_in_flight_batches = -3 used to queue forever: it is refused when the config is read, by every command.
    (tmp_path / "hipbatch.toml").write_text("[providers.openai]\nmax_in_flight_batches = -3\n")
    for args in (("drain",), ("collect",), ("status",)):
        out = cli(*args, code=None)
        assert out.exit_code == 2 and "providers.openai.max_in_flight_batches" in out.stderr, (args, out.stderr)


BAD_TEMPLATE_VALUES = [
    ("[request]\ntemperature = 'hot'\n", 'request.temperature: expected a number between 0 and 2, got "hot"'),
    ("[request]\nmax_tokens = 0\n", "request.max_tokens: expected a whole number >= 1, got 0"),
    ("[request]\nmodel = ''\n", 'request.model: expected a non-empty string, got ""'),
    ("[request.anthropic]\ntop_p = 2\n", "request.anthropic.top_p: expected a number > 0 and <= 1, got 2"),
    ("request = 3\n", "[request] must be a table"),
]


@pytest.mark.parametrize(("toml", "expected"), BAD_TEMPLATE_VALUES)
def test_bad_template_request_value_names_template_toml(
    hip_dir: Path, tmp_path: Path, toml: str, expected: str
) -> None:
    template = tmp_path / "tpl"
    template.mkdir()
    (template / "system.j2").write_text("sys")
    (template / "user.j2").write_text("{{ code }}")
    (template / "template.toml").write_text(toml)
    out = cli("submit", hip_dir, "--dry-run", "--model", "m", "--template-dir", template, code=None)
    assert out.exit_code == 2
    assert out.stderr.strip() == f"Error: {template / 'template.toml'}: {expected}", out.stderr


def test_bad_base_url_in_the_environment_names_the_variable(hip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "127.0.0.1:8000/v1")
    out = cli("submit", hip_dir, "--dry-run", code=None)
    assert out.exit_code == 2
    assert out.stderr.strip() == 'Error: OPENAI_BASE_URL: expected an http:// or https:// URL, got "127.0.0.1:8000/v1"'


def test_good_values_pass_and_keep_their_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hipbatch.toml").write_text(
        "[providers.openai]\ntimeout = 2.5\nmax_tokens = 7\ntemperature = 0\ntop_p = 1\n"
        'base_url = "http://cfg:1/v1"\napi_key_env = "TEAM_KEY_2"\nmax_in_flight_batches = 1\n'
    )
    config = load_config(None)
    assert config.warnings == []
    settings, model, params = resolve(config, "openai", {"model": "tpl", "max_tokens": 100, "temperature": 0.5})
    assert (settings.timeout, settings.base_url, settings.key_env) == (2.5, "http://cfg:1/v1", "TEAM_KEY_2")
    assert params == {"max_tokens": 7, "temperature": 0, "top_p": 1} and model == "tpl"
    monkeypatch.setenv("OPENAI_BASE_URL", "https://env.example/v1")
    assert resolve(config, "openai", {"model": "tpl"})[0].base_url == "https://env.example/v1"


def test_unknown_keys_and_sections_still_warn(tmp_path: Path) -> None:
    (tmp_path / "hipbatch.toml").write_text(
        '[providers.openai]\nmax_token = 5\napi_key = "sk-x"\n[provider.openai]\nmodel = "m"\n'
    )
    warnings = load_config(None).warnings
    assert any("unknown setting providers.openai.max_token" in w for w in warnings)
    assert any("literal key" in w and "sk-x" not in w for w in warnings)
    assert any("unknown section [provider]" in w for w in warnings)


def test_unknown_template_request_keys_become_warnings(tmp_path: Path) -> None:
    from hipbatch.render import load_template

    template = tmp_path / "tpl"
    template.mkdir()
    (template / "system.j2").write_text("sys")
    (template / "user.j2").write_text("{{ code }}")
    (template / "template.toml").write_text("[request]\nmax_token = 5\n[request.mistral]\nmodel = 'x'\n")
    warnings = load_template(template).warnings
    assert any("request.max_token: unknown request setting" in w for w in warnings)
    assert any("[request.mistral] is for an unknown provider" in w for w in warnings)


def test_example_config_documents_every_setting_and_every_line_is_valid(tmp_path: Path) -> None:
    text = example_config()
    assert tomllib.loads(text)["providers"] == {"openai": {}, "anthropic": {}, "gemini": {}}  # all commented out
    for name, setting in SETTINGS.items():
        if setting.kind != "table":
            assert re.search(rf"^# {name} = .+# {re.escape(setting.doc)}", text, re.M), name
    # Uncommented, every example value passes the same checks a real config gets.
    names = "|".join(SETTINGS)
    (tmp_path / "hipbatch.toml").write_text(re.sub(rf"^# (({names}) = )", r"\1", text, flags=re.M))
    config = load_config(None)
    assert config.warnings == []
    assert config.provider("anthropic")["model"] == "claude-haiku-4-5"
    assert set(config.provider("openai")) == {s for s in SETTINGS if SETTINGS[s].kind != "table"}


def test_output_paths_that_cannot_be_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    bad = [
        (Path(""), "--output-file: empty path"),
        (Path("/"), "--output-file /: is a folder"),
        (tmp_path / "folder", f"--output-file {tmp_path / 'folder'}: is a folder"),
        (Path("."), "--output-file: empty path"),
        (tmp_path / "afile" / "out.json", f"{tmp_path / 'afile'} is a file, not a folder"),
        (tmp_path / "afile" / "deeper" / "out.json", f"{tmp_path / 'afile'} is a file, not a folder"),
        (tmp_path / "pipe", "exists and is not a regular file"),
    ]
    for path, expected in bad:
        with pytest.raises(UsageError) as caught:
            check_output_path(path, "--output-file")
        assert expected in str(caught.value) and "\n" not in str(caught.value), (path, caught.value)
    fine = [tmp_path / "new.json", tmp_path / "afile", tmp_path / "new" / "dir" / "out.json", Path("data/x.json")]
    for path in fine:
        assert check_output_path(path, "--output") == path
