"""``fedlora-edge serve``: the browser page and one bundle variant on 127.0.0.1 (stdlib only).

The page (``edge/web/``, built by ``make edge-web`` into ``fedlora/export/web/``: an index, a
small module and the vendored onnxruntime-web and transformers.js) answers a prompt on the
device: onnxruntime-web (WebAssembly) runs the variant's ``model.onnx``, transformers.js
tokenizes and applies the chat template. This module only serves files: the page at ``/``,
the variant's folder (``model.onnx``, tokenizer and config files) at ``/model/``, and
``/fedlora-serve.json`` (which variant of which bundle), each with its MIME type (``.wasm``
as ``application/wasm``, ``.mjs`` as JavaScript) and ``Cache-Control: no-store``. No
directory listings. Like the runtime it needs no torch; unlike it, not even numpy.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the device itself: never another interface
PAGE_DIR = Path(__file__).resolve().parent / "web"
MODEL_PREFIX = "/model/"
INFO_PATH = "/fedlora-serve.json"
VARIANTS = {"int8": "onnx-int8", "int4": "onnx-int4", "fp32": "onnx"}
BUILD_PAGE = "make edge-web"  # in a checkout; then reinstall ./edge for fedlora-edge alone
MIME = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".jinja": "text/plain; charset=utf-8",
    ".onnx": "application/octet-stream",
    ".md": "text/plain; charset=utf-8",
}


def variant_dir(bundle: Path, variant: str) -> Path:
    """The folder of ``variant`` in ``bundle`` (``onnx-int8``, ...), or ``bundle`` itself when
    it holds a ``model.onnx``. FedloraError (one line) when there is none."""
    bundle = Path(bundle)
    if variant not in VARIANTS:
        raise FedloraError(f"--variant {variant}: use one of {', '.join(VARIANTS)}")
    if not bundle.is_dir():
        raise FedloraError(
            f"{bundle} is not a folder: give a bundle written by `fedlora export --output`"
        )
    if (bundle / "model.onnx").is_file():
        return bundle
    folder = bundle / VARIANTS[variant]
    if not (folder / "model.onnx").is_file():
        raise FedloraError(
            f"{bundle} has no {VARIANTS[variant]}/model.onnx: export the {variant} variant "
            f"with `fedlora export --quantize {variant}` or serve another --variant"
        )
    if not (folder / "tokenizer.json").is_file():
        raise FedloraError(
            f"{folder} has no tokenizer.json: re-export the bundle (the page tokenizes in the "
            f"browser with the bundle's tokenizer files)"
        )
    return folder


def page_dir(page: Path | None = None) -> Path:
    """The built page (``page`` or the package's ``web/`` folder); FedloraError (one line,
    naming the command that builds it) when it has no ``index.html`` or vendored runtime."""
    folder = Path(page) if page is not None else PAGE_DIR
    if not (folder / "index.html").is_file() or not (folder / "vendor").is_dir():
        raise FedloraError(
            f"the browser page is not built ({folder} has no index.html and vendor/): run "
            f"`{BUILD_PAGE}` in a checkout of fedlora (then reinstall ./edge for fedlora-edge)"
        )
    return folder


class _Handler(SimpleHTTPRequestHandler):
    """Serves the page's folder at / and the variant's folder at /model/."""

    def __init__(self, *args: Any, page: Path, model: Path, info: bytes) -> None:
        self.page_root, self.model_root, self.info = str(page), str(model), info
        self.extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}
        super().__init__(*args, directory=self.page_root)  # handles the request

    def translate_path(self, path: str) -> str:
        # the stdlib's own normalisation (no '..' out of the root), rooted at the variant's
        # folder for /model/ and at the page's otherwise
        self.directory = self.page_root
        if path.startswith(MODEL_PREFIX):
            self.directory = self.model_root
            path = path[len(MODEL_PREFIX) - 1 :]
        return super().translate_path(path)

    def list_directory(self, path: Any) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "No listings")
        return None

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == INFO_PATH:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.info)))
            self.end_headers()
            self.wfile.write(self.info)
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class PageServer(ThreadingHTTPServer):
    """The HTTP server of :func:`make_server`: ``model_dir`` is the variant's folder served."""

    daemon_threads = True

    def __init__(self, port: int, page: Path, model: Path, label: str) -> None:
        self.model_dir = model
        info = json.dumps({"variant": label, "model": str(model)}).encode()
        super().__init__((HOST, port), partial(_Handler, page=page, model=model, info=info))

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


def make_server(
    bundle: Path, variant: str = "int8", port: int = 0, page: Path | None = None
) -> PageServer:
    """An HTTP server on 127.0.0.1:``port`` (0: a free one) for the page and ``variant`` of
    ``bundle`` (or ``bundle`` itself when it is a variant's folder); call ``serve_forever()``
    on it. OSError when the port cannot be bound."""
    model = variant_dir(bundle, variant)
    label = variant if model != Path(bundle) else model.name
    return PageServer(port, page_dir(page), model, label)
