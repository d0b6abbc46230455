"""The settings and command-line references in ``docs/reference/``, generated from the code.

``python -m fedlora.reference`` rewrites them; ``tests/test_docs.py`` fails when the checked-in
files differ from what this module generates, so the references cannot drift from
:class:`fedlora.config.RunConfig` (each field's comment in ``config.py`` is its description and
:data:`fedlora.ranges.RANGES` its range), from the node's settings (:class:`NodeSettings` and
the node-only keys of the ClientApp) and from the CLI's own options (click's parameters of
every ``fedlora`` command).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "docs" / "reference"


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's description from its comments: the trailing one, continued by the
    comment lines below it, or (for a field without one) the comment lines just above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    lines = inspect.getsource(cls).splitlines()
    parsed: list[tuple[str, str, str]] = []  # (kind, field or "", text) per line
    for i, line in enumerate(lines):
        m = re.match(r"\s+(\w+): [^#]*?(?:#\s?(.*))?$", line)
        c = re.match(r"\s+#\s?(.*)$", line)
        if m and m.group(1) in names:
            text = (m.group(2) or "").strip()
            if not text and line.rstrip().endswith("("):  # a default over several lines
                inner = next((x for x in lines[i + 1 :] if "#" in x or x.strip() == ")"), "")
                text = inner.split("#", 1)[1].strip() if "#" in inner else ""
            parsed.append(("field", m.group(1), text))
        elif c:
            parsed.append(("comment", "", c.group(1).strip()))
        else:
            parsed.append(("other", "", ""))
    out: dict[str, list[str]] = {}
    last: str | None = None  # the field whose trailing comment the next comment lines continue
    block: list[str] = []
    for kind, name, text in parsed:
        if kind == "comment":
            block.append(text)
            continue
        if kind == "field":
            if block and not text:  # a comment block above a field without its own
                out[name] = [*block]
            elif block and last is not None:
                out[last] += block
            out.setdefault(name, [])
            if text:
                out[name].append(text)
            last = name if text else None
        elif block and last is not None:
            out[last] += block
        block = []
        if kind == "other":
            last = None
    return {k: " ".join(v) for k, v in out.items() if v}


def _cell(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, bool):
        text = str(value).lower()
    return "`" + text.replace("|", "\\|") + "`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _default(f: dataclasses.Field[Any], missing: Any = None) -> Any:
    """A dataclass field's default value (its factory's product), or ``missing``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return missing


def run_config_page() -> str:
    from fedlora.config import RunConfig
    from fedlora.ranges import RANGES

    comments = field_comments(RunConfig)
    rows = []
    for f in dataclasses.fields(RunConfig):
        default = _default(f)
        low_high = RANGES.get(f.name)
        span = f"{low_high[0]:g} .. {low_high[1]:g}" if low_high else ""
        key = f.name.replace("_", "-")
        rows.append(
            f"| `{key}` | {_cell(default)} | {span} | {_escape(comments.get(f.name, ''))} |"
        )
    return "\n".join(
        [
            "# Run configuration",
            "",
            "Generated from `RunConfig` (`src/fedlora/config.py`) by `python -m "
            "fedlora.reference`; do not edit. Every key goes in a run's TOML file "
            "(`--config`), in `[tool.flwr.app.config]` of `pyproject.toml`, or in "
            "`flwr run --run-config 'key=value ...'`.",
            "",
            "| key | default | range | what it does |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def node_settings_page() -> str:
    from fedlora.client.app import NODE_ONLY_KEYS
    from fedlora.client.node import NodeSettings

    comments = field_comments(NodeSettings)
    rename = {"personal_dir": "personal-state-dir", "data": "data-path"}
    rows = []
    for f in dataclasses.fields(NodeSettings):
        key = rename.get(f.name, f.name.replace("_", "-"))
        default = _default(f, "")
        node_only = "yes" if key in NODE_ONLY_KEYS else ""
        rows.append(
            f"| `{key}` | {_cell(default) if default != '' else ''} | {node_only} "
            f"| {_escape(comments.get(f.name, ''))} |"
        )
    listed = {r.split("`")[1] for r in rows}
    others = sorted(k for k in NODE_ONLY_KEYS if k not in listed)
    return "\n".join(
        [
            "# Node settings",
            "",
            "Generated from `NodeSettings` (`client/node.py`) and the ClientApp's node-only keys "
            "(`client/app.py`) by `python -m fedlora.reference`; do not edit. A node reads them "
            "from its node config (`fedlora federation node --node-config 'key=value ...'`); "
            "those marked node-only are never taken from the server's run config (a node logs "
            "and ignores a run config that sets one).",
            "",
            "| key | default | node-only | what it does |",
            "|---|---|---|---|",
            *rows,
            "",
            "Other node-only keys: " + ", ".join(f"`{k}`" for k in others) + ". Secure "
            "aggregation's node policy (`secagg-min-nodes`, `secagg-min-threshold`, "
            "`secagg-corrupt-nodes`, `secagg-roster`, `secagg-identity-key`, "
            "`secagg-allow-unauthenticated`) is read from the node config only: see "
            "[the threat model](../privacy.md).",
            "",
        ]
    )


def _commands(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    import click

    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def cli_page() -> str:
    import click
    import typer

    from fedlora.cli import cli

    root = typer.main.get_command(cli)
    assert isinstance(root, click.Group)
    parts = [
        "# Command line",
        "",
        "Generated from the `fedlora` CLI's own options by `python -m fedlora.reference`; do not "
        "edit. `fedlora COMMAND --help` prints the same.",
        "",
    ]
    for name, command in _commands(root, "fedlora"):
        parts += [f"## `{name}`", "", (command.help or "").strip().split("\n\n")[0], ""]
        rows = []
        for p in command.params:
            if isinstance(p, click.Argument):
                rows.append(f"| `{(p.name or '').upper()}` (argument) | | |")
                continue
            if not isinstance(p, click.Option) or p.hidden:
                continue
            names = ", ".join(f"`{n}`" for n in [*p.opts, *p.secondary_opts])
            default = "" if p.default in (None, "", ()) or p.is_flag else _cell(p.default)
            if p.is_flag and p.default:
                default = "`true`"
            rows.append(f"| {names} | {default} | {_escape(' '.join((p.help or '').split()))} |")
        if rows:
            parts += ["| option | default | what it does |", "|---|---|---|", *rows, ""]
    return "\n".join(parts)


PAGES = {
    "run-config.md": run_config_page,
    "node-settings.md": node_settings_page,
    "cli.md": cli_page,
}


def generate() -> dict[str, str]:
    """Every reference page's text, by file name."""
    return {name: page() for name, page in PAGES.items()}


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (FOLDER / name).write_text(text)
        print(f"wrote {FOLDER / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
