"""Templates and source files -> provider-neutral Requests (pure apart from reading the files)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from hipbatch.config import check_request
from hipbatch.errors import TemplateError, UsageError
from hipbatch.extract import ExtractSettings
from hipbatch.files import DEFAULT_MAX_FILE_BYTES, read_regular
from hipbatch.files import SkipFile as SkipFile  # re-exported: the callers catch render.SkipFile
from hipbatch.sandbox import BUDGET, MAX_TEMPLATE_BYTES, Sandbox, error_message
from hipbatch.text import shown

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when run from one (tests use it)
DEFAULT_TEMPLATE_DIR = Path("templates/default")  # --template-dir's default: the built-in `default` template
MAX_SOURCE_BYTES = DEFAULT_MAX_FILE_BYTES  # the old name

#: The provider-neutral request parameter for structured output, {"name": str, "schema": dict}; every adapter
#: maps it in to_line (OpenAI response_format, Anthropic output_config, Gemini responseJsonSchema).
JSON_SCHEMA_PARAM = "json_schema"
#: Keys of a template's `[output]` table.
OUTPUT_KEYS = ("format", "field", "name", "schema_file")
OUTPUT_FORMATS = ("text", "json")
DEFAULT_JSON_FIELD = "english_prompt"
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name


@dataclass
class Template:
    """A template directory: system and user prompts plus request and extractor settings."""

    path: Path
    system: jinja2.Template
    user: jinja2.Template
    params: dict[str, Any]  # model, max_tokens, temperature, json_schema (template defaults)
    provider_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # [request.<provider>]
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    static_system: str | None = None  # the system prompt, rendered once when it uses no per-file variable
    warnings: list[str] = field(default_factory=list)  # unknown keys in template.toml, shown by the caller
    user_plan: Plan | None = None  # user.j2 as a format string, when it is only text and plain substitutions
    plan_checked: bool = False  # the plan gave Jinja's text for the first file rendered

    def render(self, code: str, file_name: str) -> tuple[str, str]:
        """Render (system, user) for one source file."""
        variables = {"code": code, "file_name": file_name, "language": "HIP"}
        size = len(code) + len(file_name)  # the sandbox's limits grow with the input
        system = self.static_system if self.static_system is not None else _render(self.system, variables, size)
        plan = self.user_plan
        if plan is None:
            return system, _render(self.user, variables, size)
        user = plan.text.format(*[transform(variables[name]) for name, transform in plan.fields])
        if not self.plan_checked:
            # The first file is rendered by Jinja too: a plan that differs is dropped for the whole run.
            self.plan_checked = True
            if user != _render(self.user, variables, size):
                self.user_plan = None
                return system, _render(self.user, variables, size)
        return system, user

    def defaults_for(self, provider: str) -> dict[str, Any]:
        return {**self.params, **self.provider_params.get(provider, {})}


def resolve_template_dir(path: Path | None) -> Path:
    """The given folder; None, or templates/default where there is no such folder, is the built-in default."""
    from hipbatch.defaults import builtin_template_dir

    if path is None:
        return builtin_template_dir("default")
    if path.is_dir():
        return path
    if path == DEFAULT_TEMPLATE_DIR:
        return builtin_template_dir("default")
    what = "not a folder" if path.exists() else "no such folder"
    raise UsageError(f"--template-dir {shown(str(path))}: {what} (`hipbatch templates` lists the built-in ones)")


def load_template(path: Path | None = None) -> Template:
    """Load and compile a template folder (None: the built-in default); errors name the file and line."""
    path = resolve_template_dir(path)
    BUDGET.start(0)  # compiling may fold constants through the checked filters: never against a spent budget
    env = Sandbox(path)
    templates = {}
    for name in ("system.j2", "user.j2"):
        if not (path / name).is_file():
            raise TemplateError(f"{path / name}: missing (a template folder holds system.j2 and user.j2)")
        try:
            templates[name] = env.get_template(name)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(shown(f"{path / name}:{e.lineno}: template syntax error: {e.message}")) from None
        except jinja2.TemplateError as e:
            raise TemplateError(shown(f"{path / name}: {e.message}")) from None
    toml_path = path / "template.toml"
    settings: dict[str, Any] = {}
    if os.path.lexists(toml_path):  # a FIFO or a link out of the folder is an error, not "no settings"
        try:
            data = read_regular(toml_path, root=path, max_bytes=MAX_TEMPLATE_BYTES, root_label="the template folder")
            settings = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, SkipFile) as e:
            raise TemplateError(f"{toml_path}: {e}") from None
    try:
        request, provider_params, warnings = check_request(settings.get("request", {}), str(toml_path))
    except UsageError as e:
        raise TemplateError(str(e)) from None
    json_schema, json_field = output_settings(settings.get("output", {}), path, toml_path)
    if json_schema is not None:
        request[JSON_SCHEMA_PARAM] = json_schema  # a request parameter, hence part of every custom_id
    extract_table = dict(settings.get("extract", {}))
    if json_field is not None:
        if extract_table.setdefault("json_field", json_field) != json_field:
            raise TemplateError(
                f"{toml_path}: [extract] json_field = {extract_table['json_field']!r} differs from "
                f"[output] field = {json_field!r} (set only [output] field)"
            )
    try:
        extract = ExtractSettings.from_mapping(extract_table)
    except ValueError as e:
        raise TemplateError(f"{toml_path}: [extract] {e}") from None
    return Template(
        path,
        templates["system.j2"],
        templates["user.j2"],
        request,
        provider_params,
        extract,
        _static_render(env, templates["system.j2"]),
        warnings,
        _plan(env, templates["user.j2"]),
    )


def default_json_schema(field: str) -> dict[str, Any]:
    """The schema asked for when a template names no schema_file: one required string property."""
    return {
        "type": "object",
        "properties": {field: {"type": "string"}},
        "required": [field],
        "additionalProperties": False,
    }


def output_settings(table: Any, path: Path, toml_path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The `[output]` table -> (the json_schema request parameter, the JSON property holding the prompt).

    (None, None) for plain text output. Errors are TemplateErrors naming template.toml or the schema file.
    """
    if not isinstance(table, dict):
        raise TemplateError(f"{toml_path}: [output] must be a table")
    unknown = sorted(set(table) - set(OUTPUT_KEYS))
    if unknown:
        raise TemplateError(f"{toml_path}: unknown key(s) {unknown} in [output] (known: {', '.join(OUTPUT_KEYS)})")
    fmt = table.get("format", "text")
    if fmt not in OUTPUT_FORMATS:
        raise TemplateError(f"{toml_path}: [output] format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if fmt == "text":
        if set(table) - {"format"}:
            raise TemplateError(f'{toml_path}: [output] field, name and schema_file need format = "json"')
        return None, None
    field = table.get("field", DEFAULT_JSON_FIELD)
    if not isinstance(field, str) or not field.strip():
        raise TemplateError(f"{toml_path}: [output] field must be a non-empty property name, got {field!r}")
    name = table.get("name", field if _SCHEMA_NAME.fullmatch(field) else "prompt")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise TemplateError(f"{toml_path}: [output] name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
    schema_file = table.get("schema_file")
    if schema_file is None:
        return {"name": name, "schema": default_json_schema(field)}, field
    if not isinstance(schema_file, str) or not schema_file:
        raise TemplateError(f"{toml_path}: [output] schema_file must be a file name, got {schema_file!r}")
    return {"name": name, "schema": _load_schema(path / schema_file, field)}, field


def _load_schema(schema_path: Path, field: str) -> dict[str, Any]:
    """A JSON Schema file that asks for an object with `field` as a required string property."""
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TemplateError(f"{schema_path}: cannot read the schema file ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TemplateError(f"{schema_path}: not valid JSON ({e})") from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise TemplateError(f'{schema_path}: the schema must describe an object ("type": "object")')
    properties = schema.get("properties")
    prop = properties.get(field) if isinstance(properties, dict) else None
    if not isinstance(prop, dict) or prop.get("type") != "string":
        raise TemplateError(f"{schema_path}: the schema must declare {field!r} as a string property")
    required = schema.get("required")
    if not isinstance(required, list) or field not in required:
        raise TemplateError(f'{schema_path}: {field!r} must be listed in "required"')
    return schema


@dataclass(frozen=True)
class Plan:
    """A template that is only text and substitutions: `text.format(*fields' values)` is its output."""

    text: str
    fields: tuple[tuple[str, Callable[[str], str]], ...]  # (variable, transform) per {} of text


VARIABLES = frozenset({"code", "file_name", "language"})
_FILTERS: dict[str, Callable[[str], str]] = {"lower": str.lower, "upper": str.upper, "trim": str.strip}
_METHODS: dict[str, Callable[[str], str]] = {
    "rstrip": str.rstrip,
    "lstrip": str.lstrip,
    "strip": str.strip,
    "lower": str.lower,
    "upper": str.upper,
}


def _plan(env: jinja2.Environment, template: jinja2.Template) -> Plan | None:
    """The template as a Plan if it is only text and `{{ v }}`, `{{ v | lower }}` (upper, trim) or
    `{{ v.rstrip() }}` (lstrip, strip, lower, upper) of the three variables; else None (Jinja renders it).
    The default user.j2 then takes 3 us a file instead of 7-10."""
    import jinja2.nodes

    assert env.loader is not None and template.name is not None
    text: list[str] = []
    fields: list[tuple[str, Callable[[str], str]]] = []
    for output in env.parse(env.loader.get_source(env, template.name)[0]).body:
        if not isinstance(output, jinja2.nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, jinja2.nodes.TemplateData):
                text.append(node.data.replace("{", "{{").replace("}", "}}"))
                continue
            field = _substitution(node)
            if field is None:
                return None
            text.append("{}")
            fields.append(field)
    return Plan("".join(text), tuple(fields))


def _substitution(node: jinja2.nodes.Node) -> tuple[str, Callable[[str], str]] | None:
    """(variable, transform) for `v`, `v | filter` or `v.method()` with no arguments, else None."""
    from jinja2.nodes import Call, Filter, Getattr, Name

    if isinstance(node, Name):
        return (node.name, str) if node.name in VARIABLES else None
    if isinstance(node, Filter | Call) and (node.args or node.kwargs or node.dyn_args or node.dyn_kwargs):
        return None
    if isinstance(node, Filter) and isinstance(node.node, Name) and node.name in _FILTERS:
        return (node.node.name, _FILTERS[node.name]) if node.node.name in VARIABLES else None
    if isinstance(node, Call) and isinstance(node.node, Getattr) and isinstance(node.node.node, Name):
        name, method = node.node.node.name, node.node.attr
        return (name, _METHODS[method]) if name in VARIABLES and method in _METHODS else None
    return None


def _static_render(env: jinja2.Environment, template: jinja2.Template) -> str | None:
    """The template's text if it depends on no per-file variable (so it is rendered once, not per file)."""
    import jinja2.meta
    import jinja2.nodes

    assert env.loader is not None and template.name is not None
    ast = env.parse(env.loader.get_source(env, template.name)[0])
    if jinja2.meta.find_undeclared_variables(ast) - {"language"}:
        return None
    if any(
        ast.find(kind)
        for kind in (jinja2.nodes.Include, jinja2.nodes.Extends, jinja2.nodes.Import, jinja2.nodes.FromImport)
    ):
        return None  # an included file may use the code
    return _render(template, {"language": "HIP"}, 0)


def _render(template: jinja2.Template, variables: dict[str, Any], input_chars: int) -> str:
    # What Template.render does, with one dict instead of two copies per call (half its cost per file);
    # template.globals is a ChainMap, flattened once per template rather than once per file. The sandbox's
    # budget is reset per render; an error names the innermost template file and line.
    BUDGET.start(input_chars)
    try:
        flat = template.__dict__.get("_hipbatch_globals")
        if flat is None:
            flat = template.__dict__["_hipbatch_globals"] = dict(template.globals)
        context = template.new_context({**flat, **variables}, shared=True)
        return template.environment.concat(template.root_render_func(context))
    except Exception as e:  # anything a template does wrong is the template's error, never a traceback
        raise TemplateError(error_message(e, template.filename or "template")) from None
    finally:
        BUDGET.finish()


# ---- discovery ------------------------------------------------------------------------------------


def discover(input_dir: Path, pattern: str = "**/*.hip", *, follow_symlinks: bool = False) -> list[str]:
    """Relative posix names of the files under input_dir matching the glob, sorted."""
    return list(iter_discover(input_dir, pattern, follow_symlinks=follow_symlinks))


def iter_discover(input_dir: Path, pattern: str = "**/*.hip", *, follow_symlinks: bool = False) -> Iterator[str]:
    """The same names as discover(), in the same sorted order, found lazily one folder at a time.

    Every entry that is not a folder is listed (FIFOs, devices and links too: read_source skips them with a
    reason). Linked folders are entered only with follow_symlinks, and a folder already on the way down is
    never entered again (no loops). A bad INPUT_DIR raises here, at the call; the walk starts on next().
    """
    if not input_dir.exists():
        raise UsageError(f"INPUT_DIR {shown(str(input_dir))}: no such folder")
    if not input_dir.is_dir():
        raise UsageError(f"INPUT_DIR {shown(str(input_dir))}: not a folder")
    # '**/' matches zero or more folders, as in pathlib: try the pattern with and without it.
    patterns = {pattern}
    while pattern.startswith("**/"):
        pattern = pattern[3:]
        patterns.add(pattern)
    matchers = tuple(re.compile(fnmatch.translate(p)).match for p in sorted(patterns))
    base = str(input_dir)
    return _walk_sorted(base, "", matchers, {_folder_id(base)} if follow_symlinks else None)


def _walk_sorted(
    base: str, rel: str, matchers: tuple[Callable[[str], Any], ...], above: set[tuple[int, int]] | None = None
) -> Iterator[str]:
    # A folder sorts as "name/", so visiting entries in that order yields exactly sorted(all relative
    # paths) without holding them all. Symlinked folders are entered only when `above` (the folders on the
    # way down, by device and inode) is given; unreadable ones are skipped.
    try:
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            entries = []
            for entry in it:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    entries.append((entry.name, False))
                elif above is not None or not entry.is_symlink():
                    entries.append((entry.name + "/", True))
    except OSError:
        return
    entries.sort()
    for key, is_dir in entries:
        if is_dir:
            if above is None:
                yield from _walk_sorted(base, rel + key, matchers)
                continue
            folder = _folder_id(os.path.join(base, rel + key))
            if folder not in above:  # a link back to a folder above would loop forever
                yield from _walk_sorted(base, rel + key, matchers, above | {folder})
        else:
            name = rel + key
            if any(match(name) for match in matchers):
                yield name


def _folder_id(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (-1, -1)
    return (info.st_dev, info.st_ino)


def read_source(
    path: Path | str,
    *,
    root: Path | str | None = None,
    follow_symlinks: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> str:
    """Read one source file as UTF-8 text, or raise SkipFile with the reason.

    Only regular files are read: FIFOs, sockets and devices are skipped from their lstat, never opened; a
    symlink whose target is outside root is skipped unless follow_symlinks; a file over max_bytes is skipped
    and never read past max_bytes + 1.
    """
    data = read_regular(path, root=root, follow_symlinks=follow_symlinks, max_bytes=max_bytes)
    if not data or data.isspace():
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
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return "hb-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:48]


def estimate_tokens(text: str) -> int:
    """A fast local estimate of tokens: about 3.6 characters per token for code and English."""
    return max(1, int(len(text) / 3.6))
