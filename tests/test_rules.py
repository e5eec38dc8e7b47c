"""Rules of the tree that a machine checks: the import contract and the function-length limit.

How it works: every ``.py`` file under the checked packages is parsed with :mod:`ast` (nothing
is imported, so a module with side effects or a missing optional dependency cannot hide a
rule break). :func:`imports_in` collects every import a module can perform: ``import x``,
``from x import y``, relative imports resolved against the file's own package, imports nested
in functions, classes, ``try`` blocks or ``if TYPE_CHECKING:``, and ``importlib.import_module``
/ ``__import__`` calls whose module name is a literal (or an f-string with a literal prefix).
:func:`import_violations` compares the top-level package of each import with the packages of
this project and the layer's allowed set. :func:`long_functions` measures every ``def`` and
``async def`` (methods and nested functions included) from its ``def`` line to the last line
of its body, decorators excluded.

The layers (docs/architecture.md): ``gossip`` is the sans-IO core and imports nothing of
ours; ``overlay`` builds on gossip only; ``edgeagent`` is the daemon and may import gossip,
overlay and the firmware profiles, but never the testbed (which the wheel does not ship) or
the tests. The unit tests at the bottom run the checkers on synthetic trees so that each rule
is shown to fail when broken.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which of our own top-level packages each layer may import (itself included).
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "gossip": frozenset({"gossip"}),
    "overlay": frozenset({"overlay", "gossip"}),
    "edgeagent": frozenset({"edgeagent", "gossip", "overlay", "firmware_profiles"}),
}

# Longest function allowed in the checked packages, def line through last body line (issue 7).
MAX_FUNCTION_LINES = 80

CHECKED_PACKAGES = tuple(ALLOWED_IMPORTS)

# Calls that import a module named by their first argument.
DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True, slots=True)
class Import:
    """One import a module can perform: where it is written, as written, and its absolute name.

    ``module`` is empty when a relative import climbs above its top-level package.
    """

    path: Path
    line: int
    written: str
    module: str


@dataclass(frozen=True, slots=True)
class LongFunction:
    """A function over the length limit."""

    path: Path
    line: int
    name: str
    lines: int


def our_packages(root: Path) -> frozenset[str]:
    """The project's own top-level packages: the directories under ``root`` with an __init__.py."""
    return frozenset(p.parent.name for p in root.glob("*/__init__.py"))


def python_files(root: Path, package: str) -> list[Path]:
    """Every ``.py`` file of ``package`` under ``root``, sorted so messages are stable."""
    return sorted((root / package).rglob("*.py"))


def module_package(root: Path, path: Path) -> list[str]:
    """The dotted package a file's relative imports start from, as a list of names."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    # A module's package is its directory; an __init__.py *is* its package.
    return parts[:-1]


def _resolve_relative(package: list[str], level: int, module: str | None) -> str:
    """``from ..x import y`` inside ``package`` -> absolute name; '' if it climbs above the root."""
    if level - 1 > len(package) - 1:
        return ""
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _literal_prefix(node: ast.expr) -> str | None:
    """The literal start of a string argument: the whole constant, or an f-string's prefix."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _dynamic_import(node: ast.Call) -> str | None:
    """The module name a literal ``importlib.import_module(...)`` / ``__import__(...)`` names."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in DYNAMIC_IMPORTERS or not node.args:
        return None
    return _literal_prefix(node.args[0])


def imports_in(root: Path, path: Path) -> Iterator[Import]:
    """Every import ``path`` can perform, with relative names made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_package(root, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name, alias.name)
        elif isinstance(node, ast.ImportFrom):
            written = "." * node.level + (node.module or "")
            module = _resolve_relative(package, node.level, node.module) if node.level else written
            yield Import(path, node.lineno, written, module)
        elif isinstance(node, ast.Call):
            name = _dynamic_import(node)
            # A relative import_module(".x", package) stays inside its own package.
            if name and not name.startswith("."):
                yield Import(path, node.lineno, name, name)


def import_violations(root: Path, package: str, allowed: frozenset[str]) -> list[str]:
    """One message per import in ``package`` of one of our packages outside ``allowed``."""
    ours = our_packages(root)
    found = []
    for path in python_files(root, package):
        for imp in imports_in(root, path):
            top = imp.module.split(".")[0]
            if top == "":
                reason = "relative import climbs above the top-level package"
            elif top in ours and top not in allowed:
                reason = f"{package} may import only {', '.join(sorted(allowed))} of ours"
            else:
                continue
            rel = path.relative_to(root)
            found.append(f"{rel}:{imp.line}: imports {imp.written!r} ({reason})")
    return found


class _FunctionLengths(ast.NodeVisitor):
    """Collects (qualified name, def line, length) for every def, tracking the enclosing names."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.found: list[tuple[str, int, int]] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        end = node.end_lineno if node.end_lineno is not None else node.lineno
        self.scope.append(node.name)
        self.found.append((".".join(self.scope), node.lineno, end - node.lineno + 1))
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, def line, lines) for every function in ``path``."""
    visitor = _FunctionLengths()
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return visitor.found


def long_functions(root: Path, package: str, limit: int) -> list[LongFunction]:
    """Every function in ``package`` longer than ``limit`` lines."""
    return [
        LongFunction(path, line, name, lines)
        for path in python_files(root, package)
        for name, line, lines in function_lengths(path)
        if lines > limit
    ]


# -- the rules, on the real tree -------------------------------------------------------------


@pytest.mark.parametrize("package", CHECKED_PACKAGES)
def test_package_imports_only_its_allowed_layers(package: str) -> None:
    assert python_files(ROOT, package), f"no Python files found under {package}/"
    violations = import_violations(ROOT, package, ALLOWED_IMPORTS[package])
    assert not violations, "import contract broken:\n" + "\n".join(violations)


@pytest.mark.parametrize("package", CHECKED_PACKAGES)
def test_no_function_longer_than_the_limit(package: str) -> None:
    offenders = long_functions(ROOT, package, MAX_FUNCTION_LINES)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(
        f"{f.path.relative_to(ROOT)}:{f.line}: {f.name} is {f.lines} lines" for f in offenders
    )


# -- the checkers can fail: synthetic trees ---------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


PACKAGES = {
    "gossip/__init__.py": "",
    "gossip/core.py": "import os\nfrom .config import X\n",
    "gossip/config.py": "X = 1\n",
    "overlay/__init__.py": "",
    "edgeagent/__init__.py": "",
    "testbed/__init__.py": "",
}


def _gossip_violations(tmp_path: Path, extra: str) -> list[str]:
    root = _tree(tmp_path, {**PACKAGES, "gossip/extra.py": extra})
    return import_violations(root, "gossip", ALLOWED_IMPORTS["gossip"])


def test_import_checker_accepts_stdlib_third_party_and_own_relative_imports(
    tmp_path: Path,
) -> None:
    extra = "import msgpack\nfrom . import config\nfrom .config import X\nimport gossip.core\n"
    assert _gossip_violations(tmp_path, extra) == []


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import edgeagent.config\n", "edgeagent.config"),
        ("from overlay import ipam\n", "overlay"),
        ("def f():\n    from testbed.sim import Simulator\n", "testbed.sim"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import overlay.dns\n",
            "overlay.dns",
        ),
        ("try:\n    import edgeagent\nexcept ImportError:\n    pass\n", "edgeagent"),
        ("class C:\n    def m(self):\n        import testbed\n", "testbed"),
        ("import importlib\nimportlib.import_module('edgeagent.cli')\n", "edgeagent.cli"),
        ("import importlib\nname = 'x'\nimportlib.import_module(f'testbed.{name}')\n", "testbed."),
        ("__import__('overlay')\n", "overlay"),
    ],
)
def test_import_checker_names_file_line_and_forbidden_import(
    tmp_path: Path, source: str, module: str
) -> None:
    violations = _gossip_violations(tmp_path, source)
    assert len(violations) == 1
    line = next(i for i, text in enumerate(source.splitlines(), 1) if module.rstrip(".") in text)
    assert violations[0].startswith(f"gossip/extra.py:{line}: imports {module!r}")


def test_import_checker_resolves_relative_imports_that_leave_the_package(tmp_path: Path) -> None:
    files = {
        "overlay/sub/__init__.py": "",
        "overlay/sub/m.py": "from ...edgeagent import config\n",
        "overlay/sub/n.py": "from ..hlc import Clock\nfrom ... import gossip\n",
    }
    root = _tree(tmp_path, {**PACKAGES, **files})
    violations = import_violations(root, "overlay", ALLOWED_IMPORTS["overlay"])
    # ``from ...edgeagent`` from overlay/sub climbs above the root package; Python refuses it.
    assert violations == [
        "overlay/sub/m.py:1: imports '...edgeagent' "
        "(relative import climbs above the top-level package)",
        "overlay/sub/n.py:2: imports '...' (relative import climbs above the top-level package)",
    ]


def test_overlay_may_import_gossip_but_not_edgeagent(tmp_path: Path) -> None:
    root = _tree(
        tmp_path, {**PACKAGES, "overlay/a.py": "import gossip.core\nimport edgeagent.agent\n"}
    )
    assert import_violations(root, "overlay", ALLOWED_IMPORTS["overlay"]) == [
        "overlay/a.py:2: imports 'edgeagent.agent' (overlay may import only gossip, overlay of ours)"
    ]


def test_edgeagent_may_import_gossip_and_overlay_but_never_testbed(tmp_path: Path) -> None:
    source = "import gossip\nimport overlay.ipam\ndef demo():\n    from testbed import loopback\n"
    root = _tree(tmp_path, {**PACKAGES, "edgeagent/commands/demo.py": source})
    violations = import_violations(root, "edgeagent", ALLOWED_IMPORTS["edgeagent"])
    assert [v.split(" (")[0] for v in violations] == [
        "edgeagent/commands/demo.py:4: imports 'testbed'"
    ]


def test_function_length_counts_def_line_through_last_body_line(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    source = (
        "import functools\n"
        "@functools.cache\n"  # decorators do not count
        f"def fits():\n{body}"
        f"async def too_long():\n{body}    return None\n"
        "class C:\n"
        f"    def method(self):\n{textwrap.indent(body, '    ')}        pass\n"
        "def outer():\n"
        f"    def inner():\n{textwrap.indent(body, '    ')}        pass\n"
    )
    root = _tree(tmp_path, {"gossip/__init__.py": "", "gossip/m.py": source})
    found = {f.name: f.lines for f in long_functions(root, "gossip", MAX_FUNCTION_LINES)}
    assert found == {
        "too_long": MAX_FUNCTION_LINES + 1,
        "C.method": MAX_FUNCTION_LINES + 1,
        "outer": MAX_FUNCTION_LINES + 2,
        "outer.inner": MAX_FUNCTION_LINES + 1,
    }
    lengths = {name: lines for name, _, lines in function_lengths(root / "gossip/m.py")}
    assert lengths["fits"] == MAX_FUNCTION_LINES
