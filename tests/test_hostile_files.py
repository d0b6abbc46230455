"""Every file fedlora reads back is hostile until checked (issue 37): a checkpoint, a DP ledger,
a node's personal state, an adapter folder or a data file that is corrupted, replaced or written
by someone else ends in one typed line naming the file, what is wrong and what to do; never a
traceback, never a pickle, never a NaN taken in."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedlora.errors import FedloraError, FileFormatError
from fedlora.readback import JsonLimitError, load_npz, parse_json, read_json
from fedlora.server.state import ServerState, load_state, save_state
from fedlora.server.strategies import OptimizerState

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _one_line(exc: pytest.ExceptionInfo, *expected: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for part in expected:
        assert part in text, text


# ---- the JSON reader -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[" * 5000 + "]" * 5000, "nested more than"),
        ("[" * 80 + "]" * 80, "nested more than"),
        ("1" * 5000, "integer of 5000 digits"),
        ('{"a": 1e999}', "beyond a float's range"),
        ('{"a": NaN}', "NaN is not a finite number"),
    ],
)
def test_json_beyond_the_limits_is_a_value_error(text, expected):
    with pytest.raises(JsonLimitError, match=expected):
        parse_json(text)


def test_json_within_the_limits_parses():
    assert parse_json('{"a": [1, 2.5, {"b": null}]}') == {"a": [1, 2.5, {"b": None}]}
    assert parse_json('{"epsilon": Infinity}', allow_nonfinite=True) == {"epsilon": float("inf")}


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000, b"\xff\xfe\x00binary", b'{"n": ' + b"9" * 6000 + b"}"],
)
def test_a_hostile_json_file_is_one_line(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(FileFormatError) as e:
        read_json(path, "delete it")
    _one_line(e, str(path), "is not valid JSON", "delete it")


def test_a_folder_instead_of_a_json_file_is_one_line(tmp_path):
    with pytest.raises(FileFormatError) as e:
        read_json(tmp_path, "delete it")
    _one_line(e, "is not valid JSON")


# ---- checkpoints and resume ------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    adapter = {A: np.ones((2, 2), np.float32)}
    moments = {A: np.zeros((2, 2), np.float64)}
    state = ServerState(
        completed_round=1,
        global_adapter=adapter,
        optimizer=OptimizerState(num_steps=1, m=moments, v=moments),
        history=[{"round": 1, "train-loss": 1.0}],
        python_random=None,
    )
    save_state(tmp_path, state)
    return tmp_path / "server-state"


def _edit_json(folder: Path, **values) -> None:
    meta = json.loads((folder / "state.json").read_text())
    meta.update(values)
    (folder / "state.json").write_text(json.dumps(meta))


def _edit_arrays(folder: Path, **values) -> None:
    arrays = load_file(str(folder / "state.safetensors"))
    arrays.update({k.replace("__", "/"): v for k, v in values.items()})
    save_file(arrays, str(folder / "state.safetensors"))


NAN = np.full((2, 2), np.nan, np.float32)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d: _edit_arrays(d, **{f"global__{A}": NAN}), "non-finite"),
        (lambda d: _edit_arrays(d, **{f"global__{A}": np.ones((2, 2))}), "float64, expected"),
        (lambda d: _edit_arrays(d, **{f"global__{A}": np.ones((2, 2), np.int32)}), "int32"),
        (lambda d: _edit_arrays(d, **{f"optimizer__v__{A}": np.ones((3,))}), "has shape (3,)"),
        (lambda d: _edit_arrays(d, optimizer__step=np.ones(2, np.int64)), "step count"),
        (lambda d: _edit_json(d, history=[{"loss": 1}]), "history is not a list"),
        (lambda d: _edit_json(d, history=None), "history is not a list"),
        (lambda d: _edit_json(d, **{"python-random": [3, [1, 2], None]}), "python-random"),
        (lambda d: _edit_json(d, **{"python-random": "x"}), "python-random"),
        (lambda d: _edit_json(d, **{"completed-round": "1"}), "completed-round"),
        (lambda d: _edit_json(d, settings=[]), "settings is not an object"),
        (lambda d: (d / "state.json").write_text("null"), "state.json is not an object"),
        (lambda d: (d / "state.json").write_text("[" * 3000), "nested more than"),
        (lambda d: (d / "state.json").write_text("9" * 5000), "integer of 5000 digits"),
    ],
)
def test_a_hostile_checkpoint_is_refused_on_resume_in_one_line(tmp_path, corrupt, expected):
    folder = _checkpoint(tmp_path)
    assert load_state(tmp_path).optimizer.num_steps == 1
    corrupt(folder)
    with pytest.raises(FileFormatError) as e:
        load_state(tmp_path)
    _one_line(e, str(folder), expected, f"delete {folder}")


# ---- .npz files (a node's personal state) ----------------------------------------------------


def _write(path: Path, save, value: np.ndarray) -> None:
    buffer = io.BytesIO()
    save(buffer, value)  # np.savez names it arr_0
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: p.write_bytes(b""), "not a readable .npz"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable .npz"),
        (lambda p: _write(p, np.save, np.ones(3)), "not a readable .npz"),  # a plain .npy
        (lambda p: _write(p, np.savez, np.array([{"x": 1}], dtype=object)), "readable"),
        (lambda p: _write(p, np.savez, np.full(3, np.nan, np.float32)), "non-finite"),
        (lambda p: _write(p, np.savez, np.ones(3, np.int8)), "is int8, expected"),
    ],
)
def test_a_hostile_npz_file_is_one_line(tmp_path, write, expected):
    path = tmp_path / "site.npz"
    np.savez(path, b=np.ones((2, 3), np.float32))
    assert load_npz(path, "x")["b"].shape == (2, 3)
    write(path)
    with pytest.raises(FileFormatError) as e:
        load_npz(path, "move it aside")
    _one_line(e, str(path), expected, "move it aside")


def test_typed_errors_are_fedlora_errors():
    assert issubclass(FileFormatError, FedloraError)
