"""The template sandbox: Jinja2 templates that can neither run code, read outside their folder, nor hang.

On top of Jinja2's ImmutableSandboxedEnvironment (no private or dunder attributes, no methods that modify a
list or dict, `range` capped at 100,000) every render gets a budget, kept per thread and reset by `start()`:
- steps: each loop iteration, call, filter, test, operator, include, container item walked and 512
  characters of text touched costs one; a render stops after MAX_STEPS;
- size: no one value (string, list, dict) may hold more than `value_limit` characters (1 Mi plus 4 times the
  inputs), and all the values one render builds or prints stay under TOTAL_FACTOR times that.
Operations that multiply their input (`*`, `**`, `+`, `%`, `~`, str.center/ljust/rjust/zfill/expandtabs/
replace/join, format specs, the center/indent/wordwrap/format/replace/join/slice/batch filters) are checked
before they allocate. The loader reads only regular files inside the template folder, links resolved.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.loaders import split_template_path
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Cycler, Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from hipbatch.files import SkipFile, read_regular
from hipbatch.text import shown

MAX_STEPS = 1_000_000  # well under a second of template work
MACRO_STEPS = 20  # what one macro call costs, in loop iterations
MAX_INT_BITS = 4096  # a template has no use for integers of more than ~1,200 digits
MAX_COUNT = 100_000  # slice/batch counts, as jinja2.sandbox.MAX_RANGE for range()
MAX_TEMPLATE_BYTES = 1024 * 1024  # per template file
BASE_VALUE_CHARS = 1024 * 1024
TOTAL_FACTOR = 8
_CONTAINERS = (list, tuple, dict, set, frozenset)


class RenderLimit(SecurityError):
    """A template went over its per-render budget (steps, size of one value, or size in all)."""


class Budget(threading.local):
    """What one render may still spend; one per thread, reset by start() before each render."""

    def __init__(self) -> None:
        self.memo: dict[int, tuple[Any, int]] = {}  # id -> (container, weight); containers cannot change here
        self.start(0)

    def start(self, input_chars: int) -> None:
        self.steps = MAX_STEPS
        self.value_limit = BASE_VALUE_CHARS + 4 * input_chars
        self.chars = TOTAL_FACTOR * self.value_limit
        if self.memo:
            self.memo = {}

    def finish(self) -> None:
        """Drop what the render's containers held; the next start() (each render, each load) resets the rest."""
        if self.memo:
            self.memo = {}

    def step(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise RenderLimit(f"more than {MAX_STEPS:,} steps (loops, calls, filters) in one render")

    def need(self, size: int, what: str) -> None:
        """Refuse, before it is built, a value of size characters over the limit."""
        if size > self.value_limit:
            raise RenderLimit(f"{what} would build {size:,} characters (the limit is {self.value_limit:,})")

    def spend(self, size: int) -> None:
        self.chars -= size
        if self.chars < 0:
            raise RenderLimit(f"more than {TOTAL_FACTOR * self.value_limit:,} characters built in one render")

    def produced(self, value: Any, what: str) -> Any:
        """A value just built: check its size and count it against the render's total."""
        size = len(value) if value.__class__ is str else self.weight(value)  # a str first: the usual case
        if size > self.value_limit:
            self.need(size, what)
        self.chars -= size
        if self.chars < 0:
            self.spend(0)
        return value

    def weight(self, value: Any) -> int:
        """About how many characters printing value would take; each container is walked once (memoised)."""
        if isinstance(value, str | bytes):
            return len(value)
        if isinstance(value, _CONTAINERS):
            hit = self.memo.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
            self.step(1 + len(value))
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            total = 1 + sum(self.weight(item) for item in items)
            self.memo[id(value)] = (value, total)
            return total
        if isinstance(value, int):
            return 1 + value.bit_length() // 3
        if isinstance(value, Namespace):
            attrs = object.__getattribute__(value, "_Namespace__attrs")  # it can change: walked every time
            self.step(1 + len(attrs))
            return 1 + sum(self.weight(item) for item in attrs.values())
        if isinstance(value, range):
            return len(value)
        if isinstance(value, Cycler):
            return 1 + self.weight(value.items)
        return 1


BUDGET = Budget()


def cost(args: Iterable[Any]) -> int:
    """Steps for touching args: 1, plus one per 512 characters of text and per 8 items of a container."""
    n = 1
    for arg in args:
        if isinstance(arg, str | bytes):
            n += len(arg) >> 9
        elif isinstance(arg, (*_CONTAINERS, range)):
            n += len(arg) >> 3
    return n


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _printf_size(fmt: str | bytes, args: Any) -> int:
    """An upper bound on the length of `fmt % args`: widths and precisions are taken at their word."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    values = args if isinstance(args, tuple) else (args,)
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    size = len(text) + BUDGET.weight(args)
    for match in _PRINTF.finditer(text):
        for group in match.group(1, 2):
            size += star if group == "*" else int(group or 0)
    return size


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?")


def _replaced_size(s: str | bytes, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(old, type(s)) or not isinstance(new, type(s)):
        return len(s)  # the call fails on its own
    times = s.count(old) if old else len(s) + 1  # type: ignore[arg-type]  # old has s's type
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(s) + times * max(0, len(new) - len(old))


# ---- checks before an operation allocates: (args, kwargs) -> args to call with --------------------------


def _check_width(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> tuple[Any, ...]:
    BUDGET.need(max(len(s), _int(args[0] if args else kwargs.get("width", 0))), what)
    return args


def _check_join(sep: Any, args: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    items = list(args[0]) if args else []
    BUDGET.step(cost([items]))
    BUDGET.need(sum(BUDGET.weight(item) for item in items) + len(sep) * len(items), what)
    return (items, *args[1:])


_AMPLIFIERS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate", "maketrans"}
)


def _method_check(owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Checks for the str and bytes methods that can build a much longer value than their input."""
    what = f"{type(owner).__name__}.{name}()"
    if name in ("center", "ljust", "rjust", "zfill"):
        return _check_width(owner, args, kwargs, what)
    if name == "expandtabs":
        size = _int(args[0] if args else kwargs.get("tabsize", 8))
        tabs = owner.count(b"\t") if isinstance(owner, bytes) else owner.count("\t")
        BUDGET.need(len(owner) + tabs * size, what)
    elif name == "replace":
        BUDGET.need(_replaced_size(owner, *args[:3]), what)
    elif name == "join":
        return _check_join(owner, args, what)
    elif name in ("translate", "maketrans"):
        raise SecurityError(f"{what} is not allowed in a template")
    return args


def _filter_check(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Checks for the built-in filters that can build a much longer value than their input."""
    what = f"the {name} filter"
    value, rest = (args[0] if args else ""), args[1:]

    def arg(i: int, key: str, default: Any) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    text = value if isinstance(value, str) else str(value) if not isinstance(value, _CONTAINERS) else ""
    if name == "center":
        BUDGET.need(max(len(text), _int(arg(0, "width", 80))), what)
    elif name == "indent":
        width = arg(0, "width", 4)
        per_line = len(width) if isinstance(width, str) else _int(width)
        BUDGET.need(len(text) + (text.count("\n") + 1) * per_line, what)
    elif name == "wordwrap":
        BUDGET.need(len(text) * (1 + len(str(arg(2, "wrapstring", None) or "\n"))), what)
    elif name == "format":
        BUDGET.need(_printf_size(text, kwargs or rest), what)
    elif name == "replace":
        BUDGET.need(_replaced_size(text, str(arg(0, "old", "")), str(arg(1, "new", "")), arg(2, "count", None)), what)
    elif name == "join":
        items = list(value) if not isinstance(value, str) else value
        BUDGET.step(cost([items]))
        BUDGET.need(BUDGET.weight(items) + len(str(arg(0, "d", ""))) * len(items), what)
        return (items, *rest)
    elif name == "slice" or (name == "batch" and arg(1, "fill_with", None) is not None):
        if _int(arg(0, "slices" if name == "slice" else "linecount", 0)) > MAX_COUNT:
            raise RenderLimit(f"{what}: more than {MAX_COUNT:,} parts")
    elif name == "sum" and not isinstance(arg(1, "start", 0), int | float):
        raise SecurityError(f"{what}: start must be a number in a template")
    return args


_FILTER_CHECKS = frozenset({"center", "indent", "wordwrap", "format", "replace", "join", "slice", "batch", "sum"})


def _guarded(name: str, func: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """A filter or test that pays its steps, is checked before it runs, and whose result is counted."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # a context/environment comes first
    check = name in _FILTER_CHECKS and kind == "filter"
    what = f"the {name} {kind}"

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        BUDGET.step(cost(args[skip:]) + cost(kwargs.values()) - 1 if kwargs else cost(args[skip:]))
        if check:
            args = (*args[:skip], *_filter_check(name, args[skip:], kwargs))
        return BUDGET.produced(func(*args, **kwargs), what)

    return guarded


# ---- the helpers the rewritten syntax tree calls ---------------------------------------------------------


def _loop_items(iterable: Iterable[Any], body_chars: int) -> Iterator[Any]:
    """A for loop's iterable: one step per iteration, and the loop body's own text counted each time."""
    for item in iterable:
        BUDGET.step()
        if body_chars:
            BUDGET.spend(body_chars)
        yield item


def _concat(first: Any, *rest: Any) -> str:
    values = (first, *rest)
    BUDGET.step(len(values))
    BUDGET.need(sum(BUDGET.weight(v) for v in values), "the ~ operator")
    return BUDGET.produced("".join(map(str, values)), "the ~ operator")  # type: ignore[no-any-return]


def _literal(value: Any) -> Any:
    return BUDGET.produced(value, "a list or dict")


def _touched(value: Any) -> Any:
    BUDGET.step(1 + cost([value]))  # the comparison and this call itself
    return value


def _finalize(value: Any) -> Any:
    """Every {{ value }} printed: counted against the render's total (a string was checked when built)."""
    if value.__class__ is str:
        budget = BUDGET
        budget.chars -= len(value)
        if budget.chars < 0:
            budget.spend(0)
        return value
    BUDGET.step()
    return BUDGET.produced(value, "printing a value")


class _Rewrite(NodeTransformer):
    """Route the syntax that can loop or grow through the budget: loops, ~, comparisons, literals."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        text = sum(len(data.data) for child in node.body for data in child.find_all(nodes.TemplateData))
        iterable: nodes.Expr = node.iter  # type: ignore[assignment]
        node.iter = _call(iterable, "hipbatch.loop", nodes.Const(text, lineno=node.lineno))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _call(node.nodes[0], "hipbatch.concat", *node.nodes[1:])

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        self.generic_visit(node)  # `in` and == on long text cost time in proportion to its length
        node.expr = _call(node.expr, "hipbatch.touch")
        for operand in node.ops:
            operand.expr = _call(operand.expr, "hipbatch.touch")
        return node

    def visit_List(self, node: nodes.List) -> nodes.Node:
        self.generic_visit(node)
        return _call(node, "hipbatch.literal")

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        return _call(node, "hipbatch.literal")

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _call(node, "hipbatch.literal") if node.ctx == "load" else node


def _call(value: nodes.Expr, name: str, *args: nodes.Expr) -> nodes.Filter:
    # A filter, not a Call: compiled as a direct call, and a template cannot rebind a filter name.
    return nodes.Filter(value, name, list(args), [], None, None, lineno=value.lineno)


_INTERNAL_FILTERS: dict[str, Callable[..., Any]] = {
    "hipbatch.loop": _loop_items,
    "hipbatch.concat": _concat,
    "hipbatch.literal": _literal,
    "hipbatch.touch": _touched,
}


class _SizedFormatter(SandboxedFormatter):
    """str.format with each field's width and precision counted before it is formatted."""

    total = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        match = _SPEC.match(format_spec)
        width, precision = (int(g or 0) for g in match.groups()) if match else (0, 0)
        self.total += max(width, precision, BUDGET.weight(value))
        BUDGET.need(self.total, "str.format()")
        return super().format_field(value, format_spec)


class _SizedEscapeFormatter(_SizedFormatter, SandboxedEscapeFormatter):
    pass


class FolderLoader(jinja2.FileSystemLoader):
    """Templates from one folder: regular files inside it (links resolved), at most MAX_TEMPLATE_BYTES each."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        super().__init__(os.fspath(folder))
        self.folder = os.fspath(folder)
        self.root = os.path.realpath(self.folder)
        self.sizes: dict[str, int] = {}  # name -> characters, counted each time it is included

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        pieces = split_template_path(template)  # refuses '..'; a leading '/' only names a file in the folder
        path = os.path.join(self.folder, *pieces)
        if not os.path.lexists(path):
            raise jinja2.TemplateNotFound(template)
        real = os.path.realpath(path)
        if not real.startswith(self.root.rstrip(os.sep) + os.sep):
            raise jinja2.TemplateNotFound(
                template, f"{shown(template)}: leads to {shown(real)}, outside the template folder"
            )
        try:
            source = read_regular(real, follow_symlinks=True, max_bytes=MAX_TEMPLATE_BYTES).decode("utf-8")
        except SkipFile as e:
            raise jinja2.TemplateNotFound(template, f"{shown(template)}: {e}") from None
        except UnicodeDecodeError as e:
            raise jinja2.TemplateNotFound(template, f"{shown(template)}: not UTF-8 (byte {e.start})") from None
        self.sizes[template] = len(source)
        return source, path, lambda: True


class Sandbox(ImmutableSandboxedEnvironment):
    """The environment every hipbatch template is compiled in (one per template folder)."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        super().__init__(
            loader=FolderLoader(folder),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            autoescape=False,
            auto_reload=False,  # one run renders every file with the same template
            finalize=_finalize,
        )
        self.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs in one call
        self.filters = {name: _guarded(name, f, "filter") for name, f in self.filters.items()}
        self.filters.update(_INTERNAL_FILTERS)
        self.tests = {name: _guarded(name, f, "test") for name, f in self.tests.items()}  # type: ignore[arg-type]

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Rewrite().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree  # type: ignore[no-any-return]

    def _load_template(self, name: str, globals: MutableMapping[str, Any] | None) -> jinja2.Template:
        BUDGET.step()  # every include, import and extends comes here
        template = super()._load_template(name, globals)
        assert isinstance(self.loader, FolderLoader)
        BUDGET.spend(self.loader.sizes.get(name, 0))
        return template

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if obj.__class__ is str:  # code.rstrip and the like: what the base checks amount to for a plain str
            return not attr.startswith("_")
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        BUDGET.step()
        _check_binop(operator, left, right)
        return BUDGET.produced(self.binop_table[operator](left, right), f"the {operator} operator")

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        if isinstance(argument, slice):
            BUDGET.step(cost([obj]))
            BUDGET.produced(value, "a slice")
        return value

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        steps = cost(args) + cost(kwargs.values()) - 1 if kwargs else cost(args)
        if isinstance(owner, str | bytes):
            steps += len(owner) >> 9
            if __obj.__name__ in _AMPLIFIERS:
                args = _method_check(owner, __obj.__name__, args, kwargs)
        elif isinstance(__obj, Macro):
            steps += MACRO_STEPS  # a macro call (frame, arguments, output buffer) costs ~20 loop iterations
        BUDGET.step(steps)
        return BUDGET.produced(super().call(__context, __obj, *args, **kwargs), "a call")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None:
            return None
        owner: str = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            formatter = (
                _SizedEscapeFormatter(self, escape=owner.escape) if isinstance(owner, Markup) else _SizedFormatter(self)
            )
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(checked, value)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before they run, the operations that would build a huge string, list or integer."""
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if right * left.bit_length() > MAX_INT_BITS:
            raise RenderLimit(f"{left} ** {right} has more than {MAX_INT_BITS} bits")
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimit(f"a product of more than {MAX_INT_BITS} bits")
        elif isinstance(right, int) and not isinstance(left, int):
            BUDGET.need(BUDGET.weight(left) * max(right, 0), "the * operator")
        elif isinstance(left, int):
            BUDGET.need(BUDGET.weight(right) * max(left, 0), "the * operator")
    elif operator == "+" and not isinstance(left, int | float):
        BUDGET.need(BUDGET.weight(left) + BUDGET.weight(right), "the + operator")
    elif operator == "%" and isinstance(left, str | bytes):
        BUDGET.need(_printf_size(left, right), "the % operator")


def error_message(error: BaseException, fallback: str) -> str:
    """One line for an exception raised while rendering: the innermost template file and line, and what."""
    where, line = fallback, "?"
    tb = error.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if isinstance(template, jinja2.Template):
            where, line = (
                template.filename or template.name or fallback,
                str(template.get_corresponding_lineno(tb.tb_lineno)),
            )
        tb = tb.tb_next
    if isinstance(error, jinja2.TemplateSyntaxError):
        return shown(f"{error.filename or where}:{error.lineno}: template syntax error: {error.message}")
    if isinstance(error, RenderLimit):
        text = f"over the template's budget: {error}"
    elif isinstance(error, SecurityError):
        text = f"not allowed in a template: {error}"
    elif isinstance(error, jinja2.TemplateNotFound) and error.message == error.name:
        text = f"template {error.name!r} not found in the template folder (templates load only from there)"
    elif isinstance(error, jinja2.UndefinedError | jinja2.TemplateNotFound):
        text = str(error.message)
    elif isinstance(error, RecursionError):
        text = "recursion too deep (a macro, loop or include that calls itself without end)"
    elif isinstance(error, MemoryError):
        text = "out of memory"
    else:
        text = f"{type(error).__name__}: {error}"
    return shown(f"{where}:{line}: {text}")
