"""A corrupted adapter, checkpoint or model file ends in one line naming the file, never a
traceback: in the library (FileFormatError) and through the ``fedlora`` command line; a write
that fails half-way leaves the previous file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora.errors import FedloraError, FileFormatError
from fedlora.export.merge import check_adapter_dir
from fedlora.lora import LoraSettings
from fedlora.server.checkpoint import save_adapter
from fedlora.server.state import ServerState, load_state, save_state

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _adapter(tmp_path: Path, model: Path) -> Path:
    arrays = {A: np.zeros((4, 64), np.float32)}
    return save_adapter(arrays, tmp_path / "adapter", LoraSettings(r=4, alpha=8.0), model)


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: _truncate(p),
        lambda p: _truncate(p, 5),
        lambda p: p.write_bytes(b"garbage" * 40),
        lambda p: p.write_bytes(b""),
    ],
)
def test_corrupted_adapter_weights_are_one_line(tmp_path, tiny_model_dir, corrupt):
    adapter = _adapter(tmp_path, tiny_model_dir)
    check_adapter_dir(adapter)
    corrupt(adapter / "adapter_model.safetensors")
    with pytest.raises(FileFormatError, match="adapter_model.safetensors is not a readable") as e:
        check_adapter_dir(adapter)
    assert "\n" not in str(e.value) and "copy the adapter folder again" in str(e.value)


def _state(tmp_path: Path) -> Path:
    save_state(
        tmp_path, ServerState(completed_round=1, global_adapter={A: np.ones((2, 2), np.float32)})
    )
    return tmp_path / "server-state"


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d: _truncate(d / "state.safetensors"), "state.safetensors is not a readable"),
        (lambda d: _truncate(d / "state.json"), "state.json is not valid JSON"),
        (lambda d: (d / "state.json").write_text('{"history": []}'), "incomplete checkpoint"),
        (lambda d: (d / "state.json").write_text("[1, 2]"), "incomplete checkpoint"),
    ],
)
def test_corrupted_checkpoint_is_one_line(tmp_path, corrupt, expected):
    folder = _state(tmp_path)
    assert load_state(tmp_path).completed_round == 1
    corrupt(folder)
    with pytest.raises(FileFormatError, match=expected) as e:
        load_state(tmp_path)
    assert "\n" not in str(e.value) and f"delete {folder}" in str(e.value)


def test_corrupted_model_weights_are_one_line(tmp_path, tiny_model_dir):
    from fedlora.basemodel import check_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = sorted(model.glob("*.safetensors"))[0]
    _truncate(weights)
    with pytest.raises(FedloraError, match=f"{weights.name} is not a readable safetensors"):
        check_model_dir(model)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("fedlora: error: ") and expected in lines[0], lines[0]


@pytest.mark.integration
def test_cli_export_of_a_truncated_adapter_is_one_line(tmp_path, tiny_model_dir):
    adapter = _adapter(tmp_path, tiny_model_dir)
    _truncate(adapter / "adapter_model.safetensors")
    result = _cli(
        "export", "--adapter", str(adapter), "--base-model", str(tiny_model_dir), cwd=tmp_path
    )
    _one_line(result, "adapter_model.safetensors is not a readable safetensors file")


@pytest.mark.integration
def test_cli_resume_of_a_corrupted_checkpoint_is_one_line(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    folder = _state(out)
    (folder / "state.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "run.toml").write_text(
        f'base-model = "{tiny_model_dir}"\nquantization = "fp32"\n'
        f'output-dir = "{out}"\nresume = true\nsites = "mental"\n'
    )
    result = _cli("simulate", "--config", "run.toml", cwd=tmp_path)
    _one_line(result, "state.safetensors is not a readable safetensors file")


def test_an_interrupted_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    from fedlora.savedfiles import atomic_file

    path = tmp_path / "state" / "ledger.json"
    with atomic_file(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]
    with atomic_file(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new"
    with pytest.raises(ValueError, match="mode"), atomic_file(path, "a"):
        pass


def test_personal_state_written_twice_keeps_one_file(tmp_path):
    from fedlora.client.node import NodeSettings, load_personal, save_personal

    s = NodeSettings.from_config({"site": "pain", "personal-state-dir": str(tmp_path)})
    save_personal(s, {"b": np.ones((2, 3), np.float32)})
    save_personal(s, {"b": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(load_personal(s)["b"], np.zeros((2, 3)))
    assert [p.name for p in tmp_path.iterdir()] == ["pain.npz"]
