"""The names in fedlora.choices and the rooms' registries agree, in both directions."""

from __future__ import annotations

from fedlora import choices
from fedlora.client.quantization import BACKENDS
from fedlora.protocol.compression import CODECS
from fedlora.server.strategies import STRATEGIES, get_strategy, make_reducer
from fedlora.server.strategies.optimizers import KINDS
from fedlora.server.strategies.robust import REDUCERS


def test_every_registry_holds_exactly_the_listed_names() -> None:
    assert tuple(BACKENDS) == choices.QUANTIZATIONS
    assert set(CODECS) == set(choices.CODECS)
    assert set(STRATEGIES) == set(choices.STRATEGIES)
    assert tuple(KINDS) == choices.SERVER_OPTIMIZERS
    assert tuple(REDUCERS) == choices.AGGREGATIONS


def test_secure_aggregation_rule_matches_what_the_strategies_need() -> None:
    for strategy in choices.STRATEGIES:
        for aggregation in choices.AGGREGATIONS:
            try:
                aggregator = get_strategy(strategy, make_reducer(aggregation))
            except ValueError:  # the pair is refused outright (fedex-lora with a robust reducer)
                continue
            needs = aggregator.individual_updates_needed
            problem = choices.secure_aggregation_problem(strategy, aggregation)
            assert (problem is not None) == needs, (strategy, aggregation)
