"""Data kept as Parquet files and ``datasets`` folders (save_to_disk): check-data and simulate
read them with the same column options, and name bad rows as file:row."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main
from fedlora.data.formats import DataSpec, load_examples
from fedlora.errors import DataError


def parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def saved(path, rows, splits=None):
    import datasets

    data = datasets.Dataset.from_list(rows)
    if splits:
        datasets.DatasetDict({s: data for s in splits}).save_to_disk(str(path))
    else:
        data.save_to_disk(str(path))
    return path


def pairs(n):
    return [
        {"q": f"Is {i} even?", "a": ("yes", "no")[i % 2], "site": f"s{i % 2}"} for i in range(n)
    ]


def chats(n):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Is {i} even?"},
                {"role": "assistant", "content": ("yes", "no")[i % 2]},
            ]
        }
        for i in range(n)
    ]


def test_check_data_reads_parquet_and_saved_datasets(tmp_path, capsys):
    table = parquet(tmp_path / "pairs.parquet", pairs(6))
    main(["check-data", str(table), "--prompt-column", "q", "--response-column", "a"])
    assert "6 examples" in capsys.readouterr().out
    folder = saved(tmp_path / "saved", chats(5))
    main(["check-data", str(folder)])
    assert "5 examples" in capsys.readouterr().out
    got = load_examples(DataSpec(str(table), prompt_column="q", response_column="a"))
    assert dict(got.examples[1].fields)["site"] == "s1"  # other columns, for partitioning


def test_bad_rows_and_unreadable_tables_are_named(tmp_path):
    rows = pairs(4)
    rows[2]["a"] = ""
    table = parquet(tmp_path / "bad-row.parquet", rows)
    with pytest.raises(DataError, match=r"bad-row.parquet:row 3: 'a' is empty"):
        load_examples(DataSpec(str(table), prompt_column="q", response_column="a"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        load_examples(DataSpec(str(tmp_path / "junk.parquet")))
    splits = saved(tmp_path / "dd", chats(3), splits=("train", "test"))
    with pytest.raises(DataError, match=r"several splits \(train, test\): give one of them"):
        load_examples(DataSpec(str(splits)))
    assert len(load_examples(DataSpec(str(splits / "train"))).examples) == 3
    with pytest.raises(DataError, match="not a folder written by datasets"):
        load_examples(DataSpec(str(tmp_path), format="dataset"))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["parquet", "dataset"])
def test_simulate_trains_on_a_table(tiny_model_dir, tmp_path, kind):
    if kind == "parquet":
        data = parquet(tmp_path / "d.parquet", pairs(40))
        columns = ["--prompt-column", "q", "--response-column", "a"]
    else:
        data = saved(tmp_path / "d", chats(40))
        columns = []
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'base-model = "{tiny_model_dir}"\nquantization = "fp32"\nlocal-steps = 1\nmin-nodes = 2\n'
    )
    out = tmp_path / "run"
    split = ["--num-clients", "2", "--partition", "iid", "--test-fraction", "0.25"]
    files = ["--config", str(recipe), "--output", str(out)]
    main(["simulate", "--data", str(data), *columns, *split, "--rounds", "1", *files])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["replies"] == 2 and record["central-eval-loss"] > 0
