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
    static_system: str | None = None  # the system prompt, rendered once when it uses no per-file variable
    user_plan: Plan | None = None  # user.j2 as a format string, when it is only text and plain substitutions
    plan_checked: bool = False  # the plan gave Jinja's text for the first file rendered

    def render(self, code: str, file_name: str) -> tuple[str, str]:
        """Render (system, user) for one source file."""
        variables = {"code": code, "file_name": file_name, "language": "HIP"}
        system = self.static_system if self.static_system is not None else _render(self.system, variables)
        plan = self.user_plan
        if plan is None:
            return system, _render(self.user, variables)
        user = plan.text.format(*[transform(variables[name]) for name, transform in plan.fields])
        if not self.plan_checked:
            # The first file is rendered by Jinja too: a plan that differs is dropped for the whole run.
            self.plan_checked = True
            if user != _render(self.user, variables):
                self.user_plan = None
                return system, _render(self.user, variables)
        return system, user

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
    return Template(
        path,
        templates["system.j2"],
        templates["user.j2"],
        request,
        provider_params,
        extract,
        _static_render(env, templates["system.j2"]),
        _plan(env, templates["user.j2"]),
    )


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
    return _render(template, {"language": "HIP"})


def _render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    try:
        # What Template.render does, with one dict instead of two copies per call (half its cost per file);
        # template.globals is a ChainMap, flattened once per template rather than once per file.
        flat = template.__dict__.get("_hipbatch_globals")
        if flat is None:
            flat = template.__dict__["_hipbatch_globals"] = dict(template.globals)
        context = template.new_context({**flat, **variables}, shared=True)
        return template.environment.concat(template.root_render_func(context))
    except Exception:
        pass  # render again the usual way, so the error points at the template's own line
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
    return list(iter_discover(input_dir, pattern))


def iter_discover(input_dir: Path, pattern: str = "**/*.hip") -> Iterator[str]:
    """The same names as discover(), in the same sorted order, found lazily one folder at a time.

    A bad INPUT_DIR raises here, at the call; the walk itself starts on the first next().
    """
    if not input_dir.exists():
        raise UsageError(f"INPUT_DIR {input_dir}: no such folder")
    if not input_dir.is_dir():
        raise UsageError(f"INPUT_DIR {input_dir}: not a folder")
    # '**/' matches zero or more folders, as in pathlib: try the pattern with and without it.
    patterns = {pattern}
    while pattern.startswith("**/"):
        pattern = pattern[3:]
        patterns.add(pattern)
    matchers = tuple(re.compile(fnmatch.translate(p)).match for p in sorted(patterns))
    return _walk_sorted(str(input_dir), "", matchers)


def _walk_sorted(base: str, rel: str, matchers: tuple[Callable[[str], Any], ...]) -> Iterator[str]:
    # A folder sorts as "name/", so visiting entries in that order yields exactly sorted(all relative
    # paths) without holding them all. Symlinked folders are not entered (as os.walk); unreadable ones
    # are skipped.
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
                elif not entry.is_symlink():
                    entries.append((entry.name + "/", True))
    except OSError:
        return
    entries.sort()
    for key, is_dir in entries:
        if is_dir:
            yield from _walk_sorted(base, rel + key, matchers)
        else:
            name = rel + key
            if any(match(name) for match in matchers):
                yield name


class SkipFile(Exception):
    """A source file that cannot be used; the message is the reason recorded."""


def read_source(path: Path | str) -> str:
    """Read one source file as UTF-8 text, or raise SkipFile with the reason."""
    try:
        with open(path, "rb") as fh:  # one open, then fstat: no second path walk
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_SOURCE_BYTES:
                raise SkipFile(f"too large ({size} bytes > {MAX_SOURCE_BYTES})")
            data = fh.read()
    except OSError as e:
        raise SkipFile(f"unreadable: {e.strerror}") from None
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
