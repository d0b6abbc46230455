"""``fedlora-edge serve`` (fedlora.export.serve): what it serves, with which types, and what it
refuses, in one line each. A fake page and bundle (a few bytes each), a server thread on
127.0.0.1: no browser, no model (the real page in Chromium: tests/test_edge_browser.py)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora.edge_cli import main
from fedlora.errors import FedloraError
from fedlora.export.serve import PageServer, make_server


def _page(root: Path) -> Path:
    (root / "vendor").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>page</title>")
    (root / "app.mjs").write_text("export {};")
    (root / "vendor" / "ort.wasm").write_bytes(b"\0asm\1\0\0\0")
    return root


def _bundle(root: Path, variants: tuple[str, ...] = ("onnx-int8",)) -> Path:
    for name in variants:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"onnx:" + name.encode())
        (folder / "tokenizer.json").write_text("{}")
        (folder / "config.json").write_text(json.dumps({"variant": name}))
    (root / "secret.txt").write_text("not served")
    return root


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PageServer]:
    bundle = _bundle(tmp_path / "bundle", ("onnx-int8", "onnx-int4"))
    running = make_server(bundle, "int4", port=0, page=_page(tmp_path / "page"))
    thread = threading.Thread(target=running.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


def _get(server: PageServer, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.request("GET", path)  # sent as written: no client-side '..' normalisation
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_serves_the_page_and_the_chosen_variant_with_their_types(server: PageServer) -> None:
    # Execute
    page = _get(server, "/")
    wasm = _get(server, "/vendor/ort.wasm")
    module = _get(server, "/app.mjs")
    config = _get(server, "/model/config.json")
    model = _get(server, "/model/model.onnx")
    info = _get(server, "/fedlora-serve.json")

    # Assert: 127.0.0.1 only; the int4 folder at /model/; types a browser accepts for a
    # module and for WebAssembly streaming compilation; never cached across bundles
    assert server.server_address[0] == "127.0.0.1"
    assert page[0] == 200 and b"<title>page</title>" in page[2]
    assert wasm[1]["content-type"] == "application/wasm" and wasm[2].startswith(b"\0asm")
    assert module[1]["content-type"] == "text/javascript"
    assert json.loads(config[2]) == {"variant": "onnx-int4"}
    assert model[2] == b"onnx:onnx-int4"
    assert json.loads(info[2])["variant"] == "int4"
    assert all(r[1]["cache-control"] == "no-store" for r in (page, wasm, config, info))


@pytest.mark.parametrize(
    "path",
    ["/model/../secret.txt", "/model/%2e%2e/secret.txt", "/../bundle/secret.txt", "/vendor/"],
)
def test_nothing_outside_the_two_folders_and_no_listings(server: PageServer, path: str) -> None:
    status, _, body = _get(server, path)
    assert status == 404 and b"not served" not in body


def test_missing_bundle_variant_or_page_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    # Prepare
    page = _page(tmp_path / "page")
    bundle = _bundle(tmp_path / "bundle")  # int8 only

    # Execute / Assert
    with pytest.raises(FedloraError, match=r"no onnx-int4/model\.onnx.*--quantize int4"):
        make_server(bundle, "int4", page=page)
    with pytest.raises(FedloraError, match=r"is not a folder.*fedlora export"):
        make_server(tmp_path / "nowhere", "int8", page=page)
    with pytest.raises(FedloraError, match=r"page is not built.*`make edge-web`"):
        make_server(bundle, "int8", page=tmp_path / "unbuilt")
    (bundle / "onnx-int8" / "tokenizer.json").unlink()
    with pytest.raises(FedloraError, match=r"no tokenizer\.json"):
        make_server(bundle, "int8", page=page)


def test_cli_errors_are_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a bundle and page that serve, and a port already taken
    page, bundle = _page(tmp_path / "page"), _bundle(tmp_path / "bundle")
    taken = make_server(bundle, "int8", port=0, page=page)
    port = str(taken.server_address[1])

    # Execute
    codes = [
        main(["serve", str(tmp_path / "nowhere"), "--page", str(page)]),
        main(["serve", str(bundle), "--page", str(tmp_path / "unbuilt")]),
        main(["serve", str(bundle), "--page", str(page), "--port", port]),
    ]
    taken.server_close()

    # Assert
    lines = capsys.readouterr().err.strip().splitlines()
    assert codes == [2, 2, 2] and len(lines) == 3
    assert all(line.startswith("fedlora-edge: error: ") for line in lines)
    assert "make edge-web" in lines[1] and f"127.0.0.1:{port}" in lines[2]
    assert "give another --port" in lines[2]
