"""The documentation against the code: what ``mkdocs build --strict`` (``make docs``) cannot see.

The build fails on broken links between pages, missing anchors and pages left out of the
navigation. These tests check the rest, fast and without building the site:

- every ``make`` target named in the README or ``docs/*.md`` exists in the Makefile;
- every ``mitoseg`` command line in their code (blocks and inline spans) names a command
  of the Typer app, with options that command has;
- the README's links to files of the repository resolve, and its two commands are the ones
  CI runs (``make test``, ``make run``);
- the generated pages (``dev/docs_hooks.py``) cover every command and every API route.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from dev import docs_hooks
from mitoseg.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [ROOT / "README.md", *PAGES]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
MAKE = re.compile(r"(?:^|[\s(;&|])make\s+([^;&|)`#\n]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def makefile_targets() -> set[str]:
    """Explicit targets of the Makefile (``name:`` at the start of a line)."""
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w./-]+)\s*:(?!=)", text, re.MULTILINE))


def code_of(text: str) -> tuple[list[str], list[str]]:
    """The shell lines of fenced blocks (continuations joined) and the inline code spans.

    Returns:
        ``(shell_lines, spans)``; other blocks (python, yaml, json) are left out, and
        inline spans are taken from the text outside every fenced block.
    """
    lines: list[str] = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL_LANGS:
            lines.extend(body.replace("\\\n", " ").splitlines())
    prose = FENCE.sub("", text)
    return lines, INLINE.findall(prose)


def make_calls(text: str) -> list[str]:
    """Target names of every ``make`` call in the code of a page (options and VAR=x left out)."""
    lines, spans = code_of(text)
    names: list[str] = []
    for code in [*lines, *spans]:
        for args in MAKE.findall(code):
            words = args.split()
            names.extend(w for w in words if not w.startswith("-") and "=" not in w)
    return names


def mitoseg_calls(text: str) -> list[list[str]]:
    """The argument lists of every ``mitoseg`` command line in the code of a page."""
    lines, spans = code_of(text)
    calls: list[list[str]] = []
    for code in [*lines, *spans]:
        code = code.strip().removeprefix("$ ")
        try:
            words = shlex.split(code, comments=True)
        except ValueError:  # an unbalanced quote inside a longer snippet: not a command
            continue
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words and words[0].rsplit("/", 1)[-1] == "mitoseg":
            calls.append(words[1:])
    return calls


def check_call(root: Any, args: list[str]) -> list[str]:
    """Problems of one ``mitoseg ARGS`` line against the command tree (empty: it is valid).

    ``root`` is ``typer.main.get_command(app)``: groups have ``commands``, every command
    ``params`` with ``opts`` / ``secondary_opts`` (``--tta`` / ``--no-tta``).
    """
    path = ["mitoseg"]
    cmd: Any = root
    options = {o for p in root.params for o in (*p.opts, *p.secondary_opts)}
    problems: list[str] = []
    for word in args:
        if word in {"|", "&&", ";", ">", "2>&1"}:
            break
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            if name != "--help" and name not in options:
                problems.append(f"{' '.join(path)}: no option {name}")
            continue
        if hasattr(cmd, "commands") and not word.startswith("-"):
            if PLACEHOLDER.match(word) or word == "...":
                break  # `mitoseg COMMAND --help`: a placeholder, nothing more to check
            sub = cmd.commands.get(word)
            if sub is None:
                problems.append(f"{' '.join(path)}: no command {word!r}")
                break
            cmd, path = sub, [*path, word]
            options |= {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}
    return problems


@pytest.fixture(scope="module")
def cli() -> Any:
    """The app's command tree (Typer 0.29 builds it on its own copy of click)."""
    group = typer.main.get_command(app)
    assert hasattr(group, "commands"), type(group)
    return group


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_make_targets_named_in_the_docs_exist(page: Path) -> None:
    targets = makefile_targets()
    missing = sorted(set(make_calls(page.read_text())) - targets)
    assert not missing, f"{_rel(page)} names make targets the Makefile lacks: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_mitoseg_commands_named_in_the_docs_exist(page: Path, cli: Any) -> None:
    calls = mitoseg_calls(page.read_text())
    problems = [f"`mitoseg {' '.join(c)}`: {p}" for c in calls for p in check_call(cli, c)]
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_the_docs_name_commands_at_all(cli: Any) -> None:
    """The parsers above find what they check (else the two tests above prove nothing)."""
    text = "\n".join(p.read_text() for p in DOCS)
    named = {c[0] for c in mitoseg_calls(text) if c and not c[0].startswith("-")}
    assert set(cli.commands) <= named, sorted(set(cli.commands) - named)
    assert {"run", "test", "docs", "setup", "help"} <= set(make_calls(text))


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["predict", "--modle", "m"], "mitoseg predict: no option --modle"),
        (["predcit", "x.tif"], "mitoseg: no command 'predcit'"),
        (["data", "fetch", "--source", "s", "--outt", "d"], "mitoseg data fetch: no option --outt"),
        (["export", "onnx"], "mitoseg export: no command 'onnx'"),
    ],
)
def test_check_call_reports_a_wrong_command_or_option(
    cli: Any, args: list[str], problem: str
) -> None:
    assert check_call(cli, args) == [problem]


def test_check_call_accepts_root_options_placeholders_and_flag_pairs(cli: Any) -> None:
    for args in (
        ["--no-progress", "predict", "--model", "m", "--out", "o", "x.tif", "--no-tta"],
        ["COMMAND", "--help"],
        ["serve", "--port", "3000"],
    ):
        assert check_call(cli, args) == [], args


def test_readme_links_resolve_and_keeps_the_commands_ci_runs() -> None:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to no page"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    block = FENCE.search(text.split("\n## Two commands\n", 1)[1])
    assert block is not None, "README: no code block under '## Two commands'"
    assert [line.split()[:2] for line in block.group(2).splitlines()] == [
        ["make", "run"],
        ["make", "test"],
    ]


def test_readme_links_every_page_in_the_site_navigation() -> None:
    text = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", text))
    nav = set(re.findall(r":\s*([\w.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    generated = {docs_hooks.CLI_PAGE, docs_hooks.OPENAPI_PAGE, "index.md"}
    assert nav - generated <= linked, sorted(nav - generated - linked)


def test_generated_cli_page_has_every_command(cli: Any) -> None:
    page = docs_hooks.cli_markdown()

    def paths(group: Any, prefix: str) -> list[str]:
        out = []
        for name, sub in group.commands.items():
            out.append(f"{prefix} {name}")
            if hasattr(sub, "commands"):
                out.extend(paths(sub, f"{prefix} {name}"))
        return out

    headings = set(re.findall(r"^#+ `(mitoseg[^`]*)`$", page, re.MULTILINE))
    assert set(paths(cli, "mitoseg")) <= headings
    assert page.startswith("# Command-line reference\n")


def test_generated_api_page_has_every_service_route() -> None:
    spec = docs_hooks.openapi_spec()
    page = docs_hooks.openapi_markdown(spec)
    for path, methods in spec["paths"].items():
        for method in methods:
            assert f"`{method.upper()} {path}`" in page, (method, path)
    for route in ("/segment", "/segment_stack", "/stats", "/segment_volume/submit"):
        assert f"## `POST {route}`" in page, route


def test_make_calls_reads_blocks_and_spans_without_options_or_variables() -> None:
    text = 'Run `make lint`, then:\n\n```bash\nmake docs PYTEST_ARGS="-x"\nmake -s stack-env\n```\n'
    assert make_calls(text) == ["docs", "stack-env", "lint"]
