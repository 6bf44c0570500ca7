"""MkDocs hook: the CLI and REST reference pages are made from the code at build time, never written twice.

``<!-- generated: cli -->`` becomes the ``--help`` of every ``stillroom`` command, walked from the one argparse
parser (``stillroom.services.cli.build_parser``, whose options come from the jobs' option definitions);
``<!-- generated: rest -->`` becomes the endpoints of the service's OpenAPI document (``create_app().openapi()``).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

MARKERS = {"<!-- generated: cli -->": "cli", "<!-- generated: rest -->": "rest"}
HELP_COLUMNS = "100"  # argparse wraps to $COLUMNS: fixed, so the page is the same on every machine


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, kind in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, cli_reference() if kind == "cli" else rest_reference())
    return markdown


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command line, parser)`` of the parser and every subcommand under it, depth first, in their order."""
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subcommands(sub, f"{prefix} {name}")
    return found


@cache
def cli_reference() -> str:
    from stillroom.services.cli import build_parser

    os.environ["COLUMNS"] = HELP_COLUMNS
    parts = []
    for line, parser in subcommands(build_parser(), "stillroom"):
        level = "#" * min(2 + line.count(" "), 4)
        parts.append(f"{level} `{line}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


@cache
def openapi_document() -> dict[str, Any]:
    from stillroom.services.app import create_app
    from stillroom.services.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(state_dir=root / "state", store_root=str(root / "stores"), data_root=str(root),
                            api_token="docs-build")
        return create_app(settings, None).openapi()  # type: ignore[arg-type]  # no job is run: no Ray needed


def type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in schema:
        return " or ".join(type_of(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {type_of(schema.get('items', {}))}"
    return str(schema.get("type", "any"))


def one_line(text: Any) -> str:
    """A cell of code spans (types, defaults): on one line; a pipe inside backticks stays literal."""
    return " ".join(str(text).split())


def cell(text: Any) -> str:
    """Text for a table cell: one line, its pipes, angle brackets and stars taken literally."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return text.replace("|", "\\|").replace("*", "\\*")


def fields_table(schema: dict[str, Any], components: dict[str, Any]) -> str:
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    props = schema.get("properties", {})
    if not props:
        return ""
    required = set(schema.get("required", []))
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, prop in props.items():
        default = "required" if name in required else f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        description = cell(prop.get("description", ""))
        rows.append(f"| `{name}` | {one_line(type_of(prop))} | {one_line(default)} | {description} |")
    return "\n".join(rows) + "\n"


@cache
def rest_reference() -> str:
    doc = openapi_document()
    components = doc.get("components", {}).get("schemas", {})
    parts = [f"OpenAPI {doc['openapi']}, `{doc['info']['title']}` {doc['info']['version']}: "
             f"{doc['info'].get('description', '')}\n"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            parts.append(f"## `{method.upper()} {path}`\n")
            if op.get("summary"):
                parts.append(f"**{op['summary']}.** {op.get('description', '')}\n")
            params = op.get("parameters", [])
            if params:
                rows = ["| parameter | in | type | description |", "| --- | --- | --- | --- |"]
                rows += [f"| `{p['name']}` | {p['in']} | {one_line(type_of(p.get('schema', {})))} | "
                         f"{cell(p.get('description', ''))} |" for p in params]
                parts.append("\n".join(rows) + "\n")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(f"Request body {type_of(body)}:\n\n{fields_table(body, components)}")
            answers = [f"`{code}` {r.get('description', '')}" for code, r in op.get("responses", {}).items()]
            parts.append("Responses: " + "; ".join(answers) + ".\n")
    return "\n".join(parts)
