"""The house's import rules (pyproject's [tool.importlinter] contracts, README "Architecture") hold on the tree.

import-linter finds a package's modules by walking its folder, but kernels/, exporters/ and validators/ live beside
blrdeploy/ and join it only when installed; so the check runs on a copy laid out as installed.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS_OUTSIDE = ("kernels", "exporters", "validators")  # installed as blrdeploy.<name> (pyproject package-dir)


def _installed_layout(tmp: Path) -> Path:
    """``tmp/blrdeploy`` with the three outside rooms inside it, Python files only."""
    only_python = shutil.ignore_patterns("__pycache__", "*.pyc", "tables")
    shutil.copytree(REPO / "blrdeploy", tmp / "blrdeploy", ignore=only_python)
    for name in ROOMS_OUTSIDE:
        shutil.copytree(REPO / name, tmp / "blrdeploy" / name, ignore=only_python)
    return tmp


def _lint(tmp: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    env = dict(os.environ, PYTHONPATH=str(tmp))  # the copy shadows the installed package
    return subprocess.run(
        [str(lint), str(REPO / "pyproject.toml"), "--no-cache"],
        capture_output=True, text=True, cwd=tmp, env=env, timeout=300,
    )  # fmt: skip


def test_import_contracts_hold(tmp_path):
    out = _lint(_installed_layout(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_contracts_catch_an_import_pointing_up(tmp_path):
    """The check can fail: a kernel module that imports the CLI breaks the layers contract."""
    tmp = _installed_layout(tmp_path)
    planted = tmp / "blrdeploy" / "kernels" / "dtypes.py"
    planted.write_text(planted.read_text() + "\nfrom blrdeploy.cli import common  # noqa: E402\n")
    out = _lint(tmp)
    assert out.returncode != 0
    assert "blrdeploy.kernels.dtypes -> blrdeploy.cli.common" in out.stdout, out.stdout


def _in_function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each import statement inside a function in ``path``."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [
                (n.lineno, lines[n.lineno - 1]) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))
            ]
    return sorted(set(found))


def _says_why(lines: list[str], lineno: int) -> bool:
    """A ``deferred`` comment on the import, or above it on the run of imports and comments it belongs to."""
    i = lineno - 1
    while i >= 0:
        text = lines[i].strip()
        if "deferred" in text and "#" in text:
            return True
        if i < lineno - 1 and not (text.startswith(("import ", "from ", "#")) or text.endswith(",") or text == ")"):
            return False
        i -= 1
    return False


def test_imports_inside_functions_say_why():
    """Imports sit at module top; one inside a function defers a heavy dependency and says so (``# deferred:``),
    so no edge between rooms hides from the contracts' readers."""
    unexplained = []
    for room in ("blrdeploy", *ROOMS_OUTSIDE):
        for path in sorted((REPO / room).rglob("*.py")):
            lines = path.read_text().splitlines()
            unexplained += [
                f"{path.relative_to(REPO)}:{n}: {text.strip()}"
                for n, text in _in_function_imports(path)
                if not _says_why(lines, n)
            ]
    assert not unexplained, "imports inside functions without a '# deferred: why' comment:\n" + "\n".join(unexplained)


def test_the_code_cites_no_document_the_repository_lacks():
    """Comments and docstrings point at what a reader can open: the design document is not in the repository
    (#24 item 13), so nothing cites it; the structures' canonical forms live in structures/functional.py."""
    cited = [
        f"{path.relative_to(REPO)}:{n}"
        for room in ("blrdeploy", *ROOMS_OUTSIDE, "tests", "bench")
        for path in sorted((REPO / room).rglob("*.py"))
        if path.resolve() != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "DESIGN" in line
    ]
    assert not cited, "citations of a DESIGN document the repository does not have:\n" + "\n".join(cited)
