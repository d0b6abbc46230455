"""Fuzzing harness: every generated input must end in acceptance or a typed project error.

Fuzz tests are hypothesis tests marked ``fuzz``. Their body wraps the entry point under test::

    @pytest.mark.fuzz
    @FUZZ
    @given(st.binary())
    def test_decoder(blob):
        with outcome("codec-decode"):
            decode(blob)

``outcome`` counts the input under the entry point's name and lets a :class:`FedloraError`
(typed: ``WireError``, ``ConfigError``, ``SecAggError``...) pass as a refusal; any other exception
is a crash and fails the test with hypothesis' shrunk example. ``make test`` runs the ``ci``
profile (seeded, a few hundred inputs per entry point, well under a minute in all);
``make fuzz`` runs the ``fuzz`` profile (FEDLORA_FUZZ_EXAMPLES inputs per entry point, 10,000
by default) and prints the counts, ending with ``crashes: C of N inputs``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings

from fedlora.errors import FedloraError

FUZZ_EXAMPLES = int(os.environ.get("FEDLORA_FUZZ_EXAMPLES", "10000"))
settings.register_profile(
    "ci",
    max_examples=150,
    derandomize=True,  # seeded: the same inputs on every run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    derandomize=False,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INPUTS: Counter[str] = Counter()  # entry point -> inputs tried
REFUSED: Counter[str] = Counter()  # entry point -> inputs refused with a typed error
CRASHES: Counter[str] = Counter()  # entry point -> inputs that raised anything else
HOSTILE: Counter[str] = Counter()  # entry point -> rounds played with a hostile node
POISONED: Counter[str] = Counter()  # entry point -> of those, rounds the hostile node poisoned


@contextmanager
def outcome(entry_point: str) -> Iterator[None]:
    """Count one input; a typed project error is a refusal, anything else a crash (re-raised)."""
    INPUTS[entry_point] += 1
    try:
        yield
    except FedloraError:
        REFUSED[entry_point] += 1
    except BaseException:
        CRASHES[entry_point] += 1
        raise


def hostile_round(entry_point: str, poisoned: str | None) -> None:
    """Count one round played with a hostile node; a poisoned one (``poisoned`` says how: the
    round failed, or its global adapter is not finite, beyond its bound or moved further than
    the stated bound) fails the test."""
    HOSTILE[entry_point] += 1
    if poisoned:
        POISONED[entry_point] += 1
        raise AssertionError(f"poisoned round ({entry_point}): {poisoned}")


def write_report(path: Path) -> None:
    """Write the counts as JSON (read by ``make fuzz``)."""
    rows: dict[str, dict[str, int]] = {
        name: {"inputs": INPUTS[name], "refused": REFUSED[name], "crashes": CRASHES[name]}
        for name in sorted(INPUTS)
    }
    for name in HOSTILE:
        rows[name].update({"hostile-rounds": HOSTILE[name], "poisoned": POISONED[name]})
    path.write_text(json.dumps(rows, indent=1))
