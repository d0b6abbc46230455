"""Each room imports only what it may: a fresh interpreter per room, checked through sys.modules.

- protocol/: the wire format needs numpy, Flower's record types and cryptography; never torch.
- server/: aggregates what nodes send; never imports client code (nor torch at import time).
- export/: merge and ONNX conversion; never Flower.
- export/runtime.py: the edge runtime; onnxruntime, tokenizers, numpy and jinja2 only.
- export/serve.py and the fedlora-edge command: the browser page's server; the stdlib only.
- deploy/: certificates, keys and Flower's command line tools; never torch nor the server.
- the shared package (fedlora/*.py, fedlora/data/): below every room; imports none of them.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedlora

SRC = Path(fedlora.__file__).parent
ROOMS = ("client", "server", "protocol", "export", "simulations", "deploy")


def _modules(package: str) -> list[str]:
    """Every module of ``fedlora.<package>`` (recursively), found on disk without importing."""
    root = SRC.joinpath(*package.split(".")[1:])
    names = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=f"{package}."):
        names.append(info.name)
    return sorted(names)


def _shared_modules() -> list[str]:
    top = [f"fedlora.{p.stem}" for p in SRC.glob("*.py") if p.stem not in ("__init__", "cli")]
    return sorted(["fedlora", *top, *_modules("fedlora.data")])


def _loaded_after_import(modules: list[str]) -> set[str]:
    """Top-level packages and fedlora subpackages in sys.modules after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "names = set()\n"
        "for m in sys.modules:\n"
        "    parts = m.split('.')\n"
        "    names.add(parts[0])\n"
        "    if parts[0] == 'fedlora' and len(parts) > 1: names.add('fedlora.' + parts[1])\n"
        "print(json.dumps(sorted(names)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("fedlora.protocol", {"torch", "transformers", "peft", "fedlora.client", "fedlora.server"}),
        ("fedlora.server", {"fedlora.client", "fedlora.simulations", "torch", "transformers"}),
        ("fedlora.export", {"flwr", "fedlora.server", "fedlora.client", "fedlora.simulations"}),
        (
            "fedlora.deploy",
            {"torch", "transformers", "peft", "fedlora.server", "fedlora.simulations"},
        ),
        (
            "fedlora.export.runtime",
            {"torch", "transformers", "flwr", "peft", "optimum", "fedlora.server"},
        ),
        ("fedlora.export.serve", {"torch", "numpy", "onnxruntime", "tokenizers", "onnx", "flwr"}),
    ],
)
def test_room_imports_only_what_it_may(room: str, forbidden: set[str]) -> None:
    modules = [room] if room.endswith(("runtime", "serve")) else _modules(room)
    loaded = _loaded_after_import(modules)
    assert not loaded & forbidden, f"{room} imports {sorted(loaded & forbidden)}"


def test_shared_package_imports_no_room() -> None:
    loaded = _loaded_after_import(_shared_modules())
    rooms = {f"fedlora.{r}" for r in ROOMS}
    assert not loaded & rooms, f"the shared package imports {sorted(loaded & rooms)}"
    assert "torch" not in loaded and "flwr" not in loaded


def test_the_check_sees_what_a_room_imports() -> None:
    """The mechanism itself: the wire format does load Flower, and the server the protocol."""
    loaded = _loaded_after_import(["fedlora.protocol.messages", "fedlora.server.app"])
    assert {"flwr", "numpy", "fedlora.protocol", "fedlora.server"} <= loaded
