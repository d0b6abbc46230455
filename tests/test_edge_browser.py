"""The bundle answering in a real browser: ``fedlora-edge serve`` and the page in headless Chromium.

A tiny model with a random LoRA merged in is exported as a bundle (fused fp32, int8, int4, and
the int8 graph without ``position_ids`` as bundles exported before 5 December 2026 are);
``fedlora-edge serve`` serves each and the built page (``make edge-web``) on 127.0.0.1;
Debian's Chromium, driven by Playwright, types a held-out drug review into the page and presses
Answer. The page (onnxruntime-web on WebAssembly, transformers.js's tokenizer and
chat template) must give the prompt token ids and the greedy tokens ``EdgeModel`` gives for the
same prompt and max_new_tokens, and fetch nothing from another origin. The page's tokens/s is
reported (``-rA`` or ``-s`` shows it; also a junit property).

The variants are quantized with fp32 compute (``--accuracy-level 1``): WebAssembly's MatMulNBits
computes in fp32 whatever the level, while native onnxruntime on x86 quantizes the activations
to int8 at the default level 4, and the tiny random model's logits are so flat (top-2 gaps of
1e-3) that this alone changes its greedy tokens (at level 4: 2 of 20 reviews equal for int8, 8
of 20 for int4; at level 1: 20 of 20 for fp32, int8 and int4; docs/edge.md, "In the browser").

Skips, naming the setup command, only when Chromium or the built page is absent (.ci/run
installs both before ``make test``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedlora.export.serve import PAGE_DIR
from fedlora.prompting import messages

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package
# headless, and none of Chromium's own connections (the machine's network is closed)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_NEW_TOKENS = 16


def _missing() -> str:
    if not CHROMIUM.is_file():
        return f"no {CHROMIUM}: `apt-get install -y chromium` (Debian's package; .ci/run does)"
    if not (PAGE_DIR / "index.html").is_file():
        return f"the browser page is not built ({PAGE_DIR}): run `make edge-web`"
    return ""


pytestmark = [
    pytest.mark.integration,  # a tiny export and a headless browser: seconds
    pytest.mark.skipif(bool(_missing()), reason=_missing()),
]


@pytest.fixture(scope="module")
def bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle as ``fedlora export`` lays it out: onnx/ (fused fp32), onnx-int8/, onnx-int4/.
    Seeded (peft draws LoRA A from torch's global generator) so that the greedy answer to the
    review varies token by token and differs between int8 and int4."""
    import torch

    from fedlora.export.merge import merge_adapter
    from fedlora.export.onnx import export_onnx
    from fedlora.export.quantize import QuantSettings, quantize_variant
    from test_export import _make_adapter
    from test_genai_bundle import _strip_position_ids

    root = tmp_path_factory.mktemp("browser-bundle")
    torch.manual_seed(0)
    _make_adapter(tiny_model_dir, root / "lora", r=4, b_scale=1.0, seed=1)
    merged = merge_adapter(tiny_model_dir, root / "lora", root / "merged")
    fp32 = export_onnx(merged, root / "onnx", graph="fused")
    for variant in ("int8", "int4"):
        quantize_variant(fp32, root / f"onnx-{variant}", variant, QuantSettings(accuracy_level=1))
    _strip_position_ids(root / "onnx-int8", root / "legacy-int8")  # a bundle of before 5 Dec
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def served(bundle: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """``fedlora-edge serve BUNDLE --variant V --port 0`` (or ``serve FOLDER`` for a variant's
    folder: the legacy one) in its own process; yields its URL."""
    legacy = request.param.startswith("legacy")
    target = bundle / request.param if legacy else bundle
    command = [sys.executable, "-m", "fedlora.edge_cli", "serve", str(target), "--port", "0"]
    variant = [] if legacy else ["--variant", request.param]
    server = subprocess.Popen([*command, *variant], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "serving FOLDER on http://127.0.0.1:PORT/ ..."
        assert " on http://127.0.0.1:" in line, line
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        server.terminate()
        server.wait(timeout=10)


def _ask(browser: Any, url: str, prompt: str) -> tuple[dict[str, Any], str, list[str]]:
    """Load the page, type ``prompt``, press Answer: the page's result, its answer, the URLs
    it fetched."""
    page = browser.new_page()
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready], #status[data-state=error]", timeout=60_000)
    assert page.get_attribute("#status", "data-state") == "ready", page.text_content("#status")
    page.fill("#prompt", prompt)
    page.fill("#max-new-tokens", str(MAX_NEW_TOKENS))
    page.click("#ask")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=60_000)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")
    result = page.evaluate("window.fedloraLast")
    answer = page.text_content("#answer") or ""
    page.close()
    return result, answer, fetched


# legacy-int8: the int8 graph without position_ids, as exported before 5 December 2026
@pytest.mark.parametrize("served", ["int8", "int4", "legacy-int8"], indirect=True)
def test_the_page_answers_a_held_out_prompt_as_edge_model_does(
    browser: Any, served: str, bundle: Path, record_property: Any
) -> None:
    # Prepare: a held-out review (the test split) and the Python runtime's greedy answer
    from fedlora.data.drugreview import load_split
    from fedlora.export.runtime import EdgeModel

    with urllib.request.urlopen(f"{served}fedlora-serve.json", timeout=10) as response:
        info = json.load(response)  # the variant served, and its folder
    turns = messages(load_split("test")[0].text)
    edge = EdgeModel(Path(info["model"]))
    prompt_ids = edge.encode(edge.render(turns))
    expected = edge.generate_ids(prompt_ids, MAX_NEW_TOKENS)
    assert len(set(expected)) >= 4, expected  # an answer that can tell a broken decode apart
    inputs = {i.name for i in edge.session.get_inputs()}
    assert ("position_ids" in inputs) != info["variant"].startswith("legacy"), inputs

    # Execute
    result, answer, fetched = _ask(browser, served, turns[0]["content"])

    # Assert: the same prompt ids, greedy tokens and text, and nothing from another origin
    assert result["promptIds"] == prompt_ids
    assert result["tokens"] == expected
    assert answer == result["text"] == edge.decode(expected)
    assert all(u.startswith(served) for u in fetched), [u for u in fetched if served not in u]
    rate = result["decodeTokensPerSecond"]
    record_property(f"browser_decode_tokens_per_s_{info['variant']}", rate)
    print(f"\nbrowser {info['variant']}: {len(expected)} tokens, decode {rate:.1f} tokens/s")
