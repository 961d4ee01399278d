#!/usr/bin/env python3
"""Print the chart's values table (Markdown) from the comments in values.yaml.

    python helm/tools/values_table.py helm/outrider/values.yaml

A key documented with a ``# -- description`` comment block right above it (continued by further
``#`` lines) becomes one row: dotted key, type, default and description. The chart README embeds
the output between the markers ``<!-- values-table:start -->`` and ``<!-- values-table:end -->``;
``--write README.md`` replaces what lies between them, and tests/test_helm.py checks that the
README is current.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.\-]+|\"[^\"]+\"):(\s|$)")


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) of every key with a ``# --`` comment, in file order."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    out = []
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key = len(m.group(1)), m.group(2).strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        block, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        starts = [n for n, c in enumerate(block) if c.startswith("# --")]
        if not starts:
            continue
        desc = [block[starts[-1]].removeprefix("# --").strip()]
        desc += [c.removeprefix("#").strip() for c in block[starts[-1] + 1:]]
        out.append((".".join(k for _, k in stack), " ".join(d for d in desc if d)))
    return out


def lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def type_name(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(values_path: Path) -> str:
    text = values_path.read_text()
    values = yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for key, desc in documented_keys(text):
        value = lookup(values, key)
        default = json.dumps(value, separators=(", ", ": "))
        rows.append(f"| `{key}` | {type_name(value)} | `{cell(default)}` | {cell(desc)} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("values", type=Path, help="the chart's values.yaml")
    parser.add_argument("--write", type=Path, metavar="README", help="replace the table between the markers")
    args = parser.parse_args(argv)
    out = table(args.values)
    if args.write is None:
        sys.stdout.write(out)
        return 0
    readme = args.write.read_text()
    if START not in readme or END not in readme:
        print(f"{args.write}: markers {START} / {END} not found", file=sys.stderr)
        return 1
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    args.write.write_text(f"{head}{START}\n{out}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
