"""The templates and example kernels shipped inside the package, found from any folder and any kind of install.

They live in hipbatch/data/ (in a checkout, links to the top-level templates/ and examples/, the one copy
that is edited; the wheel holds real files).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from hipbatch.config import example_config
from hipbatch.errors import UsageError


def _data(*parts: str) -> Path:
    root = resources.files("hipbatch").joinpath("data", *parts)
    if not isinstance(root, Path):  # a zipped install: Jinja2 and the demo need real folders
        raise UsageError("the built-in templates and examples are not on the file system (zipped install?)")
    return root


def builtin_templates() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in template: each folder with a template.toml."""
    found = []
    for folder in sorted(_data("templates").iterdir()):
        toml_path = folder / "template.toml"
        if toml_path.is_file():
            found.append((folder.name, _description(toml_path)))
    return found


def _description(toml_path: Path) -> str:
    """The `description` key of a template.toml, else its first comment line, else ''."""
    text = toml_path.read_text(encoding="utf-8")
    try:
        description = tomllib.loads(text).get("description")
    except tomllib.TOMLDecodeError:
        description = None
    if isinstance(description, str) and description.strip():
        return description.strip().splitlines()[0]
    comment = next((line for line in text.splitlines() if line.startswith("#")), "")
    return comment.lstrip("#").strip()


def builtin_template_dir(name: str) -> Path:
    """The folder of the built-in template called name, or UsageError listing the built-in ones."""
    names = [n for n, _ in builtin_templates()]
    if name not in names:
        raise UsageError(f"--template {name}: no built-in template of that name (built-in: {', '.join(names)})")
    return _data("templates", name)


def examples_dir() -> Path:
    """The folder of example HIP kernels that `hipbatch demo` runs on."""
    return _data("examples", "hip")


def init_template(dest: Path, name: str = "default") -> list[Path]:
    """Copy built-in template name into dest, with a commented hipbatch.toml; the files written.

    Refuses (UsageError naming the file) to overwrite anything, and then writes nothing.
    """
    source = builtin_template_dir(name)
    plan = [(dest / p.relative_to(source), p.read_bytes()) for p in sorted(source.rglob("*")) if p.is_file()]
    plan.append((dest / "hipbatch.toml", example_config().encode("utf-8")))
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a folder")
    for target, _ in plan:
        if target.exists() or target.is_symlink():
            raise UsageError(f"{target}: already exists; `hipbatch init` never overwrites a file (pick another DIR)")
    written = []
    try:
        for target, data in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("xb") as fh:  # exclusive: a file that appeared meanwhile is not overwritten either
                fh.write(data)
            written.append(target)
    except OSError as e:
        raise UsageError(f"{e.filename or dest}: cannot write: {e.strerror}") from None
    return written
