"""The edge runtime: an exported ONNX causal LM on numpy, onnxruntime, tokenizers and jinja2 only.

This module must stay importable on a device that has no torch, no transformers and no Flower.
It imports nothing from fedlora except :mod:`fedlora.errors` (stdlib only), so
``import fedlora.export.runtime`` pulls in numpy, onnxruntime, tokenizers and jinja2 and nothing
heavier.

An exported folder (see :func:`fedlora.export.onnx.export_onnx`) holds ``model.onnx`` with inputs
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key|value`` (shape
``[batch, kv_heads, past_len, head_dim]``) and outputs ``logits`` and ``present.{i}.key|value``,
beside ``tokenizer.json``, ``tokenizer_config.json`` (and/or ``chat_template.jinja``),
``config.json`` and ``generation_config.json``.

The chat template is rendered the way ``transformers``' ``apply_chat_template`` does it: a
sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, a non-escaping ``tojson`` filter, ``raise_exception`` and ``strftime_now`` globals,
and the tokenizer's special tokens as template variables.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
import onnxruntime as ort
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from fedlora.errors import FedloraError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_PAST_NAME = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass
class GenerationResult:
    """Greedy output: the decoded text (special tokens skipped) and the new token ids (eos kept)."""

    text: str
    token_ids: list[int] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedloraError(f"{path} is not valid JSON ({exc}): re-export the model") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as saved by transformers: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _is_count(value: Any) -> bool:
    """A non-negative int as JSON gives it (``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _as_id_list(value: Any, where: str) -> list[int]:
    """Token ids saved as one int or a list of ints; anything else is a bad export."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(map(_is_count, values)):
        raise FedloraError(
            f"{where} is {value!r}, not a token id or a list of them: re-export the model"
        )
    return list(values)


def _config_int(config: dict[str, Any], key: str, where: Path) -> int:
    """A size from config.json (0 when absent); anything but a non-negative int is refused."""
    value = config.get(key)
    if value is None:
        return 0
    if not _is_count(value):
        raise FedloraError(f"{where} '{key}' is {value!r}, not a size: re-export the model")
    return value


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment transformers uses for apply_chat_template."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


class EdgeModel:
    """An exported causal LM on onnxruntime (CPU) with its tokenizer and chat template.

    ``adapter``: an adapter file for an adaptable base (:mod:`fedlora.export.adapter`), applied
    to every request until :meth:`set_adapter` switches it."""

    def __init__(
        self, model_dir: Path, num_threads: int | None = None, adapter: Path | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        onnx_file = self.model_dir / MODEL_FILE
        if not onnx_file.is_file():
            raise FedloraError(
                f"{self.model_dir} has no {MODEL_FILE}: give the folder written by the ONNX export"
            )
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FedloraError(
                f"{self.model_dir} has no tokenizer.json: copy the tokenizer "
                f"files beside {MODEL_FILE}"
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.config = _read_json(self.model_dir / "config.json")
        self.generation_config = _read_json(self.model_dir / "generation_config.json")
        self.tokenizer_config = _read_json(self.model_dir / "tokenizer_config.json")
        self._template = _compile_chat_template(self._chat_template_source())
        self._template_vars = self._special_tokens()
        self.eos_token_ids = self._eos_ids()

        options = ort.SessionOptions()
        # an adaptable base warns once per LoRA slot that overridable initializers are not
        # constant-folded (by design); errors still raise
        options.log_severity_level = 3
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(
            str(onnx_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._past_specs = self._read_past_specs()
        self.adapter: Path | None = None
        self._run_options: ort.RunOptions | None = None
        self._lora: ort.LoraAdapter | None = None  # kept alive while _run_options point at it
        if adapter is not None:
            self.set_adapter(adapter)
        log.info(
            "Loaded %s: %d layers of KV cache, eos ids %s",
            onnx_file,
            len(self._past_specs) // 2,
            self.eos_token_ids,
        )

    # ---- loading ---------------------------------------------------------------------------
    def _chat_template_source(self) -> str:
        # transformers >= 4.47 saves the template to chat_template.jinja, which then takes
        # precedence over tokenizer_config.json's "chat_template"; older saves only have the key.
        jinja_file = self.model_dir / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            raise FedloraError(
                f"{self.model_dir} has no chat template (tokenizer_config.json "
                f"'chat_template' or {CHAT_TEMPLATE_FILE}): export a model whose "
                f"tokenizer carries one"
            )
        return template

    def _special_tokens(self) -> dict[str, Any]:
        """The template variables transformers passes: bos_token, eos_token, ... as strings."""
        saved_map = _read_json(self.model_dir / "special_tokens_map.json")
        tokens: dict[str, Any] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            text = _token_text(self.tokenizer_config.get(key)) or _token_text(saved_map.get(key))
            if text is not None:
                tokens[key] = text
        extra = (
            self.tokenizer_config.get("additional_special_tokens")
            or saved_map.get("additional_special_tokens")
            or []
        )
        tokens["additional_special_tokens"] = [t for t in map(_token_text, extra) if t]
        return tokens

    def _eos_ids(self) -> list[int]:
        ids = _as_id_list(
            self.generation_config.get("eos_token_id"),
            f"{self.model_dir / 'generation_config.json'} 'eos_token_id'",
        )
        if not ids:
            ids = _as_id_list(
                self.config.get("eos_token_id"), f"{self.model_dir / 'config.json'} 'eos_token_id'"
            )
        if not ids:
            eos = self._template_vars.get("eos_token")
            token_id = self.tokenizer.token_to_id(eos) if eos else None
            ids = [token_id] if token_id is not None else []
        if not ids:
            raise FedloraError(
                f"{self.model_dir}: no eos_token_id in generation_config.json or "
                f"config.json: re-export with the model's generation config"
            )
        return ids

    def _read_past_specs(self) -> list[tuple[str, str, tuple[int, int], type]]:
        """(input name, output name, (kv_heads, head_dim), dtype) per past_key_values input."""
        where = self.model_dir / "config.json"
        attention_heads = _config_int(self.config, "num_attention_heads", where)
        heads_default = _config_int(self.config, "num_key_value_heads", where) or attention_heads
        head_dim_default = _config_int(self.config, "head_dim", where)
        if not head_dim_default and attention_heads:
            head_dim_default = _config_int(self.config, "hidden_size", where) // attention_heads
        specs: list[tuple[str, str, tuple[int, int], type]] = []
        for node in self.session.get_inputs():
            match = _PAST_NAME.match(node.name)
            if not match:
                continue
            shape = list(node.shape)
            heads = shape[1] if isinstance(shape[1], int) else heads_default
            head_dim = shape[3] if isinstance(shape[3], int) else head_dim_default
            if not heads or not head_dim:
                raise FedloraError(
                    f"{self.model_dir}: cannot tell the KV-cache shape of "
                    f"{node.name} ({shape}) from the model or config.json"
                )
            out_name = f"present.{match.group(1)}.{match.group(2)}"
            if out_name not in self._output_names:
                raise FedloraError(
                    f"{self.model_dir}/{MODEL_FILE} has input {node.name} but "
                    f"no output {out_name}: export with "
                    f"task=text-generation-with-past"
                )
            specs.append(
                (
                    node.name,
                    out_name,
                    (int(heads), int(head_dim)),
                    _ORT_DTYPES.get(str(node.type), np.float32),
                )
            )
        return specs

    def set_adapter(self, adapter: Path | None) -> float:
        """Apply ``adapter`` (an ``.onnx_adapter`` file or its folder; None: the bare base) to
        the following requests, without reloading the model; returns the seconds it took.
        FedloraError (one line) for a file written for another base."""
        from fedlora.export.adapter import activate, adapter_file

        start = time.perf_counter()
        if adapter is None:
            self._run_options, self._lora, self.adapter = None, None, None
        else:
            self._run_options, self._lora = activate(self.session, self.model_dir, Path(adapter))
            self.adapter = adapter_file(Path(adapter))
        return time.perf_counter() - start

    # ---- text ------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat-templated prompt, as ``apply_chat_template(tokenize=False)`` renders it."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._template_vars
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens (the template already has them)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # ---- model -----------------------------------------------------------------------------
    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {
            name: np.zeros((batch, heads, 0, head_dim), dtype=dtype)
            for name, _, (heads, head_dim), dtype in self._past_specs
        }

    def _run(
        self, input_ids: np.ndarray, past: dict[str, np.ndarray], past_len: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        batch, length = input_ids.shape
        feed: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self._input_names:
            feed["attention_mask"] = np.ones((batch, past_len + length), dtype=np.int64)
        if "position_ids" in self._input_names:
            positions = np.arange(past_len, past_len + length, dtype=np.int64)
            feed["position_ids"] = np.broadcast_to(positions, (batch, length)).copy()
        feed.update(past)
        outputs = self.session.run(self._output_names, feed, self._run_options)
        by_name = dict(zip(self._output_names, outputs, strict=True))
        present = {in_name: by_name[out_name] for in_name, out_name, _, _ in self._past_specs}
        return by_name["logits"], present

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits ``[batch, seq, vocab]`` of one full forward pass with an empty KV cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        logits, _ = self._run(ids, self._empty_past(ids.shape[0]), past_len=0)
        return logits

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding with the KV cache; returns the new ids, eos included if reached."""
        if max_new_tokens < 1:
            return []
        ids = np.asarray([prompt_ids], dtype=np.int64)
        past = self._empty_past(1)
        past_len = 0
        new: list[int] = []
        eos = set(self.eos_token_ids)
        for _ in range(max_new_tokens):
            logits, past = self._run(ids, past, past_len)
            past_len += ids.shape[1]
            token = int(np.argmax(logits[0, -1]))
            new.append(token)
            if token in eos:
                break
            ids = np.asarray([[token]], dtype=np.int64)
        return new

    def decode_logits(self, prompt_ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """Greedy decoding of ``steps`` tokens on the KV cache, eos ignored: the tokens chosen
        (all but the last step's) and each step's last-position logits ``[steps, vocab]``."""
        logits, past = self._run(np.asarray([prompt_ids], dtype=np.int64), self._empty_past(1), 0)
        rows, tokens, length = [logits[0, -1]], [], len(prompt_ids)
        for _ in range(steps - 1):
            tokens.append(int(np.argmax(rows[-1])))
            logits, past = self._run(np.asarray([[tokens[-1]]], dtype=np.int64), past, length)
            length += 1
            rows.append(logits[0, -1])
        return tokens, np.stack(rows)

    def continuation_logprobs(
        self, context_ids: list[int], continuations: list[list[int]]
    ) -> list[list[float]]:
        """Per-token log-probabilities of each continuation after ``context_ids``.

        The context runs once; each continuation is scored from its KV cache (the cache arrays
        are inputs, never modified, so every continuation starts from the same context).
        """
        if not context_ids or any(not c for c in continuations):
            raise FedloraError(
                "continuation_logprobs: the context and every continuation need tokens"
            )
        ids = np.asarray([context_ids], dtype=np.int64)
        logits, past = self._run(ids, self._empty_past(1), past_len=0)
        first = _log_softmax(logits[0, -1])
        scores = []
        for cont in continuations:
            picked = [float(first[cont[0]])]
            if len(cont) > 1:
                more, _ = self._run(
                    np.asarray([cont[:-1]], dtype=np.int64), past, past_len=len(context_ids)
                )
                logp = _log_softmax(more[0])
                picked += [float(logp[i, t]) for i, t in enumerate(cont[1:])]
            scores.append(picked)
        return scores

    def decode_speed(self, prompt_ids: list[int], new_tokens: int = 32) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s) of greedy decoding ``new_tokens``
        tokens after ``prompt_ids``, eos ignored, so that every model decodes the same length."""
        start = time.perf_counter()
        logits, past = self._run(np.asarray([prompt_ids], dtype=np.int64), self._empty_past(1), 0)
        first = time.perf_counter() - start
        token, length = int(np.argmax(logits[0, -1])), len(prompt_ids)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, past = self._run(np.asarray([[token]], dtype=np.int64), past, length)
            length += 1
            token = int(np.argmax(logits[0, -1]))
        return first, new_tokens / (time.perf_counter() - start)

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int) -> GenerationResult:
        """Render ``messages`` with the chat template and decode greedily up to eos."""
        prompt_ids = self.encode(self.render(messages, add_generation_prompt=True))
        token_ids = self.generate_ids(prompt_ids, max_new_tokens)
        return GenerationResult(text=self.decode(token_ids), token_ids=token_ids)
