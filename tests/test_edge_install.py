"""The torch-free edge install: ``pip install ./edge`` in a fresh virtual environment.

Builds a new venv (no system site-packages), installs only the ``fedlora-edge`` distribution
(numpy, onnxruntime, tokenizers, jinja2 and fedlora's edge subset), checks that torch,
transformers and Flower are absent there, and answers a prompt and a two-turn chat with
``fedlora-edge`` on a tiny model exported by the full installation; the answer must be the one
the full installation's runtime gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a venv and a package install: about a minute

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Is this drug review positive? It helped a lot."


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("edge-env")
    source = root / "edge-src"
    # links resolved: a standalone source (without the browser page's npm packages, edge/web)
    shutil.copytree(
        REPO / "edge", source, symlinks=False, ignore=shutil.ignore_patterns("node_modules")
    )
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return env_dir


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a random LoRA merged in (its greedy text varies), exported."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedlora.export.merge import merge_adapter
    from fedlora.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("tiny-onnx")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(root / "lora")
    merged = merge_adapter(tiny_model_dir, root / "lora", root / "merged")
    return export_onnx(merged, root / "onnx")


def _run(env_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
    # Bytes, decoded here: text mode would turn a generated "\r" into "\n" (universal newlines).
    raw = subprocess.run(
        list(args), input=stdin.encode(), capture_output=True, timeout=300, env=env, check=False
    )
    return subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode("utf-8"), raw.stderr.decode("utf-8", "replace")
    )


def test_the_edge_environment_has_no_torch_transformers_or_flower(edge_env: Path) -> None:
    python = str(edge_env / "bin" / "python")
    for module in ("torch", "transformers", "flwr", "peft", "optimum"):
        result = _run(edge_env, python, "-c", f"import {module}")
        assert result.returncode != 0 and "No module named" in result.stderr, module
    ok = _run(edge_env, python, "-c", "import onnxruntime, tokenizers, numpy, jinja2")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_fedlora_edge_generates_what_the_full_runtime_generates(
    edge_env: Path, tiny_onnx: Path
) -> None:
    from fedlora.export.runtime import EdgeModel

    expected = EdgeModel(tiny_onnx).generate([{"role": "user", "content": PROMPT}], 12).text
    cmd = str(edge_env / "bin" / "fedlora-edge")
    result = _run(
        edge_env, cmd, "generate", "--model", str(tiny_onnx), "--max-new-tokens", "12", PROMPT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected.strip() and result.stdout == expected + "\n"

    chat = _run(
        edge_env,
        cmd,
        "chat",
        "--model",
        str(tiny_onnx),
        "--max-new-tokens",
        "6",
        stdin="hello\nand again\n\nnot read\n",
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert len(chat.stdout.splitlines()) >= 2

    missing = _run(edge_env, cmd, "generate", "--model", str(tiny_onnx.parent / "nope"), "hi")
    assert missing.returncode == 2
    assert missing.stderr.startswith("fedlora-edge: error: ") and "model.onnx" in missing.stderr


def test_fedlora_edge_serves_the_browser_page_it_ships(edge_env: Path, tiny_onnx: Path) -> None:
    """The page built in the checkout (make edge-web) installs with fedlora-edge (package data)
    and ``fedlora-edge serve`` serves it with the vendored WebAssembly runtime."""
    import urllib.request

    from fedlora.export.serve import PAGE_DIR

    if not (PAGE_DIR / "index.html").is_file():
        pytest.skip(f"the browser page is not built ({PAGE_DIR}): run `make edge-web`")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    command = [str(edge_env / "bin" / "fedlora-edge"), "serve", str(tiny_onnx), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split(" on ", 1)[1].split()[0]
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b'src="./app.js"' in page.read()
        with urllib.request.urlopen(f"{url}vendor/ort-wasm-simd-threaded.wasm", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/wasm" and r.read(4) == b"\0asm"
        with urllib.request.urlopen(f"{url}model/config.json", timeout=10) as config:
            assert config.read() == (tiny_onnx / "config.json").read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=10)
