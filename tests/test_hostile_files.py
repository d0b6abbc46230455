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
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


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
    adapter = {n: np.ones((2, 2), np.float32) for n in (A, B, A1)}
    moments = {n: np.zeros((2, 2), np.float64) for n in (A, B, A1)}
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


def _drop_arrays(folder: Path, *names: str) -> None:
    arrays = load_file(str(folder / "state.safetensors"))
    save_file(
        {k: v for k, v in arrays.items() if k not in names}, str(folder / "state.safetensors")
    )


NAN = np.full((2, 2), np.nan, np.float32)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d: _edit_arrays(d, **{f"global__{A}": NAN}), "non-finite"),
        (lambda d: _edit_arrays(d, **{f"global__{A}": np.ones((2, 2))}), "float64, expected"),
        (lambda d: _edit_arrays(d, **{f"global__{A}": np.ones((2, 2), np.int32)}), "int32"),
        (lambda d: _edit_arrays(d, **{f"optimizer__v__{A}": np.ones((3,))}), "has shape (3,)"),
        (lambda d: _drop_arrays(d, f"optimizer/m/{B}"), "cover different tensors"),
        (lambda d: _drop_arrays(d, f"optimizer/m/{A1}", f"optimizer/v/{A1}"), "part of a factor"),
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


# ---- the DP ledger ---------------------------------------------------------------------------


def _ledger_settings(path: Path):
    from fedlora.client.dp_ledger import LedgerSettings

    return LedgerSettings(path=str(path), max_epsilon=10.0)


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: p.write_text("[]"), "not a JSON object"),
        (lambda p: p.write_text("null"), "not a JSON object"),
        (lambda p: p.write_bytes(b"\x00\xff\xfe binary"), "not valid JSON"),
        (lambda p: p.mkdir(), "not valid JSON"),
        (lambda p: p.write_text("[" * 10_000), "not valid JSON"),
        (lambda p: p.write_text('{"version": 1, "delta": 1e-5, "charges": {}}'), "charges"),
        (lambda p: p.write_text('{"version": 1, "delta": 1e-5, "charges": [1]}'), "charge 0"),
        (
            lambda p: p.write_text(
                '{"version": 1, "delta": 1e-5, "charges": [{"round": 1, "noise_multiplier": '
                'NaN, "expected_clients": 2, "clip_norm": 1.0}]}'
            ),
            "charge 0",
        ),
        (lambda p: p.write_text('{"version": 1, "delta": 7, "charges": []}'), "delta"),
    ],
)
def test_a_hostile_dp_ledger_is_one_line(tmp_path, write, expected):
    from fedlora.client import dp_ledger

    path = tmp_path / "dp-ledger.json"
    write(path)
    with pytest.raises(FileFormatError) as e:
        dp_ledger.load(_ledger_settings(path), None)
    _one_line(e, str(path), expected, "move it aside")


def test_a_hostile_ledger_in_node_state_is_one_line():
    from flwr.app import ConfigRecord, RecordDict

    from fedlora.client import dp_ledger

    state = RecordDict({dp_ledger.STATE_KEY: ConfigRecord({"json": "[" * 5000})})
    with pytest.raises(FileFormatError, match="node state: not a fedlora DP ledger"):
        dp_ledger.load(dp_ledger.LedgerSettings(max_epsilon=1.0), state)


# ---- a node's personal state -----------------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        lambda p: p.write_bytes(p.read_bytes()[:50]),
        lambda p: p.write_bytes(b""),
        lambda p: _write(p, np.save, np.ones((2, 3), np.float32)),
        lambda p: _write(p, np.savez, np.full((2, 3), np.inf, np.float32)),
    ],
)
def test_a_hostile_personal_state_file_is_one_line(tmp_path, write):
    from fedlora.client.node import NodeSettings, load_personal, save_personal

    settings = NodeSettings.from_config({"site": "pain", "personal-state-dir": str(tmp_path)})
    save_personal(settings, {"b": np.ones((2, 3), np.float32)})
    path = tmp_path / "pain.npz"
    write(path)
    with pytest.raises(FileFormatError) as e:
        load_personal(settings)
    _one_line(e, str(path), "move the file aside")


# ---- data files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": ' + "[" * 3000 + "]" * 3000 + ', "response": "b"}', "nested more than"),
        ('{"prompt": "a", "response": "b", "n": ' + "7" * 5000 + "}", "integer of 5000 digits"),
        ('{"prompt": "a", "response": "b", "n": 1e400}', "beyond a float's range"),
    ],
)
def test_a_hostile_jsonl_line_is_a_named_data_problem(tmp_path, line, expected):
    from fedlora.data.formats import DataSpec, load_examples
    from fedlora.errors import DataError

    path = tmp_path / "notes.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_examples(DataSpec(str(path)))
    assert f"{path.name}:2" in str(e.value) and expected in str(e.value)
    kept = load_examples(DataSpec(str(path), on_bad_record="skip"))
    assert len(kept.examples) == 1 and len(kept.skipped) == 1


def test_a_hostile_json_array_file_is_a_named_data_problem(tmp_path):
    from fedlora.data.formats import DataSpec, load_examples
    from fedlora.errors import DataError

    path = tmp_path / "notes.json"
    path.write_text('[{"prompt": "a", "response": "b"},\n' + "[" * 3000 + "]" * 3000 + "]")
    with pytest.raises(DataError, match="nested more than"):
        load_examples(DataSpec(str(path)))


# ---- an adapter folder for export and merge --------------------------------------------------


def _adapter(tmp_path: Path, model: Path, value: float = 0.0) -> Path:
    from fedlora.lora import LoraSettings
    from fedlora.server.checkpoint import save_adapter

    arrays = {A: np.full((4, 64), value, np.float32)}
    return save_adapter(arrays, tmp_path / "adapter", LoraSettings(r=4, alpha=8.0), model)


def _edit_config(folder: Path, **values) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d: _edit_config(d, r=None), "r=None is not a LoRA rank"),
        (lambda d: _edit_config(d, r={"x": 1}), "is not a LoRA rank"),
        (lambda d: _edit_config(d, r="eight"), "r=eight is not a LoRA rank"),
        (lambda d: _edit_config(d, r=2**20), "is not a LoRA rank"),
        (lambda d: _edit_config(d, lora_alpha=[1]), "lora_alpha"),
        (lambda d: _edit_config(d, target_modules=[[["q"]]]), "target_modules"),
        # peft compiles a string as a regular expression (make fuzz found these two)
        (lambda d: _edit_config(d, target_modules=")"), "not a valid regular expression"),
        (lambda d: _edit_config(d, target_modules="*"), "not a valid regular expression"),
        (lambda d: (d / "adapter_config.json").write_text("[" * 5000), "nested more than"),
        (lambda d: (d / "adapter_config.json").write_text("null"), "not a LoRA adapter"),
    ],
)
def test_a_hostile_adapter_config_is_one_line(tmp_path, tiny_model_dir, corrupt, expected):
    from fedlora.export.merge import check_adapter_dir

    adapter = _adapter(tmp_path, tiny_model_dir)
    check_adapter_dir(adapter)
    corrupt(adapter)
    with pytest.raises(FileFormatError) as e:
        check_adapter_dir(adapter)
    _one_line(e, "adapter_config.json", expected, "re-save the adapter")


def test_a_pickled_adapter_is_refused_unopened(tmp_path, tiny_model_dir):
    from fedlora.export.merge import check_adapter_dir

    adapter = _adapter(tmp_path, tiny_model_dir)
    (adapter / "adapter_model.safetensors").unlink()
    # a pickle that would run code if anything unpickled it
    (adapter / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(FileFormatError) as e:
        check_adapter_dir(adapter)
    _one_line(e, "adapter_model.bin is a pickle", "convert it to adapter_model.safetensors")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_adapter_is_refused_by_merge_naming_the_tensor(
    tmp_path, tiny_model_dir, value
):
    from fedlora.export.merge import merge_adapter

    adapter = _adapter(tmp_path, tiny_model_dir, value)
    with pytest.raises(FileFormatError) as e:
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged")
    _one_line(e, f"tensor {A} holds 256 non-finite values")
    assert not (tmp_path / "merged").exists()


# ---- through the command line: no traceback --------------------------------------------------


@pytest.mark.integration
def test_cli_export_of_a_nan_adapter_is_one_line_naming_the_tensor(tmp_path, tiny_model_dir):
    from test_corrupt_files import _cli, _one_line

    adapter = _adapter(tmp_path, tiny_model_dir, np.nan)
    result = _cli(
        "export", "--adapter", str(adapter), "--base-model", str(tiny_model_dir), cwd=tmp_path
    )
    _one_line(result, f"tensor {A} holds 256 non-finite values")


@pytest.mark.integration
def test_cli_check_data_of_hostile_jsonl_names_the_lines_without_a_traceback(tmp_path):
    from test_corrupt_files import _cli

    path = tmp_path / "notes.jsonl"
    deep = "[" * 3000 + "]" * 3000
    path.write_text(f'{{"prompt": {deep}, "response": "b"}}\n{{"n": {"9" * 5000}}}\n')
    result = _cli("check-data", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "notes.jsonl:1: not usable JSON (nested more than" in result.stderr
    assert "notes.jsonl:2: not usable JSON (an integer of 5000 digits" in result.stderr


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: (d / "indices.npy").write_bytes(b"\x93NUMPY garbage"),
        lambda d: np.save(d / "offsets.npy", np.array([0, 99], np.int64)),
        lambda d: np.save(d / "indices.npy", np.array([0, 10**9], np.int64)),
        lambda d: np.save(d / "offsets.npy", np.array([0.0, 1.0])),
        lambda d: (d / "train.jsonl").write_text("[" * 5000 + "\n"),
    ],
)
def test_a_hostile_partition_folder_is_a_data_error(tmp_path, corrupt):
    from fedlora.data import partitioned
    from fedlora.data.records import Example
    from fedlora.errors import DataError

    folder = tmp_path / "partition"
    folder.mkdir()
    examples = [Example(source=f"s:{i}", text=f"text {i}") for i in range(2)]
    partitioned.write_examples(folder / partitioned.POOL, examples)
    partitioned.write_indices(folder, [np.array([0, 1])])
    assert len(partitioned.client_examples(folder, 0)) == 2
    partitioned._pool.cache_clear()
    corrupt(folder)
    with pytest.raises(DataError) as e:
        partitioned.client_examples(folder, 0)
    _one_line(e, "partition")
    partitioned._pool.cache_clear()


def _zip_member(name: str, data: bytes, flag_bits: int = 0) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo(name)
        zf.writestr(info, data)
    raw = bytearray(buffer.getvalue())
    if flag_bits:  # the general-purpose flags of the local and the central header
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = raw.index(signature) + offset
            raw[at] |= flag_bits
    return bytes(raw)


@pytest.mark.parametrize(
    "content, expected",
    [
        # a 128-byte .npy whose header claims 2^40 float32 values: refused before allocating
        (lambda: _zip_member("b.npy", _huge_npy()), "more than it holds"),
        (lambda: _zip_member("b.npy", _npy(np.ones(3, np.float32)), flag_bits=1), "readable"),
        (lambda: _zip_member("b.npy", b"\x93NUMPY\x03\x00garbage"), "readable"),
    ],
)
def test_a_npz_member_is_checked_before_it_is_read(tmp_path, content, expected):
    path = tmp_path / "state.npz"
    path.write_bytes(content())
    with pytest.raises(FileFormatError) as e:
        load_npz(path, "move it aside")
    _one_line(e, expected)


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def _huge_npy() -> bytes:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    return raw + b"\x00" * 32
