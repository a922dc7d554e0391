"""A user template that is only text and plain substitutions renders through a format string (the Plan),
giving Jinja's text to the character; anything else is left to Jinja, and a plan that would differ is dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from hipbatch.render import Plan, _render, load_template

CODES = [
    "__global__ void k(float* x) { x[threadIdx.x] *= 2; }\n\n  \t",
    "// {} {0} {{ }} }} {{ %s %(x)s\r\nint main() { return 0; }\r\n",
    'é 日本語 \u2028 \x00\x1f </prompt> \\ "q"',
    "x",
]


def template_dir(tmp_path: Path, user: str) -> Path:
    path = tmp_path / f"tpl-{abs(hash(user))}"
    path.mkdir()
    (path / "system.j2").write_text("You turn {{ language }} code into prompts.")
    (path / "user.j2").write_text(user)
    return path


@pytest.mark.parametrize(
    "user",
    [
        (Path(__file__).resolve().parent.parent / "templates" / "default" / "user.j2").read_text(),
        "{{ code }}",
        "{{ file_name | upper }}: {{ code | trim }} ({{ language | lower }})\n",
        "{# a comment #}{ json: {x} } {{ code.strip() }} {{ file_name.lower() }}}",
        "File {{file_name}}\n\n{{ code.lstrip() }}{{ code.upper() }}\n\n",
    ],
)
def test_simple_templates_render_through_a_plan_as_jinja_does(tmp_path: Path, user: str) -> None:
    template = load_template(template_dir(tmp_path, user))
    assert template.user_plan is not None
    for code in CODES:
        for name in ("a.hip", "dir/{b}.hip"):
            expected = _render(template.user, {"code": code, "file_name": name, "language": "HIP"}, len(code))
            assert template.render(code, name)[1] == expected
    assert template.user_plan is not None and template.plan_checked  # checked on the first file, kept


@pytest.mark.parametrize(
    "user",
    [
        "{% if code %}{{ code }}{% endif %}",
        "{{ code[:10] }}",
        "{{ code.replace('a', 'b') }}",
        "{{ code | truncate(5) }}",
        "{{ code ~ file_name }}",
        "{{ '{{' }}{{ code }}",
        "{% for line in code.splitlines() %}{{ line }}{% endfor %}",
        "{{ code | e }}",
    ],
)
def test_other_templates_are_left_to_jinja(tmp_path: Path, user: str) -> None:
    template = load_template(template_dir(tmp_path, user))
    assert template.user_plan is None
    expected = _render(template.user, {"code": CODES[0], "file_name": "a.hip", "language": "HIP"}, len(CODES[0]))
    assert template.render(CODES[0], "a.hip")[1] == expected


def test_an_unknown_variable_still_fails_with_file_and_line(tmp_path: Path) -> None:
    from hipbatch.errors import TemplateError

    template = load_template(template_dir(tmp_path, "line one\n{{ missing }}"))
    assert template.user_plan is None
    with pytest.raises(TemplateError, match=r"user.j2:2: 'missing' is undefined"):
        template.render("code", "a.hip")


def test_a_plan_that_differs_from_jinja_is_dropped(tmp_path: Path) -> None:
    template = load_template(template_dir(tmp_path, "<{{ code }}>"))
    template.user_plan = Plan("[{}]", (("code", str),))  # wrong on purpose
    assert template.render("x", "a.hip")[1] == "<x>"
    assert template.user_plan is None
    assert template.render("y", "b.hip")[1] == "<y>"
