"""User training data: every format loads, every bad record is named by file:line, splits."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import cli, main
from fedlora.data.formats import (
    DataSpec,
    Example,
    LoadResult,
    Turn,
    load_examples,
    train_eval_split,
)
from fedlora.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CHAT = (
    '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
)


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def _sources(result: LoadResult) -> list[str]:
    return [Path(ex.source).name for ex in result.examples]


# ---- every form loads --------------------------------------------------------------------------


def test_chat_jsonl_keeps_turns_and_names_each_record_by_line():
    # Execute
    result = load_examples(DataSpec(str(FIXTURES / "chat.jsonl")))

    # Assert: the blank line 2 is skipped silently, line numbers stay true
    assert _sources(result) == ["chat.jsonl:1", "chat.jsonl:3", "chat.jsonl:4"]
    assert [ex.kind for ex in result.examples] == ["chat"] * 3
    assert [t.role for t in result.examples[0].turns] == ["system", "user", "assistant"]
    assert result.examples[1].turns[-1] == Turn("assistant", "Heart rate.")
    assert result.skipped == [] and result.files == [str(FIXTURES / "chat.jsonl")]


def test_pairs_jsonl_with_custom_columns_and_an_optional_system_column():
    # Prepare
    spec = DataSpec(
        str(FIXTURES / "pairs.jsonl"),
        format="pairs",
        prompt_column="question",
        response_column="answer",
        system_column="persona",
    )

    # Execute
    first, second = load_examples(spec).examples

    # Assert: an empty system field means no system turn
    assert first.turns == (
        Turn("system", "You answer pharmacy questions."),
        Turn("user", "What does q.d. mean on a prescription?"),
        Turn("assistant", "Once a day."),
    )
    assert [t.role for t in second.turns] == ["user", "assistant"]
    assert second.source.endswith("pairs.jsonl:2")


def test_csv_with_a_column_mapping_names_the_line_where_a_multiline_record_starts():
    # Execute
    result = load_examples(
        DataSpec(str(FIXTURES / "qa.csv"), prompt_column="question", response_column="answer")
    )

    # Assert: the header is line 1; record 2 spans lines 3-4; record 3 starts on line 5
    assert _sources(result) == ["qa.csv:2", "qa.csv:3", "qa.csv:5"]
    assert result.examples[1].turns[1].content == "Tiredness\nand pale skin."
    assert result.examples[1].turns[0].content == "List two symptoms of anemia, briefly."


def test_tsv_loads_with_the_default_columns():
    result = load_examples(DataSpec(str(FIXTURES / "qa.tsv")))

    assert _sources(result) == ["qa.tsv:2", "qa.tsv:3"]
    assert result.examples[0].turns[0] == Turn("user", "What is tachycardia?")


def test_text_documents_are_paragraphs_named_by_their_first_line():
    result = load_examples(DataSpec(str(FIXTURES / "notes.txt")))

    assert _sources(result) == ["notes.txt:1", "notes.txt:5", "notes.txt:8"]
    assert [ex.kind for ex in result.examples] == ["text"] * 3
    assert result.examples[0].text.endswith("pneumonia\nand treated with oral antibiotics.")


def test_a_folder_reads_every_supported_file_recursively_in_sorted_order_without_hidden_ones():
    # Execute
    result = load_examples(DataSpec(str(FIXTURES / "mixed")))

    # Assert: .hidden/, .ignored.txt and readme.rst are not read
    root = FIXTURES / "mixed"
    assert result.files == [
        str(root / "a_chat.jsonl"),
        str(root / "b_qa.tsv"),
        str(root / "notes" / "guide.md"),
    ]
    kinds = [ex.kind for ex in result.examples]
    assert kinds == ["chat"] * 5 + ["text"] * 2
    assert result.examples[-1].source == f"{root / 'notes' / 'guide.md'}:3"


def test_a_text_column_makes_csv_and_jsonl_rows_plain_text(tmp_path: Path):
    # Prepare
    _write(tmp_path, "a.csv", 'id,body\n1,"first note"\n2,second note\n')
    _write(tmp_path, "b.jsonl", '{"body": "third note"}\n')

    # Execute
    result = load_examples(DataSpec(str(tmp_path), text_column="body"))

    # Assert
    assert [ex.text for ex in result.examples] == ["first note", "second note", "third note"]
    assert {ex.kind for ex in result.examples} == {"text"}


def test_a_json_file_may_hold_one_array_whose_items_are_named_by_their_first_line(tmp_path: Path):
    # Prepare
    path = _write(
        tmp_path,
        "a.json",
        '[\n  {"prompt": "a", "response": "b"},\n  {\n'
        '    "prompt": "c",\n    "response": "d"\n  }\n]\n',
    )

    # Execute
    result = load_examples(DataSpec(str(path)))

    # Assert
    assert _sources(result) == ["a.json:2", "a.json:3"]
    assert result.examples[1].turns[1].content == "d"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path):
    path = _write(tmp_path, "a.csv", "\ufeffprompt,response\nq,a\n".encode())

    assert _sources(load_examples(DataSpec(str(path)))) == ["a.csv:2"]


def test_an_explicit_format_reads_a_file_whatever_its_name(tmp_path: Path):
    path = _write(tmp_path, "export.dat", CHAT + "\n")

    with pytest.raises(DataError, match=r"export\.dat: cannot tell the format"):
        load_examples(DataSpec(str(path)))
    assert load_examples(DataSpec(str(path), format="chat")).examples[0].kind == "chat"


# ---- every bad record is named -----------------------------------------------------------------

BAD_CASES = [
    (
        "a.jsonl",
        CHAT + '\n{"messages": [{"role": "user", "content": "x"}\n',
        {},
        "a.jsonl:2",
        "not valid JSON (Expecting ',' delimiter at column 47): fix or delete the line",
    ),
    (
        "a.jsonl",
        '{"prompt": "q", "answer": "a"}\n',
        {},
        "a.jsonl:1",
        "missing field 'response' (the record has: prompt, answer): add it, or set response-column",
    ),
    (
        "a.jsonl",
        '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}',
        {},
        "a.jsonl:1",
        "message 2 has role 'bot': use system, user or assistant",
    ),
    (
        "a.jsonl",
        '\n\n{"messages": [{"role": "user", "content": "x"}]}\n',
        {},
        "a.jsonl:3",
        "the conversation does not end with an assistant message: nothing to learn from it",
    ),
    (
        "a.jsonl",
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}',
        {},
        "a.jsonl:1",
        "message 2 content is empty",
    ),
    (
        "a.jsonl",
        '{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]}',
        {},
        "a.jsonl:1",
        "message 1 content is a number, not text",
    ),
    (
        "a.jsonl",
        '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": '
        '"s"}, {"role": "assistant", "content": "y"}]}',
        {},
        "a.jsonl:1",
        "message 2 is a system message: only the first message may be one",
    ),
    ("a.jsonl", '{"messages": "hi"}', {}, "a.jsonl:1", "'messages' is text, not a list"),
    ("a.jsonl", "[1, 2]", {}, "a.jsonl:1", "the record is a list, not a JSON object"),
    (
        "a.jsonl",
        '{"prompt": "q", "response": 7}',
        {},
        "a.jsonl:1",
        "'response' is a number, not text",
    ),
    (
        "a.jsonl",
        '{"prompt": "q", "response": "a"}',
        {"format": "chat"},
        "a.jsonl:1",
        "missing field 'messages'",
    ),
    (
        "a.csv",
        "prompt,answer\nq,a\n",
        {},
        "a.csv:1",
        "the header has no column 'response' (columns: prompt, answer): set response-column",
    ),
    (
        "a.csv",
        "prompt,response\nq,a\nHello, how are you,Fine\n",
        {},
        "a.csv:3",
        "the row has 3 cells, the header has 2: quote cells that contain commas",
    ),
    (
        "a.csv",
        'prompt,response\n\nq,"never\nclosed\n',
        {},
        "a.csv:3",
        "not valid CSV (unexpected end of data): a quote opened in this record is never closed",
    ),
    (
        "a.csv",
        'prompt,response\nq,"x"y\nq2,a2\n',
        {},
        "a.csv:2",
        "not valid CSV (',' expected after '\"'): quote a cell that holds quotes",
    ),
    (
        "a.csv",
        "prompt,response\nq,\n",
        {},
        "a.csv:2",
        "'response' is empty: fill it in or delete the record",
    ),
    ("a.tsv", "prompt\tresponse\nq\n", {}, "a.tsv:2", "the row has 1 cells, the header has 2"),
]


@pytest.mark.parametrize(
    "name, content, options, where, gist",
    BAD_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CASES)],
)
def test_a_bad_record_is_named_by_file_line_with_what_to_do(
    tmp_path: Path, name, content, options, where, gist
):
    # Prepare
    path = _write(tmp_path, name, content)

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(DataSpec(str(path), **options))

    # Assert
    assert f"{tmp_path / where}: {gist}" in str(caught.value)


def test_stop_raises_one_error_listing_every_bad_record_and_how_to_skip_them(tmp_path: Path):
    # Prepare: lines 2, 4 and 5 are bad
    lines = [CHAT, "{oops", CHAT, '{"messages": []}', '"text"', CHAT]
    path = _write(tmp_path, "a.jsonl", "\n".join(lines))

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(DataSpec(str(path)))

    # Assert
    message = str(caught.value).splitlines()
    assert message[0] == f"3 problems in {path}:"
    assert [m.split(": ")[0] for m in message[1:4]] == [f"{path}:{n}" for n in (2, 4, 5)]
    assert "on-bad-record=skip" in message[-1]


def test_more_than_twenty_problems_are_cut_with_a_count(tmp_path: Path):
    path = _write(tmp_path, "a.jsonl", "{bad\n" * 25)

    with pytest.raises(DataError) as caught:
        load_examples(DataSpec(str(path)))

    lines = str(caught.value).splitlines()
    assert len(lines) == 1 + 20 + 2
    assert lines[20].startswith(f"{path}:20: ") and lines[21] == "... and 5 more"


def test_skip_drops_bad_records_and_returns_each_with_its_line(tmp_path: Path):
    # Prepare
    path = _write(tmp_path, "a.jsonl", "\n".join([CHAT, "{oops", CHAT, '{"messages": []}']))

    # Execute
    result = load_examples(DataSpec(str(path), on_bad_record="skip"))

    # Assert
    assert _sources(result) == ["a.jsonl:1", "a.jsonl:3"]
    assert len(result.skipped) == 2
    assert result.skipped[0].startswith(f"{path}:2: not valid JSON")
    assert (
        result.skipped[1] == f"{path}:4: 'messages' is empty: add the conversation or delete "
        "the line"
    )


@pytest.mark.parametrize(
    "csv_text, problem",
    [
        ("question,response\nq,a\n", r"a\.csv:1: the header has no column 'prompt'"),
        (
            'prompt,response\nq,a\nq,"open\nq,a\n',
            r"a\.csv:3: not valid CSV \(unexpected end of data",
        ),
    ],
)
def test_skip_does_not_drop_a_file_it_cannot_read_to_the_end(tmp_path: Path, csv_text, problem):
    _write(tmp_path, "a.csv", csv_text)
    _write(tmp_path, "b.jsonl", CHAT)

    with pytest.raises(DataError, match=problem):
        load_examples(DataSpec(str(tmp_path), on_bad_record="skip"))


def test_skip_with_nothing_left_names_the_path(tmp_path: Path):
    path = _write(tmp_path, "a.jsonl", "{oops\n")

    with pytest.raises(DataError, match=r"a\.jsonl: no usable examples; all 1 records are bad"):
        load_examples(DataSpec(str(path), on_bad_record="skip"))


# ---- files and paths ---------------------------------------------------------------------------


def test_a_file_in_another_encoding_names_the_line_where_decoding_fails(tmp_path: Path):
    # Prepare: "é" in cp1252 on line 3
    path = _write(tmp_path, "a.csv", "prompt,response\nq,a\nq,caf\xe9\n".encode("cp1252"))

    # Execute
    with pytest.raises(DataError) as caught:
        load_examples(DataSpec(str(path)))

    # Assert: named, and readable once the encoding is set
    assert (
        f"{path}:3: not valid utf-8 (byte 0xe9 at column 6): re-save the file as UTF-8, "
        "or set encoding" in str(caught.value)
    )
    result = load_examples(DataSpec(str(path), encoding="cp1252"))
    assert result.examples[1].turns[1].content == "café"


def test_a_utf16_file_is_recognised_in_the_message(tmp_path: Path):
    path = _write(tmp_path, "a.tsv", "prompt\tresponse\nq\ta\n".encode("utf-16"))

    with pytest.raises(DataError, match=f"{path}:1: not valid utf-8 .* set encoding=utf-16"):
        load_examples(DataSpec(str(path)))
    assert len(load_examples(DataSpec(str(path), encoding="utf-16")).examples) == 1


@pytest.mark.parametrize(
    "name, content",
    [("a.jsonl", ""), ("a.jsonl", "\n  \n"), ("a.txt", "\n\n"), ("a.csv", "prompt,response\n")],
)
def test_a_file_without_records_is_an_error_naming_it(tmp_path: Path, name, content):
    path = _write(tmp_path, name, content)

    with pytest.raises(DataError, match=f"{path}: the file holds no records"):
        load_examples(DataSpec(str(path), on_bad_record="skip"))


def test_a_missing_path_is_an_error(tmp_path: Path):
    with pytest.raises(DataError, match="nope does not exist"):
        load_examples(DataSpec(str(tmp_path / "nope")))


def test_a_folder_without_supported_files_names_the_folder_and_the_extensions(tmp_path: Path):
    _write(tmp_path, "data.xlsx", b"PK")
    _write(tmp_path, ".hidden.jsonl", CHAT)

    with pytest.raises(DataError) as caught:
        load_examples(DataSpec(str(tmp_path)))

    assert str(caught.value).startswith(
        f"{tmp_path}: the folder holds no .csv, .json, .jsonl, .md, .parquet, .tsv, .txt files"
    )
    with pytest.raises(DataError, match="holds no .csv files"):
        load_examples(DataSpec(str(FIXTURES / "mixed"), format="csv"))


@pytest.mark.parametrize(
    "options, key",
    [
        ({"format": "xml"}, "format='xml'"),
        ({"on_bad_record": "ignore"}, "on-bad-record='ignore'"),
        ({"encoding": "utf9"}, "encoding='utf9'"),
        ({"prompt_column": " "}, "prompt-column is empty"),
        ({"response_column": "prompt"}, "prompt-column and response-column"),
        ({"format": "chat", "text_column": "body"}, "format=chat"),
        ({"text_column": "body", "system_column": "sys"}, "text-column and system-column"),
        ({"path": ""}, "path is empty"),
        ({"prompt_column": 3}, "prompt-column=3: expected text"),
    ],
)
def test_a_bad_spec_fails_at_construction_naming_the_setting(options, key):
    with pytest.raises(ConfigError, match=key):
        DataSpec(**{"path": "data", **options})


def test_a_spec_accepts_a_path_object():
    assert DataSpec(Path("data") / "a.csv").path == str(Path("data") / "a.csv")  # type: ignore


def test_an_example_is_either_chat_or_text():
    with pytest.raises(ValueError):
        Example(source="a:1")
    with pytest.raises(ValueError):
        Turn("bot", "x")


# ---- train / eval split ------------------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    return [Example(source=f"a.txt:{i}", text=f"doc {i}") for i in range(n)]


def test_split_is_deterministic_disjoint_complete_ordered_and_seed_dependent():
    # Prepare
    examples = _examples(50)

    # Execute
    train, held = train_eval_split(examples, 0.2, seed=7)
    again = train_eval_split(examples, 0.2, seed=7)
    other = train_eval_split(examples, 0.2, seed=8)

    # Assert
    assert (train, held) == again
    assert len(held) == 10 and len(train) == 40
    assert {e.source for e in train}.isdisjoint(e.source for e in held)
    assert sorted(train + held, key=examples.index) == examples
    assert train == sorted(train, key=examples.index) and held == sorted(held, key=examples.index)
    assert other[1] != held


@pytest.mark.parametrize(
    "n, fraction, n_eval",
    [
        (10, 0.0, 0),
        (10, 0.25, 2),
        (2, 0.1, 1),
        (1, 0.5, 0),
        (0, 0.5, 0),
        (3, 0.9, 2),
        (7, 0.5, 4),
    ],
)
def test_split_sizes(n, fraction, n_eval):
    train, held = train_eval_split(_examples(n), fraction, seed=0)

    assert (len(train), len(held)) == (n - n_eval, n_eval)


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan")])
def test_split_rejects_a_fraction_outside_zero_one(fraction):
    with pytest.raises(ConfigError, match="eval-fraction"):
        train_eval_split(_examples(4), fraction, seed=0)


# ---- fedlora check-data ------------------------------------------------------------------------


def test_check_data_prints_files_and_examples_by_kind():
    # Execute
    result = CliRunner().invoke(cli, ["check-data", str(FIXTURES / "mixed")])

    # Assert
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "3 files, 7 examples (5 chat, 2 text), 0 bad records skipped"
    assert lines[1].split() == [str(FIXTURES / "mixed" / "a_chat.jsonl"), "3", "chat"]


def test_check_data_with_skip_shows_the_first_problems(tmp_path: Path):
    # Prepare
    path = _write(tmp_path, "a.csv", "q,a\nfine,yes\nbroken\n")

    # Execute
    result = CliRunner().invoke(
        cli,
        [
            "check-data",
            str(path),
            "--prompt-column",
            "q",
            "--response-column",
            "a",
            "--on-bad-record",
            "skip",
        ],
    )

    # Assert
    assert result.exit_code == 0, result.output
    assert "1 file, 1 example (1 chat), 1 bad record skipped" in result.output
    assert f"skipped:\n  {path}:3: the row has 1 cells" in result.output


def test_check_data_reports_bad_data_as_one_error_and_exit_status_2(
    tmp_path: Path, capsys, monkeypatch
):
    # Prepare: keep main() from changing this process's logging and environment
    monkeypatch.setattr("fedlora.cli.configure_console", lambda verbose=False: None)
    monkeypatch.setattr("fedlora.simulations.run.offline_environment", lambda: None)
    path = _write(tmp_path, "a.jsonl", "{oops\n")

    # Execute
    with pytest.raises(SystemExit) as caught:
        main(["check-data", str(path), "--format", "chat"])

    # Assert
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedlora: error: 1 problem in {path}:\n{path}:1: not valid JSON")
