"""Packaged defaults: the built-in templates and the demo's examples ship in the package, found from anywhere.

The last test installs this checkout for real (not editable) into a fresh virtual environment and runs the
installed command from an empty folder, as a new user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from hipbatch.config import load_config
from hipbatch.defaults import builtin_template_dir, builtin_templates, examples_dir, init_template
from hipbatch.errors import UsageError
from hipbatch.render import REPO_ROOT, load_template
from tests.conftest import cli, env_without_keys, make_hip_dir

TEMPLATE_FILES = {"system.j2", "user.j2", "template.toml"}


def test_builtin_templates_are_every_packaged_folder_with_a_template_toml() -> None:
    found = dict(builtin_templates())
    packaged = {p.parent.name for p in (REPO_ROOT / "templates").glob("*/template.toml")}
    assert set(found) == packaged and "default" in found
    assert found["default"].startswith("Reverse-engineer the English task prompt")
    assert {p.name for p in builtin_template_dir("default").iterdir()} >= TEMPLATE_FILES
    with pytest.raises(UsageError, match="--template nope: no built-in template of that name"):
        builtin_template_dir("nope")
    with pytest.raises(UsageError, match="no built-in template"):
        builtin_template_dir("../default")


def test_one_copy_in_the_repo_linked_into_the_package() -> None:
    # templates/ and examples/ at the top are the sources; the package holds links to them, not copies.
    for name in ("templates", "examples"):
        link = REPO_ROOT / "hipbatch" / "data" / name
        assert link.is_symlink() and link.resolve() == (REPO_ROOT / name).resolve()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data = pyproject["tool"]["setuptools"]["package-data"]["hipbatch"]
    assert {"data/templates/**/*", "data/examples/**/*"} <= set(data)


def test_defaults_found_from_any_folder(hip_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    assert len(list(examples_dir().rglob("*.hip"))) >= 10
    assert load_template(None).path == builtin_template_dir("default")
    out = cli("submit", hip_dir, "--dry-run", "--json")  # no --template-dir, no templates/ here
    assert json.loads(out.stdout)["prepare"]["requests"] == 6


def test_templates_command_lists_the_builtin_ones() -> None:
    lines = cli("templates").stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [name for name, _ in builtin_templates()] and "default" in names


def test_init_writes_a_template_that_submit_accepts(hip_dir: Path, tmp_path: Path) -> None:
    out = cli("init", "tpl")
    written = {p.name for p in (tmp_path / "tpl").iterdir()}
    assert written == TEMPLATE_FILES | {"hipbatch.toml"}
    assert "--template-dir tpl" in out.stderr
    for name in TEMPLATE_FILES:  # an exact copy
        assert (tmp_path / "tpl" / name).read_bytes() == (builtin_template_dir("default") / name).read_bytes()
    assert load_config(tmp_path / "tpl" / "hipbatch.toml").warnings == []
    copied = json.loads(cli("submit", hip_dir, "--dry-run", "--json", "--template-dir", "tpl").stdout)
    builtin = json.loads(cli("submit", hip_dir, "--dry-run", "--json").stdout)
    assert copied["prepare"]["requests"] == builtin["prepare"]["requests"] == 6
    assert copied["estimate"] == builtin["estimate"]


def test_init_refuses_to_overwrite_and_then_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "hipbatch.toml").write_text("# my settings\n")
    out = cli("init", dest, code=None)
    assert out.exit_code == 2 and f"{dest / 'hipbatch.toml'}: already exists" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["hipbatch.toml"]  # nothing else written
    assert (dest / "hipbatch.toml").read_text() == "# my settings\n"
    out = cli("init", "other", "--template", "nope", code=None)
    assert out.exit_code == 2 and "--template nope" in out.stderr and not (tmp_path / "other").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        init_template(tmp_path / "afile", "default")


def _copy_checkout(dest: Path) -> None:
    """The files a clean clone has (git's list when there is one), links kept as links."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(
            b"\0"
        )
    except (OSError, subprocess.CalledProcessError):
        ignore = shutil.ignore_patterns(".venv", "venv", "state", "data", "build", "dist", "*.egg-info", "__pycache__")
        shutil.copytree(REPO_ROOT, dest, symlinks=True, ignore=ignore)
        return
    for name in filter(None, (n.decode() for n in names)):
        source, target = REPO_ROOT / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


@pytest.mark.slow
def test_real_install_works_from_an_empty_folder(tmp_path: Path) -> None:
    src, venv, home = tmp_path / "src", tmp_path / "venv", tmp_path / "empty"
    _copy_checkout(src)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # The dependencies come from this test environment, listed after the new venv's own site-packages; its
    # editable hipbatch is not seen (a .pth inside a listed folder is not processed).
    Path(site, "hipbatch-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(src)],
        check=True,
        capture_output=True,
    )
    home.mkdir()
    env = {k: v for k, v in env_without_keys().items() if k != "PYTHONPATH"}
    env["HIPBATCH_STATE_DIR"] = str(home / "state")
    exe = str(venv / "bin" / "hipbatch")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([exe, *args], cwd=home, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
        return done

    where = subprocess.run(
        [py, "-c", "import hipbatch; print(hipbatch.__file__)"], cwd=home, env=env, capture_output=True, text=True
    )
    assert where.stdout.strip().startswith(site), where  # the installed copy, not the checkout
    run("demo")
    assert len(json.loads((home / "data" / "demo-openai.json").read_text(encoding="utf-8"))) >= 10
    kernels = make_hip_dir(tmp_path / "kernels", 4)
    dry = json.loads(run("submit", str(kernels), "--dry-run", "--json").stdout)
    assert dry["prepare"]["requests"] == 4
    run("init", "tpl")
    copied = json.loads(run("submit", str(kernels), "--dry-run", "--json", "--template-dir", "tpl").stdout)
    assert copied["prepare"]["requests"] == 4 and copied["estimate"] == dry["estimate"]
    assert "default" in run("templates").stdout.split()
