"""Templates and source files -> provider-neutral Requests (pure apart from reading the files)."""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import jinja2

from hipbatch.errors import TemplateError, UsageError
from hipbatch.extract import ExtractSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE_DIR = Path("templates/default")
MAX_SOURCE_BYTES = 2 * 1024 * 1024  # a "source file" bigger than this is not a kernel; skipped with a reason


@dataclass
class Template:
    """A template directory: system and user prompts plus request and extractor settings."""

    path: Path
    system: jinja2.Template
    user: jinja2.Template
    params: dict[str, Any]  # model, max_tokens, temperature (template defaults)
    provider_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # [request.<provider>]
    extract: ExtractSettings = field(default_factory=ExtractSettings)

    def render(self, code: str, file_name: str) -> tuple[str, str]:
        """Render (system, user) for one source file."""
        variables = {"code": code, "file_name": file_name, "language": "HIP"}
        return _render(self.system, variables), _render(self.user, variables)

    def defaults_for(self, provider: str) -> dict[str, Any]:
        return {**self.params, **self.provider_params.get(provider, {})}


def resolve_template_dir(path: Path) -> Path:
    """The given folder, or the bundled default when the default is asked for outside the repo."""
    if path.is_dir():
        return path
    if path == DEFAULT_TEMPLATE_DIR and (REPO_ROOT / path).is_dir():
        return REPO_ROOT / path
    raise UsageError(f"--template-dir {path}: not a folder")


def load_template(path: Path) -> Template:
    """Load and compile a template folder; errors name the file and line."""
    path = resolve_template_dir(path)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )
    templates = {}
    for name in ("system.j2", "user.j2"):
        if not (path / name).is_file():
            raise TemplateError(f"{path / name}: missing (a template folder holds system.j2 and user.j2)")
        try:
            templates[name] = env.get_template(name)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{path / name}:{e.lineno}: template syntax error: {e.message}") from None
    toml_path = path / "template.toml"
    settings: dict[str, Any] = {}
    if toml_path.is_file():
        try:
            settings = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise TemplateError(f"{toml_path}: {e}") from None
    request = dict(settings.get("request", {}))
    provider_params = {k: request.pop(k) for k in list(request) if isinstance(request[k], dict)}
    try:
        extract = ExtractSettings.from_mapping(settings.get("extract", {}))
    except ValueError as e:
        raise TemplateError(f"{toml_path}: [extract] {e}") from None
    return Template(path, templates["system.j2"], templates["user.j2"], request, provider_params, extract)


def _render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    try:
        return template.render(variables)
    except jinja2.UndefinedError as e:
        line = _template_line(e)
        raise TemplateError(f"{template.filename}:{line}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"{template.filename}: {e}") from None


def _template_line(error: BaseException) -> str:
    tb = error.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


# ---- discovery ------------------------------------------------------------------------------------


def discover(input_dir: Path, pattern: str = "**/*.hip") -> list[str]:
    """Relative posix names of the files under input_dir matching the glob, sorted."""
    if not input_dir.exists():
        raise UsageError(f"INPUT_DIR {input_dir}: no such folder")
    if not input_dir.is_dir():
        raise UsageError(f"INPUT_DIR {input_dir}: not a folder")
    # '**/' matches zero or more folders, as in pathlib: try the pattern with and without it.
    patterns = {pattern}
    while pattern.startswith("**/"):
        pattern = pattern[3:]
        patterns.add(pattern)
    names: list[str] = []
    base = str(input_dir)
    for root, dirs, files in os.walk(base):
        dirs.sort()
        rel_root = os.path.relpath(root, base)
        for fname in files:
            rel = fname if rel_root == "." else f"{rel_root}/{fname}".replace(os.sep, "/")
            if any(fnmatchcase(rel, p) for p in patterns):
                names.append(rel)
    names.sort()
    return names


class SkipFile(Exception):
    """A source file that cannot be used; the message is the reason recorded."""


def read_source(path: Path) -> str:
    """Read one source file as UTF-8 text, or raise SkipFile with the reason."""
    try:
        size = path.stat().st_size
        if size > MAX_SOURCE_BYTES:
            raise SkipFile(f"too large ({size} bytes > {MAX_SOURCE_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise SkipFile(f"unreadable: {e.strerror}") from None
    if not data.strip():
        raise SkipFile("empty")
    if b"\x00" in data:
        raise SkipFile("binary (contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipFile(f"not UTF-8 (byte {e.start})") from None
    return text.removeprefix("\ufeff")


# ---- identity -------------------------------------------------------------------------------------


def request_id(provider: str, endpoint: str, model: str, params: dict[str, Any], system: str, user: str) -> str:
    """Deterministic custom_id: a hash of everything that is sent. 51 chars of [a-z0-9-]."""
    canonical = json.dumps(
        [provider, endpoint, model, sorted(params.items()), system, user],
        ensure_ascii=False, separators=(",", ":"), default=str,
    )
    return "hb-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:48]


def estimate_tokens(text: str) -> int:
    """A fast local estimate of tokens: about 3.6 characters per token for code and English."""
    return max(1, int(len(text) / 3.6))
