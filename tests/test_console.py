"""The console shows fedlora's lines and Flower's warnings; library noise only with --verbose."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.console import FlowerWarningsOnly

# Imports that print noise on this machine: bitsandbytes' kernel-loading notice (a logging
# warning at import) and a library DeprecationWarning, in a fresh process as a Ray actor has.
NOISY = (
    "import warnings; from fedlora.console import configure; configure(verbose={verbose});\n"
    "import bitsandbytes\n"
    "warnings.warn('old API', DeprecationWarning, stacklevel=1)\n"
    "import subprocess, sys\n"  # a child process inherits the choice
    "subprocess.run([sys.executable, '-c', \"import warnings; "
    "warnings.warn('child noise', FutureWarning)\"], check=True)\n"
    "import logging; logging.getLogger('fedlora.demo').info('fedlora line')\n"
)


def _run(verbose: bool) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    env.pop("FEDLORA_VERBOSE", None)
    done = subprocess.run(
        [sys.executable, "-c", NOISY.format(verbose=verbose)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.integration
def test_quiet_by_default_shows_only_fedlora_lines() -> None:
    out = _run(verbose=False)
    assert "fedlora line" in out
    assert "old API" not in out and "child noise" not in out
    assert "kernels-community" not in out


@pytest.mark.integration
def test_verbose_shows_library_noise() -> None:
    out = _run(verbose=True)
    assert "fedlora line" in out
    assert "child noise" in out
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():  # the notice needs this CPU feature
        assert "kernels-community" in out


@pytest.mark.parametrize(
    ("level", "message", "kept"),
    [
        (logging.WARNING, "node 3 did not answer", True),
        (logging.ERROR, "run failed", True),
        (logging.INFO, "Received 3 results", False),
        (logging.WARNING, "Manually terminating ClientAppActor", False),
        (logging.WARNING, "run_simulation is deprecated", False),
    ],
)
def test_flower_filter_keeps_warnings_and_errors(level: int, message: str, kept: bool) -> None:
    record = logging.LogRecord("flwr", level, __file__, 1, message, None, None)
    assert FlowerWarningsOnly().filter(record) is kept


def test_an_unconfigured_process_streams_fedlora_lines_to_stderr() -> None:
    code = (
        "import logging; from fedlora.console import ensure_log_output; ensure_log_output(); "
        "ensure_log_output(); logging.getLogger('fedlora.server.strategy').info('Round 1 | x'); "
        "logging.getLogger('fedlora.server').debug('hidden')"
    )
    env = {k: v for k, v in os.environ.items() if k != "FEDLORA_VERBOSE"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stderr.splitlines() == ["Round 1 | x"]  # once, INFO and up


def test_a_configured_process_keeps_its_own_handlers(caplog) -> None:
    from fedlora.console import ensure_log_output

    ensure_log_output()  # pytest's handlers are on the root logger: nothing is added
    assert not logging.getLogger("fedlora").handlers
