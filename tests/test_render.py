"""Templates run in a budgeted sandbox: no code execution, no reads outside the template folder, no hang."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hipbatch.errors import TemplateError
from hipbatch.render import load_template
from hipbatch.sandbox import MAX_STEPS
from tests.conftest import cli

CODE = "__global__ void k(float* x) { x[0] = 1; }\n"


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A template that hangs fails the test after 60 s instead of hanging the suite."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("the render did not stop by itself")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def make_template(root: Path, user: str, system: str = "You are helpful.", **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "system.j2").write_text(system, encoding="utf-8")
    (root / "user.j2").write_text(user, encoding="utf-8")
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def submit_dry(hip_dir: Path, template: Path) -> tuple[int, str]:
    out = cli("submit", hip_dir, "--dry-run", "--model", "m", "--template-dir", template, code=None)
    return out.exit_code, out.stderr


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE = [
    ("globals", "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "not allowed in a template"),
    ("joiner", "{{ joiner.__init__.__globals__ }}", "not allowed in a template"),
    ("self", "{{ self._TemplateReference__context }}", "not allowed in a template"),
    ("mro", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "not allowed in a template"),
    ("format-attr", "{{ '{0.__class__}'.format(1) }}", "not allowed in a template"),
    ("mutate", "{% set l = [] %}{{ l.append(1) }}", "not allowed in a template"),
    ("translate", "{{ 'ab'.translate({97: 'x' * 1000}) }}", "not allowed in a template"),
    ("lipsum", "{{ lipsum(100000000) }}", "'lipsum' is undefined"),
    ("range", "{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ("nested-loops", LOOP, f"more than {MAX_STEPS:,} steps"),
    ("recursive-loop", "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}", "recursion too deep"),
    ("macro-recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
    (
        "macro-fanout",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "steps",
    ),
    ("self-include", "{% include 'user.j2' %}", "recursion too deep"),
    ("str-times", "{{ 'x' * 10**9 }}", "would build 1,000,000,000 characters"),
    ("list-times", "{{ [code] * 100000 }}", "the * operator would build"),
    ("power", "{{ 10 ** 100000000 }}", "more than 4096 bits"),
    (
        "squaring",
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
        "bits",
    ),
    (
        "concat-doubling",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "the ~ operator would build",
    ),
    (
        "plus-doubling",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "the + operator would build",
    ),
    (
        "list-dag",
        "{% set ns = namespace(l=[1]) %}{% for i in range(80) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
        "a list or dict would build",
    ),
    ("center-filter", "{{ 'x' | center(10**9) }}", "the center filter would build"),
    ("indent-filter", "{{ code | indent(10**8) }}", "the indent filter would build"),
    ("wordwrap-filter", "{{ code | wordwrap(1, wrapstring='-' * 100000) }}", "the wordwrap filter would build"),
    ("format-filter", "{{ '%999999999s' | format('x') }}", "the format filter would build"),
    ("replace-filter", "{{ code | replace('', 'y' * 100000) }}", "the replace filter would build"),
    ("slice-filter", "{{ [1] | slice(10**9) }}", "more than 100,000 parts"),
    ("batch-filter", "{{ [1] | batch(10**9, 'x') }}", "more than 100,000 parts"),
    ("sum-filter", "{{ [[1]] | sum(start=[]) }}", "start must be a number"),
    ("ljust", "{{ 'x'.ljust(10**9) }}", "str.ljust() would build"),
    ("zfill", "{{ '1'.zfill(10**9) }}", "str.zfill() would build"),
    ("expandtabs", "{{ 'a\tb'.expandtabs(10**9) }}", "str.expandtabs() would build"),
    ("str-replace", "{{ code.replace('', 'y' * 100000) }}", "str.replace() would build"),
    ("str-join", "{{ ('y' * 1000000).join(code) }}", "str.join() would build"),
    ("str-format", "{{ '{:>999999999}'.format(1) }}", "str.format() would build"),
    ("printf", "{{ '%999999999s' % 'x' }}", "the % operator would build"),
    ("printf-star", "{{ '%*s' % (999999999, 'x') }}", "the % operator would build"),
    ("lazy-join", "{{ range(100000) | map('center', 1000000) | join }}", "characters built in one render"),
    (
        "scan-in-loop",
        "{% for j in range(100) %}{% for i in range(10000) %}{% if 'zz' in code %}{% endif %}{% endfor %}{% endfor %}",
        "steps",
    ),
    ("include-up", "{% include '../../../../../../etc/passwd' %}", "not found in the template folder"),
    ("include-absolute", "{% include '/etc/passwd' %}", "not found in the template folder"),
    ("divide", "line one\n{{ 1 / 0 }}", "user.j2:2: ZeroDivisionError"),
]


@pytest.mark.parametrize(("name", "text", "expected"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_template_is_one_error_line(hip_dir: Path, tmp_path: Path, name: str, text: str, expected: str) -> None:
    template = make_template(tmp_path / "tpl", text)
    start = time.perf_counter()
    code, stderr = submit_dry(hip_dir, template)
    elapsed = time.perf_counter() - start
    assert code == 2, stderr
    assert expected in stderr and "user.j2:" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("Error: "), stderr
    assert "Traceback" not in stderr
    assert elapsed < 20, f"{name} took {elapsed:.1f}s"
    assert not (Path("state") / "dry-run").exists() or not any((Path("state") / "dry-run").rglob("*.jsonl"))


@pytest.mark.parametrize(
    "expression",
    [
        "cycler.__init__.__globals__.os.popen('touch {marker}').read()",
        "joiner.__init__.__globals__.os.system('touch {marker}')",
        "namespace.__init__.__globals__.os.popen('touch {marker}')",
        "self.__init__.__globals__.__builtins__.__import__('os').system('touch {marker}')",
        "range.__self__.__import__('os').system('touch {marker}')",
        "''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__",
        "lipsum.__globals__.os.popen('touch {marker}')",
        "dict.mro()[1].__subclasses__()",
        "({'a': 1}.items()|list)[0].__class__.__init__.__globals__",
        "(code|attr('__class__')).__init__.__globals__",
        "'{0.__init__.__globals__}'.format(cycler)",
    ],
)
def test_dry_run_with_a_hostile_template_runs_no_command(hip_dir: Path, tmp_path: Path, expression: str) -> None:
    marker = tmp_path / "PWNED"
    template = make_template(tmp_path / "tpl", "{{ " + expression.replace("{marker}", str(marker)) + " }}")
    code, stderr = submit_dry(hip_dir, template)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert not marker.exists()


def test_error_in_an_included_file_names_that_file_and_line(hip_dir: Path, tmp_path: Path) -> None:
    template = make_template(tmp_path / "tpl", "{% include 'part.j2' %}", **{"part.j2": "ok\nok\n{{ 'x' * 10**9 }}\n"})
    code, stderr = submit_dry(hip_dir, template)
    assert code == 2 and "part.j2:3: over the template's budget" in stderr, stderr


def test_include_may_not_follow_a_link_out_of_the_template_folder(hip_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    template = make_template(tmp_path / "tpl", "{% include 'evil.j2' %}")
    (template / "evil.j2").symlink_to(secret)
    code, stderr = submit_dry(hip_dir, template)
    assert code == 2 and "outside the template folder" in stderr, stderr
    assert "TOP-SECRET-VALUE" not in stderr
    assert not any(b"TOP-SECRET" in p.read_bytes() for p in Path("state").rglob("*.jsonl"))


def test_include_of_a_fifo_is_refused_without_blocking(hip_dir: Path, tmp_path: Path) -> None:
    template = make_template(tmp_path / "tpl", "{% include 'pipe.j2' %}")
    os.mkfifo(template / "pipe.j2")  # opening it for reading would block until a writer comes
    code, stderr = submit_dry(hip_dir, template)
    assert code == 2 and "not a regular file (a FIFO" in stderr, stderr


def test_user_j2_linked_outside_the_folder_is_refused(hip_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.j2").write_text("{{ code }}")
    template = make_template(tmp_path / "tpl", "")
    (template / "user.j2").unlink()
    (template / "user.j2").symlink_to(tmp_path / "elsewhere.j2")
    code, stderr = submit_dry(hip_dir, template)
    assert code == 2 and "user.j2" in stderr and "outside the template folder" in stderr, stderr


def test_legitimate_template_features_still_work(tmp_path: Path) -> None:
    macros = "{% macro head(name) %}== {{ name | upper }} =={% endmacro %}"
    user = (
        "{% import 'macros.j2' as m %}{{ m.head(file_name) }}\n"
        "{% set ns = namespace(n=0) %}{% for line in code.splitlines() if line.strip() %}"
        "{% set ns.n = ns.n + 1 %}{{ loop.index }}:{{ line | length }} {% endfor %}\n"
        "{{ ns.n }} lines; {{ '%s-%d' | format('a', 2) }}; {{ '{:>4}|{}'.format('x', [1, 2]) }}; "
        "{{ (code ~ '!') [-2:] }}; {{ code.count('x') }}; {{ {'b': 1, 'a': 2} | dictsort | first }}; "
        "{% include 'part.j2' %}"
    )
    template = load_template(make_template(tmp_path / "tpl", user, **{"macros.j2": macros, "part.j2": "[part]"}))
    code = "int a;\n\nint bb;\nx x\n"
    _, text = template.render(code, "k.hip")
    expected = "== K.HIP ==\n1:6 2:7 3:3 \n3 lines; a-2;    x|[1, 2]; \n!; 2; ('a', 2); [part]"
    assert text == expected


def test_big_legitimate_kernel_renders_with_the_default_template() -> None:
    template = load_template(None)
    code = "// " + "x" * 1_900_000 + "\n__global__ void k() {}\n"  # just under the 2 MB file cap
    _, user = template.render(code, "big.hip")
    assert code.rstrip() in user and user.startswith("Write the English task prompt")


def test_budget_is_per_render_not_per_run(tmp_path: Path) -> None:
    # Each render may use most of the budget; many renders in a row must all succeed.
    loop = "{% for i in range(200) %}{% for j in range(1000) %}{% endfor %}{% endfor %}{{ file_name }}"
    template = load_template(make_template(tmp_path / "tpl", loop))
    for i in range(3):
        assert template.render(CODE, f"k{i}.hip")[1] == f"k{i}.hip"
    with pytest.raises(TemplateError, match="steps"):
        load_template(make_template(tmp_path / "tpl2", LOOP)).render(CODE, "k.hip")
    assert template.render(CODE, "after.hip")[1] == "after.hip"  # a spent budget does not leak into the next


def test_template_toml_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    template = make_template(tmp_path / "tpl", "{{ code }}")
    os.mkfifo(template / "template.toml")
    with pytest.raises(TemplateError, match="template.toml: not a regular file"):
        load_template(template)


def test_rendered_lines_of_the_default_template_are_unchanged(hip_dir: Path) -> None:
    # The sandbox must not change a single byte of what the default template sends.
    cli("submit", hip_dir, "--dry-run")
    [shard] = list((Path("state") / "dry-run").rglob("*.jsonl"))
    lines = [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines()]
    source = (hip_dir / "k0001.hip").read_text(encoding="utf-8")
    body = next(line["body"] for line in lines if "kernel_1(" in line["body"]["messages"][1]["content"])
    expected_user = (
        f"Write the English task prompt for this HIP file.\n\nFile: k0001.hip\n\n````hip\n{source.rstrip()}\n````"
        "\n\nAnswer only with the prompt inside <prompt>...</prompt>."
    )
    assert body["messages"][1]["content"] == expected_user
    assert body["messages"][0]["content"].startswith("You are an expert GPU programmer who knows HIP")


LEGIT = [
    "{% for l in code.splitlines() %}{{ loop.index }}/{{ loop.length }}/{{ loop.revindex }} {% endfor %}",
    "{% for k, v in {'b': 2, 'a': 1} | dictsort %}{{ k }}={{ v }};{% endfor %}",
    "{% for x in [] %}never{% else %}empty{% endfor %}",
    "{% for x in [[1, [2]], [3]] recursive %}<{{ loop.depth }}"
    "{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}>{% endfor %}",
    "{% macro box(t) %}[{{ caller() }}|{{ t }}]{% endmacro %}{% call box('x') %}inner {{ file_name }}{% endcall %}",
    "{% filter upper %}shout {{ file_name }}{% endfilter %}",
    "{% set block %}a{{ 1 + 2 }}b{% endset %}{{ block ~ '!' ~ 3 }}",
    "{{ 'yes' if code else 'no' }} {{ 3 is divisibleby(3) }} {{ nope is defined }} {{ 1 < 2 < 3 }}",
    "{{ code | truncate(12) }}|{{ code | wordcount }}|{{ {'a': [1, 2]} | tojson }}|{{ code | length }}",
    "{% for i in range(4) %}{{ loop.cycle('a', 'b') }}{% endfor %} {{ 'a' in ['a', 'b'] }} {{ {'a': 1}['a'] }}",
    "{% with n = 2 %}{{ n ** 10 }} {{ 7 // n }} {{ 7 % n }} {{ '%05.1f' % 3.14159 }}"
    "{{ '{:>6}'.format('r') }}{% endwith %}",
    "{{ (code * 2)[:5] }} {{ [1, 2] + [3] }} {{ (1, 2) * 2 }} {{ 'ab' | center(6) }}|{{ 'x\ny' | indent(2, true) }}",
    "{{ code.replace('x', 'yy') | replace('y', 'z') }} {{ '-'.join(['a', 'b']) }} {{ ['p', 'q'] | join(',') }}",
    "{{ range(5) | batch(2, 0) | list }} {{ range(5) | slice(2) | list }} {{ [1, 2] | sum(start=10) }}",
]


@pytest.mark.parametrize("text", LEGIT)
def test_legitimate_templates_render_as_plain_jinja_does(tmp_path: Path, text: str) -> None:
    import jinja2

    code = "x = 1\nint main() { return x; }\n"
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text)
    expected = plain.render(code=code, file_name="k.hip", language="HIP")
    assert load_template(make_template(tmp_path / "tpl", text)).render(code, "k.hip")[1] == expected


def test_extends_and_blocks_render_as_plain_jinja_does(tmp_path: Path) -> None:
    import jinja2

    files = {"base.j2": "<{% block body %}base {{ file_name }}{% endblock %}>"}
    user = "{% extends 'base.j2' %}{% block body %}{{ super() }} + child{% endblock %}"
    folder = make_template(tmp_path / "tpl", user, **files)
    plain = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), undefined=jinja2.StrictUndefined)
    expected = plain.get_template("user.j2").render(code=CODE, file_name="k.hip", language="HIP")
    assert load_template(folder).render(CODE, "k.hip")[1] == expected == "<base k.hip + child>"
