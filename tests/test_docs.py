"""The documentation cannot drift from the code: the generated references match what the code
generates, and every ``fedlora``, ``fedlora-edge`` and ``make`` command in the README and the
guides parses (options, their types and choices) with the CLI's own parsers, without running."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from fedlora import reference
from fedlora.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_checked_in_references_are_what_the_code_generates():
    for name, text in reference.generate().items():
        path = ROOT / "docs" / "reference" / name
        assert path.read_text() == text, (
            f"{path} is out of date: run `.venv/bin/python -m fedlora.reference`"
        )


def shell_commands(text: str) -> list[str]:
    """Every command line of the page's ```bash blocks (continuation lines joined, comments
    dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _words(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words


def fedlora_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in shell_commands(page.read_text()):
            words = _words(line)
            if words and Path(words[0]).name in {"fedlora", "fedlora-edge", "make"}:
                found.append((f"{page.name}: {line}", words))
    return found


COMMANDS = fedlora_commands()


def test_the_docs_show_commands_of_every_kind():
    kinds = {Path(words[0]).name for _, words in COMMANDS}
    assert kinds == {"fedlora", "fedlora-edge", "make"}, kinds
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_command_in_the_docs_parses(where: str, words: list[str]):
    program, args = Path(words[0]).name, words[1:]
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        unknown = [a for a in args if "=" not in a and a not in targets]
        assert not unknown, f"{where}: no make target {unknown}"
        return
    if program == "fedlora-edge":
        from fedlora.edge_cli import _parser

        _parser().parse_args(args)  # argparse exits (SystemExit) on a wrong option or value
        return
    command: click.Command = typer.main.get_command(cli)
    context = command.make_context("fedlora", list(args), resilient_parsing=False)
    while isinstance(command, click.Group) and context.protected_args:
        name, *rest = [*context.protected_args, *context.args]
        sub = command.get_command(context, name)
        assert sub is not None, f"{where}: no command {name!r}"
        command, context = sub, sub.make_context(name, rest, parent=context)
