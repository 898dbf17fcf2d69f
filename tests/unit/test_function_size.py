"""Size rules of ``src/mitoseg``: no function over 100 lines, no module over 700.

Both are read with the stdlib :mod:`ast` (functions: from ``def`` to their last line,
decorators excluded; nested functions and methods count on their own as well as in their
parent). A unit that grows past a limit is split into named pieces with one purpose each.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mitoseg

SRC = Path(mitoseg.__file__).parent
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 700


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function in ``source`` longer than ``limit``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1
                    if lines > limit:
                        found.append((name, lines))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def _module(path: Path) -> str:
    return path.relative_to(SRC.parent).with_suffix("").as_posix().replace("/", ".")


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n" + "    x = 1\n" * 3, [("f", 4)]),
        ("def f():\n    pass\n", []),
        ("@decorator\ndef f():\n" + "    x = 1\n" * 3, [("f", 4)]),
        ("class C:\n    async def m(self):\n" + "        x = 1\n" * 3, [("C.m", 4)]),
        (
            "def f():\n    def g():\n" + "        x = 1\n" * 3,
            [("f", 5), ("f.g", 4)],
        ),
    ],
    ids=["long", "short", "decorator_excluded", "method", "nested"],
)
def test_long_functions(source: str, expected: list[tuple[str, int]]) -> None:
    assert long_functions(source, 3) == expected


def test_no_function_over_the_limit() -> None:
    assert len(FILES) > 50
    too_long = [
        f"{_module(path)}:{name}:{lines}"
        for path in FILES
        for name, lines in long_functions(path.read_text(), MAX_FUNCTION_LINES)
    ]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(too_long)}"


def test_no_module_over_the_limit() -> None:
    sizes = {_module(path): len(path.read_text().splitlines()) for path in FILES}
    too_long = [f"{name}:{n}" for name, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {', '.join(too_long)}"
