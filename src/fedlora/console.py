"""What reaches the console: fedlora's own lines, Flower's warnings and errors, nothing else.

Libraries under fedlora (torch, transformers, peft, bitsandbytes, optimum, Ray) print deprecation
notices, tracer warnings and kernel-loading notices in every process, which hides what matters.
:func:`configure` quiets them in this process and, through environment variables, in every
process started from it (Ray actors, ``flwr-clientapp`` processes, subprocesses);
:func:`configure_worker` applies the same in a process fedlora did not start itself (a Ray actor
or a ClientApp process), reading the choice from the environment. ``--verbose`` (or
``FEDLORA_VERBOSE=1``) shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

VERBOSE_ENV = "FEDLORA_VERBOSE"
# Loggers of libraries whose INFO and WARNING lines are noise for a fedlora user.
NOISY_LOGGERS = (
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "optimum",
    "torch",
    "ray",
    "onnxruntime",
    "onnxscript",
    "datasets",
    "urllib3",
    "filelock",
    "matplotlib",
)
# Flower lines that are noise: fedlora calls run_simulation on purpose (the same apps also run
# under `flwr run`), and Ray actors are terminated by Flower itself at the end of every run.
FLOWER_NOISE = ("is deprecated", "fraction_evaluate is set to 0.0", "Manually terminating")


class FlowerWarningsOnly(logging.Filter):
    """Keep Flower's warnings and errors except :data:`FLOWER_NOISE`.

    Flower resets its handler levels when a run starts, so this filter sits on its logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return record.levelno >= logging.WARNING and not any(n in message for n in FLOWER_NOISE)


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def configure(verbose: bool = False) -> None:
    """Set up the console for this process and every process it starts."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("fedlora").setLevel(logging.DEBUG if verbose else logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    if not verbose:
        # Inherited by Ray workers and subprocesses, read at their interpreter start.
        os.environ["PYTHONWARNINGS"] = "ignore"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's node-line prefixes without colour codes
    configure_worker()


def configure_worker() -> None:
    """Quiet the libraries in this process, unless verbose output was asked for (idempotent)."""
    if verbose_requested():
        return
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"fedlora(\..*)?$")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, FlowerWarningsOnly) for f in flwr_logger.filters):
        flwr_logger.addFilter(FlowerWarningsOnly())


def ensure_log_output() -> None:
    """fedlora's lines to stderr in a process nobody configured (a ``flwr-serverapp`` the
    SuperLink starts: Flower streams its output to ``flwr run --stream``). A process whose
    logging is set up already (the CLI, a simulation, pytest) is left as it is; any other gets
    the CLI's own console set-up."""
    if not logging.getLogger().handlers and not logging.getLogger("fedlora").handlers:
        configure(verbose=verbose_requested())


@contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner with ``text`` while a long step runs, on a terminal only (logs stay clean)."""
    if not sys.stderr.isatty() or verbose_requested():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text, spinner="dots"):
        yield


# The node whose message this process is handling (a Ray actor serves several simulated nodes in
# turn): fedlora's lines carry its name, e.g. "[pain] DP ledger: ...".
NODE_NAME: ContextVar[str] = ContextVar("fedlora_node_name", default="")


def node_name(settings: Mapping[str, Any], node_id: int) -> str:
    """A node's name in console lines: its ``site``, the site its simulation ``partition-id``
    trains on, or ``client-N`` / ``node-ID``."""
    if settings.get("site"):
        return str(settings["site"])
    if "partition-id" in settings:
        pid = int(settings["partition-id"])
        sites = [s.strip() for s in str(settings.get("sites", "")).split(",") if s.strip()]
        if settings.get("partition-dir") or pid >= len(sites):
            return f"client-{pid}"
        return sites[pid]
    return f"node-{node_id}"


def _named_records() -> None:
    """Once per process: records of fedlora's loggers start with the current node's name."""
    make = logging.getLogRecordFactory()
    if getattr(make, "fedlora_named", False):
        return

    def named(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        name = NODE_NAME.get()
        if name and record.name.startswith("fedlora"):
            record.msg = f"[{name}] {record.msg}"
        return record

    named.fedlora_named = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(named)


class NameNodeLines:
    """A Flower mod: fedlora's lines while a node handles a message carry the node's name.

    A class, not a closure: Ray pickles the ClientApp with its mods, and a closure would carry
    the module's ContextVar with it (which cannot be pickled)."""

    def __init__(self, defaults: Mapping[str, Any] | None = None) -> None:
        self.base = dict(defaults or {})

    def __call__(self, msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        _named_records()
        settings = {**self.base, **context.run_config, **context.node_config}
        try:
            name = node_name(settings, int(context.node_id))
        except (TypeError, ValueError):  # an odd partition-id: the node's id will do
            name = f"node-{context.node_id}"
        token = NODE_NAME.set(name)
        try:
            return call_next(msg, context)
        finally:
            NODE_NAME.reset(token)


def name_node_lines(defaults: Mapping[str, Any] | None = None) -> NameNodeLines:
    """The mod that names node lines (:class:`NameNodeLines`)."""
    return NameNodeLines(defaults)
