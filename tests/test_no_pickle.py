"""No pickle anywhere (issue 37): fedlora never unpickles a file, nor bytes from the network.

A pickle can run any code when it is loaded, so an adapter folder, a checkpoint or a base model
from someone else must never reach ``pickle``, ``torch.load`` or ``np.load(allow_pickle=True)``.
This test scans every Python file of the project (the package, its rooms, the edge runtime and
the benchmarks) for them; the readers fedlora uses instead are in ``fedlora.readback``, and
pickled weights (``adapter_model.bin``, ``pytorch_model.bin``) are refused unopened.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
ROOMS = ("src", "client", "server", "protocol", "export", "simulations", "deploy", "edge")
FORBIDDEN = {
    r"\btorch\.load\s*\(": "torch.load unpickles",
    r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|shelve)\b": "a pickle library",
    r"\b(c?pickle|cloudpickle|dill|joblib)\.loads?\s*\(": "an unpickling call",
    r"allow_pickle\s*=\s*True": "np.load that unpickles",
    r"weights_only\s*=\s*False": "torch.load that unpickles",
    r"\bmarshal\.loads?\s*\(": "marshal runs code objects",
}


def _project_files() -> list[Path]:
    files: set[Path] = set()
    for room in (*ROOMS, "benchmarks"):
        folder = ROOT / room
        if folder.is_dir():
            files |= {p.resolve() for p in folder.rglob("*.py") if ".venv" not in p.parts}
    return sorted(files)


def _strip_docstrings_and_comments(text: str) -> str:
    text = re.sub(r'"""(?:.|\n)*?"""', '""', text)
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_the_scan_covers_the_project():
    names = {p.name for p in _project_files()}
    assert {"app.py", "readback.py", "merge.py", "state.py", "dp_ledger.py"} <= names


def test_no_file_is_unpickled_anywhere():
    found = []
    for path in _project_files():
        code = _strip_docstrings_and_comments(path.read_text(encoding="utf-8"))
        for pattern, why in FORBIDDEN.items():
            for match in re.finditer(pattern, code, flags=re.MULTILINE):
                line = code.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT.resolve())}:{line}: {why}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "sample", ["torch.load(path)", "import pickle", "np.load(f, allow_pickle=True)"]
)
def test_the_scan_finds_what_it_looks_for(sample):
    assert any(re.search(p, sample, flags=re.MULTILINE) for p in FORBIDDEN)


def test_a_model_folder_with_only_pickled_weights_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from fedlora.basemodel import check_model_dir
    from fedlora.errors import ModelError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.rename(model / "pytorch_model.bin")
    with pytest.raises(ModelError, match="a pickle .* convert it to safetensors"):
        check_model_dir(model)


def test_npz_state_is_read_without_pickle(tmp_path):
    from fedlora.errors import FileFormatError
    from fedlora.readback import load_npz

    np.savez(tmp_path / "x.npz", b=np.array([object()], dtype=object))
    with pytest.raises(FileFormatError, match="pickle"):
        load_npz(tmp_path / "x.npz", "move it aside")
