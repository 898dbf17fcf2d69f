"""MkDocs hooks (``mkdocs.yml`` ``hooks:``): pages generated from the code at build time.

- ``cli.md``: the command-line reference, Typer's own Markdown (``typer mitoseg.cli utils
  docs``, run as a subprocess of this Python), so it is never written by hand.
- ``openapi.md`` and ``openapi.json``: the BentoML service's OpenAPI spec, taken from the
  service object (``MitoSeg.openapi_spec``, what ``/docs.json`` serves) without starting a
  server, rendered as a Markdown reference plus the JSON file itself.

Both run in ``on_files``, before the navigation is built, so the nav names them like any
other page. A failure stops the build (``mkdocs build --strict`` in ``make docs``).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import warnings
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

CLI_PAGE = "cli.md"
OPENAPI_PAGE = "openapi.md"
OPENAPI_JSON = "openapi.json"
#: BentoML's generic infrastructure routes: listed in one line, not as operations.
INFRA_TAG = "Infrastructure"


def cli_markdown() -> str:
    """Typer's Markdown for the ``mitoseg`` app (``typer mitoseg.cli utils docs``).

    Returns:
        The page: a title, how it is made, then Typer's reference of every command.

    Raises:
        RuntimeError: the ``typer`` command failed (its stderr is in the message).
    """
    cmd = [sys.executable, "-m", "typer", "mitoseg.cli", "utils", "docs", "--name", "mitoseg"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({res.returncode}): {res.stderr}")
    body = res.stdout.split("\n", 1)[1]  # Typer's own '# `mitoseg`' title
    return (
        "# Command-line reference\n\n"
        "Generated from the Typer app at build time (`typer mitoseg.cli utils docs`); "
        "`mitoseg COMMAND --help` prints the same. Tasks and examples: "
        "[Getting started](getting-started.md), [Segment your own volume](your-volume.md).\n" + body
    )


def openapi_spec() -> dict[str, Any]:
    """The service's OpenAPI spec as a dict, from the BentoML service object (no server).

    Returns:
        The OpenAPI 3 document ``/docs.json`` serves.
    """
    with warnings.catch_warnings():  # BentoML's pydantic models: deprecations, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        from mitoseg.serving.service import MitoSeg

        return MitoSeg.openapi_spec.asdict()


def _schema_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_schema_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " / ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("format") == "binary":
        return "file"
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_schema_type(schema.get('items', {}))}"
    return str(kind)


def _fields(schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    props: dict[str, Any] = schema.get("properties", {})
    if not props:
        return []
    required = set(schema.get("required", []))
    rows = ["| field | type | required | default |", "|---|---|---|---|"]
    for name, prop in props.items():
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        need = "yes" if name in required else ""
        rows.append(f"| `{name}` | {_schema_type(prop)} | {need} | {default} |")
    return rows


def openapi_markdown(spec: dict[str, Any]) -> str:
    """Render an OpenAPI document as a Markdown reference: one section per operation.

    Args:
        spec: the OpenAPI 3 document (``paths``, ``components``).

    Returns:
        The page's Markdown.
    """
    components = spec.get("components", {}).get("schemas", {})
    infra: list[str] = []
    ops: list[str] = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            if INFRA_TAG in op.get("tags", []):
                infra.append(f"`{method.upper()} {path}`")
                continue
            ops.append(f"## `{method.upper()} {path}`\n")
            ops.append(inspect.cleandoc(op.get("description") or op.get("summary") or "") + "\n")
            for ctype, body in op.get("requestBody", {}).get("content", {}).items():
                ops.append(f"Request body: `{ctype}`\n")
                rows = _fields(body.get("schema", {}), components)
                ops.extend([*rows, ""] if rows else [])
            params = op.get("parameters", [])
            if params:
                ops.append("Query parameters: " + ", ".join(f"`{p['name']}`" for p in params))
                ops.append("")
            answers = []
            for code, resp in op.get("responses", {}).items():
                types = ", ".join(f"`{t}`" for t in resp.get("content", {}))
                text = f"{code} {resp.get('description', '')}"
                answers.append(f"{text} ({types})" if types else text)
            ops.append("Responses: " + "; ".join(answers) + ".\n")
    head = (
        "# HTTP API (OpenAPI)\n\n"
        "Generated at build time from the BentoML service object "
        "(`mitoseg.serving.service.MitoSeg.openapi_spec`, the document a running server "
        "serves at `/docs.json`; its Swagger page is `/docs`), without starting a server. "
        f"The spec itself: [openapi.json]({OPENAPI_JSON}). What the endpoints do, their "
        "limits, authentication and the error bodies (401, 413, 429 and the 4xx of bad "
        "uploads come from mitoseg's middleware and are not in the spec): "
        "[Serving](SERVING.md).\n\n"
        f"Infrastructure routes from BentoML: {', '.join(infra)}.\n"
    )
    return head + "\n" + "\n".join(ops)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages (``cli.md``, ``openapi.md``, ``openapi.json``) to the site."""
    spec = openapi_spec()
    for name, text in (
        (CLI_PAGE, cli_markdown()),
        (OPENAPI_PAGE, openapi_markdown(spec)),
        (OPENAPI_JSON, json.dumps(spec, indent=2) + "\n"),
    ):
        files.append(File.generated(config, name, content=text))
    return files
