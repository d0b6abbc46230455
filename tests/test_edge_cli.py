"""``fedlora-edge``: the chat loop and one-line errors (the install itself: test_edge_install)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.edge_cli import chat, main


class EchoModel:
    """Answers with the number of turns it was given, and records each conversation."""

    def __init__(self) -> None:
        self.seen: list[list[dict[str, str]]] = []

    def generate(self, turns, max_new_tokens):
        self.seen.append(list(turns))
        return SimpleNamespace(text=f"turns={len(turns)}")


def test_chat_keeps_the_history_and_stops_at_an_empty_line() -> None:
    model, out = EchoModel(), io.StringIO()
    n = chat(model, io.StringIO("hi\nmore\n\nignored\n"), out, system="be brief", max_new_tokens=4)
    assert n == 2 and out.getvalue() == "turns=2\nturns=4\n"
    assert [t["role"] for t in model.seen[1]] == ["system", "user", "assistant", "user"]
    assert model.seen[1][2]["content"] == "turns=2"


def test_errors_are_one_line_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlora-edge: error: ") and "model.onnx" in err[0]
    assert main(["generate", "--model", str(tmp_path), "--max-new-tokens", "0", "hi"]) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err
