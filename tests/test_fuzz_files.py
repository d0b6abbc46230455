"""Fuzzing the files fedlora reads back (issue 37): data files, checkpoints and the resume that
uses them, a node's DP ledger and personal state, an adapter folder for export. Each input is a
valid file with one part corrupted, or arbitrary bytes or JSON in its place; reading it (and, for
a checkpoint that loads, resuming from it) must end in acceptance or a typed one-line error.
Harness: tests/fuzzing.py.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from fedlora.client import dp_ledger
from fedlora.client.node import NodeSettings, load_personal
from fedlora.data.formats import DataSpec, load_examples
from fedlora.export.merge import check_adapter_dir, merge_adapter
from fedlora.lora import LoraSettings
from fedlora.server.checkpoint import save_adapter
from fedlora.server.state import ServerState, check_resumable, load_state, save_state
from fedlora.server.strategies import OptimizerState, ServerOptimizer
from fedlora.server.strategies.optimizers import step
from fuzzing import outcome

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_texts = st.one_of(
    st.integers(1, 20_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 20_000).map(lambda n: "[" * n),
    st.integers(1, 9_000).map(lambda n: "9" * n),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "null", "[]", "{}", '""', "\x00"]),
    st.text(max_size=40),
)
random_bytes = st.binary(max_size=400)


def _json_text(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(hostile_texts)
    return json.dumps(draw(json_values), allow_nan=True)


@st.composite
def file_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` cut, grown, with one byte flipped, replaced by JSON-ish text, or random."""
    kind = draw(st.sampled_from(["cut", "grown", "flipped", "json", "random", "valid"]))
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid)))]
    if kind == "grown":
        return valid + draw(st.binary(min_size=1, max_size=64))
    if kind == "flipped":
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1 :]
    if kind == "json":
        return _json_text(draw).encode("utf-8", "surrogatepass")
    if kind == "random":
        return draw(random_bytes)
    return valid


# ---- data files ------------------------------------------------------------------------------

RECORD = '{"prompt": "How was it?", "response": "positive", "site": "a"}'


@st.composite
def data_lines(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["valid", "json", "hostile", "field"]))
        if kind == "valid":
            lines.append(RECORD)
        elif kind == "field":
            value = json.dumps(draw(json_values), allow_nan=True)
            key = draw(st.sampled_from(["prompt", "response", "messages", "site", "x"]))
            lines.append(RECORD[:-1] + f', "{key}": {value}}}')
        else:
            lines.append(_json_text(draw) if kind == "json" else draw(hostile_texts))
    return "\n".join(line.replace("\n", " ") for line in lines)


@pytest.mark.fuzz
@given(
    text=data_lines(),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]),
    mode=st.sampled_from(["stop", "skip"]),
    raw=st.one_of(st.none(), random_bytes),
)
def test_fuzz_data_files(text, suffix, mode, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(raw if raw is not None else text.encode("utf-8", "surrogatepass"))
        with outcome("data-file"):
            load_examples(DataSpec(str(path), on_bad_record=mode))


# ---- checkpoints and resume ------------------------------------------------------------------


def _checkpoint(out: Path) -> Path:
    moments = {n: np.zeros((2, 2)) for n in (A, B)}
    save_state(
        out,
        ServerState(
            completed_round=2,
            global_adapter={n: np.ones((2, 2), np.float32) for n in (A, B)},
            optimizer=OptimizerState(num_steps=2, m=moments, v=moments),
            history=[{"round": 1}, {"round": 2}],
            settings={"seed": 0},
            python_random=random.getstate(),
        ),
    )
    return out / "server-state"


array_values = st.one_of(
    st.sampled_from([np.float32, np.float64, np.int64, np.float16, np.int8]).map(
        lambda t: np.ones((2, 2), t)
    ),
    st.just(np.full((2, 2), np.nan, np.float32)),
    st.just(np.full((2, 2), np.inf)),
    st.sampled_from([(3,), (2, 3), (), (0,), (1, 2, 2)]).map(lambda s: np.zeros(s, np.float32)),
)
array_names = st.sampled_from(
    [f"global/{A}", f"optimizer/m/{A}", f"optimizer/v/{B}", "optimizer/step", f"residual/{A}", "x"]
)
meta_keys = st.sampled_from(["completed-round", "history", "settings", "python-random"])


@st.composite
def checkpoint_changes(draw: st.DrawFn) -> tuple[str, object, object]:
    part = draw(st.sampled_from(["json-field", "json-file", "arrays-file", "array", "drop"]))
    if part == "json-field":
        return part, draw(meta_keys), draw(json_values)
    if part == "array":
        return part, draw(array_names), draw(array_values)
    if part == "drop":
        return part, draw(array_names), None
    return part, None, None


def _change_checkpoint(folder: Path, change: tuple[str, object, object], draw_bytes) -> None:
    part, key, value = change
    if part == "json-field":
        meta = json.loads((folder / "state.json").read_text())
        meta[key] = value
        (folder / "state.json").write_text(json.dumps(meta, allow_nan=True))
    elif part == "json-file":
        (folder / "state.json").write_bytes(draw_bytes((folder / "state.json").read_bytes()))
    elif part == "arrays-file":
        data = (folder / "state.safetensors").read_bytes()
        (folder / "state.safetensors").write_bytes(draw_bytes(data))
    else:
        from safetensors.numpy import load_file

        arrays = load_file(str(folder / "state.safetensors"))
        arrays.pop(str(key), None)
        if part == "array":
            arrays[str(key)] = value
        save_file(arrays, str(folder / "state.safetensors"))


def _resume(out: Path) -> None:
    """What a resume does with a checkpoint that loads: check its settings, restore Python's
    random state and take one server optimizer step from it."""
    saved = load_state(out)
    if saved is None:
        return
    check_resumable(saved.settings, saved.settings, out)
    before = random.getstate()
    try:
        if saved.python_random is not None:
            random.setstate(saved.python_random)
    finally:
        random.setstate(before)
    zero = {k: np.zeros_like(v) for k, v in saved.global_adapter.items()}
    step(saved.global_adapter, zero, saved.optimizer, ServerOptimizer(kind="adam"))


@pytest.mark.fuzz
@given(change=checkpoint_changes(), data=st.data())
def test_fuzz_checkpoint_and_resume(change, data):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        folder = _checkpoint(out)
        _change_checkpoint(folder, change, lambda valid: data.draw(file_bytes(valid)))
        with outcome("checkpoint-resume"):
            _resume(out)


# ---- the DP ledger and personal state --------------------------------------------------------

LEDGER = dp_ledger.NodeLedger(
    charges=[dp_ledger.Charge(round=1, noise_multiplier=1.0, expected_clients=3, clip_norm=1.0)]
).to_json({"epsilon": 1.0, "epsilon-alone": 2.0})


@st.composite
def ledger_texts(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        data = json.loads(LEDGER)
        where = draw(st.sampled_from(["version", "delta", "charges", "charge"]))
        if where == "charge":
            field = draw(
                st.sampled_from(["round", "noise_multiplier", "expected_clients", "clip_norm"])
            )
            data["charges"][0][field] = draw(json_values)
        else:
            data[where] = draw(json_values)
        return json.dumps(data, allow_nan=True).encode()
    return draw(file_bytes(LEDGER.encode()))


@pytest.mark.fuzz
@given(content=ledger_texts(), folder=st.booleans())
def test_fuzz_dp_ledger(content, folder):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dp-ledger.json"
        if folder:
            path.mkdir()
        else:
            path.write_bytes(content)
        settings = dp_ledger.LedgerSettings(path=str(path), max_epsilon=50.0)
        charge = dp_ledger.Charge(round=2, noise_multiplier=1.0, expected_clients=3, clip_norm=1.0)
        with outcome("dp-ledger"):
            dp_ledger.check_budget(settings, None, charge)


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


PERSONAL = _npz(**{B: np.ones((2, 2), np.float32)})
personal_values = st.one_of(
    array_values,
    st.just(np.array([{"x": 1}], dtype=object)),
    st.just(np.array(["text"])),
)


@st.composite
def personal_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["array", "npy", "bytes"]))
    if kind == "array":
        value = draw(personal_values)
        buffer = io.BytesIO()
        np.savez(buffer, **{B: value}, allow_pickle=value.dtype.hasobject)
        return buffer.getvalue()
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ones((2, 2), np.float32))
        return buffer.getvalue()
    return draw(file_bytes(PERSONAL))


@pytest.mark.fuzz
@given(content=personal_files())
def test_fuzz_personal_state(content):
    with tempfile.TemporaryDirectory() as tmp:
        settings = NodeSettings.from_config({"site": "pain", "personal-state-dir": tmp})
        (Path(tmp) / "pain.npz").write_bytes(content)
        with outcome("personal-state"):
            load_personal(settings)


# ---- an adapter folder for export ------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir: Path):
    """A valid adapter folder's files, written once."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(
            {A: np.zeros((4, 64), np.float32)},
            Path(tmp) / "adapter",
            LoraSettings(r=4, alpha=8.0),
            tiny_model_dir,
        )
        yield {p.name: p.read_bytes() for p in folder.iterdir()}


ADAPTER_CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "peft_type",
    "lora_dropout",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "bias",
    "fan_in_fan_out",
    "init_lora_weights",
    "base_model_name_or_path",
    "task_type",
]


@st.composite
def adapter_changes(draw: st.DrawFn) -> tuple[str, object]:
    part = draw(st.sampled_from(["config-field", "config-file", "weights", "tensor", "bin"]))
    if part == "config-field":
        key = draw(
            st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "lora_dropout"])
        )
        return part, (key, draw(json_values))
    if part == "tensor":
        return part, draw(array_values)
    return part, None


@pytest.mark.fuzz
@given(change=adapter_changes(), data=st.data())
def test_fuzz_export_adapter_folder(tiny_model_dir, adapter_files, change, data):
    part, value = change
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, content in adapter_files.items():
            (folder / name).write_bytes(content)
        config = folder / "adapter_config.json"
        weights = folder / "adapter_model.safetensors"
        if part == "config-field":
            key, new = value
            values = json.loads(config.read_text()) | {key: new}
            config.write_text(json.dumps(values, allow_nan=True))
        elif part == "config-file":
            config.write_bytes(data.draw(file_bytes(config.read_bytes())))
        elif part == "weights":
            weights.write_bytes(data.draw(file_bytes(weights.read_bytes())))
        elif part == "tensor":
            save_file({A: value}, str(weights))
        else:
            weights.rename(folder / "adapter_model.bin")
        with outcome("export-adapter-folder"):
            check_adapter_dir(folder)
            merge_adapter(tiny_model_dir, folder, Path(tmp) / "merged")  # tiny: ~70 ms
