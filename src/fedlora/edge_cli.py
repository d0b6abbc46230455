"""``fedlora-edge``: answer a prompt or hold a chat with an exported ONNX model, without torch.

Installed by both distributions: the full ``fedlora`` and the edge-only ``fedlora-edge``
(``edge/``: numpy, onnxruntime, tokenizers and jinja2, nothing else). Imports nothing but
:mod:`fedlora.export.runtime`, :mod:`fedlora.export.serve` (stdlib only) and
:mod:`fedlora.errors`.

Usage::

    fedlora-edge generate --model runs/edge/onnx-int8 "Is this review positive? ..."
    fedlora-edge chat --model runs/edge/onnx-int8          # one user turn per line; empty line ends
    fedlora-edge generate --model runs/base/onnx-int8 --adapter runs/site-a "..."  # on-device LoRA
    fedlora-edge serve runs/edge --variant int4    # the browser page on http://127.0.0.1:8000/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fedlora.errors import FedloraError


def _parser() -> argparse.ArgumentParser:
    from fedlora.export.serve import VARIANTS  # stdlib only

    ap = argparse.ArgumentParser(prog="fedlora-edge", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("generate", "answer one prompt (a user turn) and exit"),
        ("chat", "a conversation: one user turn per line on stdin, an empty line ends it"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", type=Path, required=True, help="an exported ONNX folder")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--system", default="", help="a system prompt")
        p.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
        p.add_argument(
            "--adapter",
            type=Path,
            default=None,
            help="an adapter file (fedlora export --adapter-only) for a --base-only model",
        )
        if name == "generate":
            p.add_argument("prompt", help="the user's message")
    serve = sub.add_parser(
        "serve",
        help="the browser page (onnxruntime-web, transformers.js) and a bundle on 127.0.0.1",
    )
    serve.add_argument("bundle", type=Path, help="a bundle (fedlora export --output) or a variant")
    serve.add_argument("--variant", choices=list(VARIANTS), default="int8")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port")
    serve.add_argument(
        "--page", type=Path, default=None, help="a built page folder (default: make edge-web's)"
    )
    return ap


def serve(args: argparse.Namespace, out: TextIO) -> None:
    """Serve the page and the bundle's variant until interrupted; prints the address."""
    from fedlora.export.serve import make_server

    try:
        server = make_server(args.bundle, args.variant, args.port, args.page)
    except OSError as exc:  # the port is taken, or not ours to bind
        raise FedloraError(
            f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror}): give another --port"
        ) from None
    print(f"serving {server.model_dir} on {server.url} (Ctrl-C stops)", file=out)
    out.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def chat(model: Any, lines: TextIO, out: TextIO, system: str, max_new_tokens: int) -> int:
    """Alternate user turns read from ``lines`` with the model's answers; returns the turns."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = 0
    for line in lines:
        text = line.strip()
        if not text:
            break
        history.append({"role": "user", "content": text})
        answer = model.generate(history, max_new_tokens).text
        history.append({"role": "assistant", "content": answer})
        print(answer, file=out, flush=True)
        turns += 1
    return turns


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve" and args.max_new_tokens < 1:
        print(
            f"fedlora-edge: error: --max-new-tokens {args.max_new_tokens}: must be >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "serve":
            serve(args, sys.stdout)
            return 0
        from fedlora.export.runtime import EdgeModel

        model = EdgeModel(args.model, num_threads=args.threads, adapter=args.adapter)
        if args.command == "generate":
            turns = [{"role": "system", "content": args.system}] if args.system else []
            turns.append({"role": "user", "content": args.prompt})
            print(model.generate(turns, args.max_new_tokens).text)
        else:
            chat(model, sys.stdin, sys.stdout, args.system, args.max_new_tokens)
    except FedloraError as exc:
        print(f"fedlora-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
