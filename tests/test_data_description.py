"""One data description everywhere: a CSV with custom columns, as --data and as the held-out
test file, is read the same way by simulate (and the server's central evaluation), compare and
export --eval-data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

ANSWERS = ("yes", "no")


def write_csv(path: Path, n: int, start: int = 0) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["q", "a"])
        for i in range(start, start + n):
            out.writerow([f"Is {i} even? Answer yes or no.", ANSWERS[i % 2]])
    return path


def test_central_examples_read_the_custom_columns(tmp_path):
    from fedlora.server.central import central_examples

    held = write_csv(tmp_path / "held.csv", 6)
    spec = {"prompt_column": "q", "response_column": "a"}
    examples, _ = central_examples(str(held), 4, (), spec=spec)
    assert len(examples) == 4 and examples[0].turns[-1].content == "yes"
    from fedlora.errors import FedloraError

    with pytest.raises(FedloraError):  # the default columns are not in this file
        central_examples(str(held), 4, ())


def test_export_passes_its_data_options_to_the_evaluation_data(tmp_path, monkeypatch):
    from fedlora.cli import main
    from fedlora.server import central

    seen = {}

    def capture(source, n, labels, option="central-eval", spec=None):
        seen.update(source=source, spec=spec)
        raise SystemExit(0)

    monkeypatch.setattr(central, "central_examples", capture)
    held = write_csv(tmp_path / "held.csv", 6)
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--adapter",
                str(tmp_path),
                "--output",
                str(tmp_path / "out"),
                "--eval-data",
                str(held),
                "--prompt-column",
                "q",
                "--response-column",
                "a",
            ]
        )
    assert seen["source"] == str(held)
    assert (seen["spec"]["prompt_column"], seen["spec"]["response_column"]) == ("q", "a")


@pytest.mark.integration
def test_simulate_and_compare_with_a_custom_column_csv_test_file(tiny_model_dir, tmp_path):
    from fedlora.cli import main

    data = write_csv(tmp_path / "d.csv", 40)
    held = write_csv(tmp_path / "held.csv", 10, start=100)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'base-model = "{tiny_model_dir}"\nquantization = "fp32"\nlocal-steps = 1\nmin-nodes = 2\n'
    )
    out = tmp_path / "sim"
    columns = ["--prompt-column", "q", "--response-column", "a"]
    split = ["--num-clients", "2", "--partition", "iid", "--rounds", "1"]
    files = ["--config", str(recipe), "--output", str(out)]
    main(["simulate", "--data", str(data), *columns, "--test", str(held), *split, *files])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["central-eval-accuracy"] <= 1 and record["central-eval-loss"] > 0
    partition = json.loads((out / "partition" / "partition.json").read_text())
    assert partition["test-examples"] == 10  # the held-out file, read with q and a
    # compare reads the same description from its [compare] table
    cmp_out = tmp_path / "cmp"
    config = tmp_path / "compare.toml"
    config.write_text(
        f'[compare]\ndata = "{data}"\ntest = "{held}"\npartition = "iid"\nnum-clients = 2\n'
        f'prompt-column = "q"\nresponse-column = "a"\nmethods = ["fedit"]\n'
        f'output = "{cmp_out}"\n[run]\nbase-model = "{tiny_model_dir}"\nquantization = "fp32"\n'
        "num-server-rounds = 1\nlocal-steps = 1\nmin-nodes = 2\n"
    )
    main(["compare", "--config", str(config)])
    doc = json.loads((cmp_out / "compare.json").read_text())
    assert doc["test-examples"] == 10 and 0 <= doc["methods"]["fedit"]["accuracy"] <= 1
