"""Splitting a data set across simulated clients (flwr-datasets) and the nodes that train on it."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from fedlora.client.node import NodeSettings, node_data
from fedlora.data import partitioned
from fedlora.data.formats import DataSpec, load_examples
from fedlora.errors import ConfigError
from fedlora.simulations.partition import (
    PartitionSpec,
    columns,
    infer_labels,
    label_of,
    prepare,
    split,
)

LABELS = ("bigger", "same", "smaller")


def write_chat(path: Path, n: int = 120, seed: int = 0) -> Path:
    """A chat JSONL label task with an extra 'region' field (4 values)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            answer = "bigger" if a > b else "smaller" if a < b else "same"
            record = {
                "messages": [
                    {"role": "user", "content": f"Is {a} bigger or smaller than {b}?"},
                    {"role": "assistant", "content": answer},
                ],
                "region": f"r{i % 4}",
                "id": i,
            }
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def chat(tmp_path: Path) -> Path:
    return write_chat(tmp_path / "chat.jsonl")


@pytest.fixture
def pool(chat: Path):
    return load_examples(DataSpec(str(chat))).examples


def covers_once(parts: list[np.ndarray], n: int) -> bool:
    flat = np.concatenate(parts)
    return len(flat) == n and len(set(flat.tolist())) == n


def test_records_keep_their_scalar_fields_as_columns(pool):
    cols = columns(pool)
    assert set(cols) == {"label", "region", "id"}
    assert cols["region"][:4] == ["r0", "r1", "r2", "r3"]
    assert set(cols["label"]) == set(LABELS)
    assert infer_labels(cols["label"]) == LABELS
    assert infer_labels(cols["id"]) == ()  # every value once: not labels


def test_iid_split_is_seeded_and_covers_every_example_once(pool):
    a = split(pool, PartitionSpec.parse("iid"), 10, seed=0)
    b = split(pool, PartitionSpec.parse("iid"), 10, seed=0)
    c = split(pool, PartitionSpec.parse("iid"), 10, seed=1)
    assert covers_once(a, len(pool))
    assert [len(p) for p in a] == [12] * 10
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != y).any() for x, y in zip(a, c, strict=True))


def test_dirichlet_skews_labels_more_at_small_alpha(pool):
    def skew(alpha: float) -> float:
        parts = split(pool, PartitionSpec.parse(f"dirichlet:{alpha}"), 6, seed=0)
        assert covers_once(parts, len(pool))
        # mean share of a client's majority label
        return float(
            np.mean(
                [
                    max(sum(label_of(pool[i]) == lab for i in p) for lab in LABELS) / len(p)
                    for p in parts
                ]
            )
        )

    assert skew(0.1) > skew(100.0) + 0.1


def test_dirichlet_by_another_column(pool):
    parts = split(pool, PartitionSpec.parse("dirichlet:0.5:region"), 5, seed=0)
    assert covers_once(parts, len(pool))


def test_column_gives_one_client_per_value(pool):
    parts = split(pool, PartitionSpec.parse("column:region"), 0, seed=0)
    assert len(parts) == 4 and covers_once(parts, len(pool))
    for p in parts:
        assert len({dict(pool[i].fields)["region"] for i in p}) == 1


def test_shards_give_each_client_few_labels(pool):
    parts = split(pool, PartitionSpec.parse("shards:1"), 6, seed=0)
    assert len(parts) == 6 and covers_once(parts, len(pool))

    # one contiguous shard of label-sorted data each: fewer labels per client than iid
    def mean_labels(parts):
        return np.mean([len({label_of(pool[i]) for i in p}) for p in parts])

    iid = split(pool, PartitionSpec.parse("iid"), 6, seed=0)
    assert mean_labels(parts) <= 2 < mean_labels(iid)


@pytest.mark.parametrize(
    ("text", "clients", "message"),
    [
        ("round-robin", 4, "unknown kind 'round-robin'"),
        ("dirichlet:0", 4, "alpha must be > 0"),
        ("dirichlet:-1", 4, "alpha must be > 0"),
        ("dirichlet:abc", 4, "'abc' is not a number"),
        ("iid", 500, "only 120 examples; use at most 120 clients"),
        ("column:hospital", 0, "no column 'hospital' in the data"),
        ("dirichlet:0.5:hospital", 4, "no column 'hospital'"),
        ("column:region", 7, "4 clients, not --num-clients 7"),
        ("shards:0", 4, "K must be >= 1"),
        ("shards:40", 4, "needs 160 shards"),
        ("dirichlet:0.01", 100, "got no example in 10 Dirichlet draws"),
    ],
)
def test_bad_partition_arguments_say_what_to_fix(pool, text, clients, message):
    with pytest.raises(ConfigError, match=message) as err:
        split(pool, PartitionSpec.parse(text), clients, seed=0)
    assert "\n" not in str(err.value)


def test_prepare_writes_pool_indices_test_split_and_statistics(chat, tmp_path):
    folder = tmp_path / "part"
    part = prepare(str(chat), folder, 8, PartitionSpec.parse("dirichlet:0.5"), test_fraction=0.1)
    assert part.num_clients == 8 and part.labels == LABELS
    assert part.test == str(folder / "test.jsonl") and part.test_examples == 12
    test = partitioned.read_examples(folder / "test.jsonl")
    train = partitioned.read_examples(folder / "train.jsonl")
    assert len(test) == 12 and len(train) == 108
    assert not {e.source for e in test} & {e.source for e in train}
    stats = json.loads((folder / "partition.json").read_text())
    assert stats["num-clients"] == 8 and stats["partition"] == "dirichlet:0.5:label"
    assert sum(c["examples"] for c in stats["clients"]) == 108
    assert sum(sum(c["labels"].values()) for c in stats["clients"]) == 108
    assert (folder / "partition.png").stat().st_size > 1000
    # each client's examples are exactly its indices into the pool
    got = [e.source for i in range(8) for e in partitioned.client_examples(folder, i)]
    assert sorted(got) == sorted(e.source for e in train)


def test_prepare_checks_everything_before_writing(chat, tmp_path):
    with pytest.raises(ConfigError):
        prepare(str(chat), tmp_path / "p", 1000, PartitionSpec.parse("iid"), test_fraction=0.1)
    assert not (tmp_path / "p").exists()
    with pytest.raises(ConfigError, match="--test PATH or --test-fraction"):
        prepare(str(chat), tmp_path / "p", 4, PartitionSpec.parse("iid"))
    with pytest.raises(ConfigError, match="no such file or folder"):
        prepare(str(tmp_path / "nope.jsonl"), tmp_path / "p", 4, PartitionSpec.parse("iid"))


def test_packaged_task_by_name_and_its_natural_sites(tmp_path):
    part = prepare("drugreview", tmp_path / "p", 0, PartitionSpec.parse("column:site"))
    assert part.num_clients == 5 and part.test == "drugreview"
    assert part.labels == ("negative", "neutral", "positive")


def test_a_node_trains_on_its_partition_and_the_cache_stays_small(chat, tmp_path):
    folder = tmp_path / "part"
    prepare(str(chat), folder, 20, PartitionSpec.parse("iid"), test_fraction=0.1)
    seen = set()
    for pid in range(20):
        settings = NodeSettings.from_config(
            {"partition-dir": str(folder), "partition-id": pid, "eval-fraction": 0.0}
        )
        assert settings.site == f"client-{pid}"
        data = node_data(settings)
        want = {e.source for e in partitioned.client_examples(folder, pid)}
        assert {e.source for e in data.train} == want
        assert not seen & want
        seen |= want
    from fedlora.client import node

    assert len(node._DATA) <= node.DATA_CACHE
    bad = NodeSettings.from_config({"partition-dir": str(folder), "partition-id": 20})
    with pytest.raises(Exception, match="partition-id 20 has no data: the partition has 20"):
        node_data(bad)


def test_personal_factors_live_in_files(tmp_path):
    from fedlora.client.node import load_personal, save_personal

    s = NodeSettings.from_config(
        {"partition-dir": str(tmp_path), "partition-id": 3, "personal-state-dir": str(tmp_path)}
    )
    assert load_personal(s) is None
    save_personal(s, {"b": np.ones((2, 3), np.float32)})
    assert (tmp_path / "client-3.npz").is_file()
    np.testing.assert_array_equal(load_personal(s)["b"], np.ones((2, 3)))


@pytest.mark.integration
def test_simulate_command_on_a_chat_file(tiny_model_dir, tmp_path, capsys):
    from fedlora.cli import main

    data = write_chat(tmp_path / "chat.jsonl", n=200)
    out = tmp_path / "run"
    main(
        [
            "simulate",
            "--data",
            str(data),
            "--num-clients",
            "20",
            "--partition",
            "dirichlet:0.5",
            "--test-fraction",
            "0.1",
            "--base-model",
            str(tiny_model_dir),
            "--rounds",
            "2",
            "-o",
            str(out),
        ]
    )
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert all(rec["replies"] == 20 for rec in history)
    assert all(0 <= rec["central-eval-accuracy"] <= 1 for rec in history)
    assert all(rec["central-eval-loss"] > 0 for rec in history)
    stats = json.loads((out / "partition" / "partition.json").read_text())
    assert stats["num-clients"] == 20 and stats["test-examples"] == 20
    assert (out / "partition" / "partition.png").is_file()
    assert "central acc." in capsys.readouterr().out
