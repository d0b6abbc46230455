"""LoRA aggregation strategies and server optimizers on tiny arrays (r=2, in=3, out=4 and 2).

Expected values are computed here from the papers' formulas; tolerances are stated per test.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedlora.server.aggregate import apply_delta
from fedlora.server.strategies import (
    STRATEGIES,
    ClientUpdate,
    OptimizerState,
    ServerOptimizer,
    get_strategy,
    layer_pairs,
    needs_individual_updates,
    step,
)
from fedlora.server.strategies.fedex_lora import add_residuals

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
SHAPES = {Q: (4, 3), V: (2, 3)}  # (out, in) per layer
R, SCALE = 2, 8.0 / 2  # rank 2, lora_alpha 8
EXAMPLES = [10, 30, 60]  # three clients, weights 0.1, 0.3, 0.6
EXACT_ATOL = 1e-6


def a(prefix: str) -> str:
    return f"{prefix}.lora_A.weight"


def b(prefix: str) -> str:
    return f"{prefix}.lora_B.weight"


def make_global(seed: int = 0, sb: bool = False) -> dict[str, np.ndarray]:
    """A global adapter; ``sb``: with LoRA-SB's r x r matrix per layer (Fed-SB)."""
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, (n_out, n_in) in SHAPES.items():
        out[a(prefix)] = rng.normal(0, 0.5, (R, n_in)).astype(np.float32)
        out[b(prefix)] = rng.normal(0, 0.5, (n_out, R)).astype(np.float32)
        if sb:
            out[f"{prefix}.lora_R.weight"] = rng.normal(0, 0.5, (R, R)).astype(np.float32)
    return out


def make_updates(
    glob: dict[str, np.ndarray], freeze_a: bool = False, seed: int = 1
) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    updates = []
    for n in EXAMPLES:
        delta = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in glob.items()}
        if freeze_a:
            delta.update({a(p): np.zeros_like(glob[a(p)]) for p in SHAPES})
        updates.append(ClientUpdate(delta, n))
    return updates


def mean_of_client_products(
    glob: dict[str, np.ndarray], updates: list[ClientUpdate], prefix: str
) -> np.ndarray:
    """sum_k w_k * scale * B_k @ A_k, in float64, from the clients' full factors."""
    total = sum(u.num_examples for u in updates)
    out = np.zeros(SHAPES[prefix])
    for u in updates:
        a_k = glob[a(prefix)].astype(np.float64) + u.delta[a(prefix)]
        b_k = glob[b(prefix)].astype(np.float64) + u.delta[b(prefix)]
        out += u.num_examples / total * SCALE * (b_k @ a_k)
    return out


def effective_update(adapter: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return SCALE * adapter[b(prefix)].astype(np.float64) @ adapter[a(prefix)].astype(np.float64)


# ---- layer pairing and validation --------------------------------------------------------------


def test_layer_pairs_groups_factors_by_module_prefix():
    pairs = layer_pairs(make_global())
    assert pairs == {Q: (a(Q), b(Q)), V: (a(V), b(V))}


@pytest.mark.parametrize(
    "names, match",
    [
        ([a(Q), b(Q), a(V)], "lora_A.weight has no partner .*lora_B.weight"),
        ([a(Q), b(Q), b(V)], "lora_B.weight has no partner .*lora_A.weight"),
        ([a(Q), b(Q), f"{V}.weight"], "not a LoRA factor"),
    ],
)
def test_unpaired_or_foreign_names_raise(names, match):
    with pytest.raises(ValueError, match=match):
        layer_pairs(names)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_mismatched_shapes_raise(name):
    # Prepare
    glob = make_global(sb=name == "fed-sb")
    updates = make_updates(glob)
    bad_delta = dict(updates[1].delta, **{b(Q): np.zeros((4, 3), np.float32)})
    bad_updates = [updates[0], ClientUpdate(bad_delta, 5)]
    bad_rank = dict(glob, **{b(V): np.zeros((2, 3), np.float32)})  # B (out, 3) against A (2, in)
    # Execute / Assert
    with pytest.raises(ValueError, match="shape"):
        get_strategy(name).aggregate(glob, bad_updates, SCALE)
    with pytest.raises(ValueError, match="same rank"):
        get_strategy(name).aggregate(bad_rank, updates, SCALE)


def test_missing_and_unknown_tensors_and_no_updates_raise():
    glob = make_global()
    update = make_updates(glob)[0]
    missing = {k: v for k, v in update.delta.items() if k != a(Q)}
    unknown = dict(update.delta, extra=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="missing"):
        get_strategy("fedit").aggregate(glob, [ClientUpdate(missing, 1)], SCALE)
    with pytest.raises(ValueError, match="unknown"):
        get_strategy("fedit").aggregate(glob, [ClientUpdate(unknown, 1)], SCALE)
    with pytest.raises(ValueError, match="no client updates"):
        get_strategy("fedit").aggregate(glob, [], SCALE)
    with pytest.raises(ValueError, match="lora_alpha / r"):
        get_strategy("fedit").aggregate(glob, [update], 0.0)


# ---- exactness: FFA-LoRA and FedEx-LoRA reproduce the mean of scale * B_k @ A_k; FedIT not ----


def test_ffa_lora_is_the_mean_of_client_products():
    # Prepare
    glob = make_global()
    updates = make_updates(glob, freeze_a=True)
    # Execute
    result = get_strategy("ffa-lora").aggregate(glob, updates, SCALE)
    # Assert: within 1e-6, no residual, A untouched
    for prefix in SHAPES:
        np.testing.assert_allclose(
            effective_update(result.new_global, prefix),
            mean_of_client_products(glob, updates, prefix),
            rtol=0,
            atol=EXACT_ATOL,
        )
        np.testing.assert_array_equal(result.new_global[a(prefix)], glob[a(prefix)])
    assert result.residuals == {}


def test_fedex_lora_with_residual_is_the_mean_of_client_products():
    # Prepare
    glob = make_global()
    updates = make_updates(glob)
    # Execute
    result = get_strategy("fedex-lora").aggregate(glob, updates, SCALE)
    # Assert: factors as FedIT, residual completes them to the exact mean, within 1e-6
    fedit = get_strategy("fedit").aggregate(glob, updates, SCALE)
    for prefix in SHAPES:
        np.testing.assert_array_equal(result.new_global[a(prefix)], fedit.new_global[a(prefix)])
        assert result.residuals[prefix].shape == SHAPES[prefix]
        assert result.residuals[prefix].dtype == np.float32
        np.testing.assert_allclose(
            effective_update(result.new_global, prefix) + result.residuals[prefix],
            mean_of_client_products(glob, updates, prefix),
            rtol=0,
            atol=EXACT_ATOL,
        )


def test_fedit_misses_the_mean_of_client_products():
    # Prepare
    glob = make_global()
    updates = make_updates(glob)
    # Execute
    result = get_strategy("fedit").aggregate(glob, updates, SCALE)
    # Assert: the gap mean(B)mean(A) vs mean(BA) is far above float rounding
    gap = max(
        float(
            np.max(
                np.abs(
                    effective_update(result.new_global, p)
                    - mean_of_client_products(glob, updates, p)
                )
            )
        )
        for p in SHAPES
    )
    assert gap > 1e-2, f"FedIT's largest gap to the exact mean update is only {gap:.3g}"
    assert result.residuals == {}


# ---- what each strategy moves ------------------------------------------------------------------


def test_fedsa_lora_averages_a_and_keeps_the_global_b():
    # Prepare: clients send B deltas too; the server must ignore them
    glob = make_global()
    updates = make_updates(glob)
    # Execute
    result = get_strategy("fedsa-lora").aggregate(glob, updates, SCALE)
    # Assert: A = example-weighted mean (1e-6), B bit-identical to the global one
    for prefix in SHAPES:
        want_a = glob[a(prefix)] + sum(
            n / 100 * u.delta[a(prefix)] for n, u in zip(EXAMPLES, updates, strict=True)
        )
        np.testing.assert_allclose(result.new_global[a(prefix)], want_a, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(result.new_global[b(prefix)], glob[b(prefix)])


def test_fedsa_lora_accepts_updates_without_b_and_ffa_lora_without_a():
    glob = make_global()
    updates = make_updates(glob, freeze_a=True)
    only_a = [ClientUpdate({a(p): u.delta[a(p)] for p in SHAPES}, u.num_examples) for u in updates]
    only_b = [ClientUpdate({b(p): u.delta[b(p)] for p in SHAPES}, u.num_examples) for u in updates]
    sa = get_strategy("fedsa-lora").aggregate(glob, only_a, SCALE)
    ffa = get_strategy("ffa-lora").aggregate(glob, only_b, SCALE)
    ffa_full = get_strategy("ffa-lora").aggregate(glob, updates, SCALE)
    assert set(sa.new_global) == set(ffa.new_global) == set(glob)
    for k in glob:
        np.testing.assert_array_equal(ffa.new_global[k], ffa_full.new_global[k])


def test_ffa_lora_rejects_a_changed_a_naming_the_tensor():
    glob = make_global()
    updates = make_updates(glob, freeze_a=True)
    delta = dict(updates[2].delta, **{a(V): np.array([[0, 0, 0], [0, 1e-3, 0]], np.float32)})
    updates[2] = ClientUpdate(delta, updates[2].num_examples)
    with pytest.raises(ValueError, match=rf"FFA-LoRA keeps A frozen: client update 2 .*{a(V)}"):
        get_strategy("ffa-lora").aggregate(glob, updates, SCALE)


KINDS = [
    ServerOptimizer("sgd"),
    ServerOptimizer("avgm"),
    ServerOptimizer("adam"),
    ServerOptimizer("yogi"),
]


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_clients_equal_to_the_global_leave_it_unchanged(name, cfg):
    # Prepare: every client returns the global adapter (zero deltas)
    glob = make_global(sb=name == "fed-sb")
    updates = [ClientUpdate({k: np.zeros_like(v) for k, v in glob.items()}, n) for n in EXAMPLES]
    # Execute
    result = get_strategy(name).aggregate(glob, updates, SCALE)
    moved, _ = step(glob, result.delta, OptimizerState(), cfg)
    if name == "flexlora":  # re-factors the mean product by SVD (sgd only, choices.RULES):
        for a_name, b_name in layer_pairs(glob).values():  # the product is kept, not factors
            got = result.new_global[b_name] @ result.new_global[a_name]
            np.testing.assert_allclose(got, glob[b_name] @ glob[a_name], atol=1e-6)
        return
    # Assert: bit-identical adapter; residuals (if any) zero up to float64 summation order
    # (sum_k w_k B A computed as one product over the stacked clients: about 1e-17 here)
    for k in glob:
        np.testing.assert_array_equal(result.new_global[k], glob[k])
        np.testing.assert_array_equal(moved[k], glob[k])
    for res in result.residuals.values():
        np.testing.assert_allclose(res, 0.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["fedit", "fedex-lora"])
def test_identical_clients_give_their_adapter_and_no_residual(name):
    glob = make_global()
    same = make_updates(glob)[0].delta
    result = get_strategy(name).aggregate(glob, [ClientUpdate(same, n) for n in EXAMPLES], SCALE)
    for k in glob:
        np.testing.assert_allclose(result.new_global[k], glob[k] + same[k], rtol=0, atol=1e-7)
    for res in result.residuals.values():
        np.testing.assert_allclose(res, 0.0, rtol=0, atol=1e-6)


def test_add_residuals_sums_rounds_layer_by_layer():
    r1 = {Q: np.array([[1.0, 2.0]], np.float32)}
    r2 = {Q: np.array([[0.5, -2.0]], np.float32), V: np.array([[3.0]], np.float32)}
    out = add_residuals(r1, r2)
    np.testing.assert_array_equal(out[Q], [[1.5, 0.0]])
    np.testing.assert_array_equal(out[V], [[3.0]])
    np.testing.assert_array_equal(r1[Q], [[1.0, 2.0]])  # inputs untouched


# ---- server optimizers (Reddi et al., 2021, Algorithm 2), four-number arrays -------------------

X0 = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
D1 = {"w": np.array([0.1, -0.2, 0.3, 0.0], np.float32)}
D2 = {"w": np.array([0.05, 0.1, 0.001, 0.2], np.float32)}
OPT_ATOL = 1e-6  # float32 adapter, float64 moments


def two_steps(cfg: ServerOptimizer) -> tuple[dict, dict, OptimizerState]:
    x1, s1 = step(X0, D1, OptimizerState(), cfg)
    x2, s2 = step(x1, D2, s1, cfg)
    return x1, x2, s2


def test_sgd_with_lr_one_is_apply_delta():
    x1, state = step(X0, D1, OptimizerState(), ServerOptimizer("sgd"))
    np.testing.assert_array_equal(x1["w"], apply_delta(X0, D1)["w"])
    assert x1["w"].dtype == np.float32 and state.num_steps == 1


def test_fedavgm_matches_hand_computation():
    # m1 = d1; x1 = x0 + 0.5 m1; m2 = 0.9 m1 + d2; x2 = x1 + 0.5 m2
    x1, x2, state = two_steps(ServerOptimizer("avgm", lr=0.5, momentum=0.9))
    np.testing.assert_allclose(x1["w"], [1.05, 1.9, 3.15, 4.0], rtol=0, atol=OPT_ATOL)
    np.testing.assert_allclose(state.m["w"], [0.14, -0.08, 0.271, 0.2], rtol=0, atol=OPT_ATOL)
    np.testing.assert_allclose(x2["w"], [1.12, 1.86, 3.2855, 4.1], rtol=0, atol=OPT_ATOL)


def test_fedadam_matches_hand_computation():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    d1, d2 = D1["w"].astype(np.float64), D2["w"].astype(np.float64)
    m1, v1 = 0.1 * d1, 0.99 * tau**2 + 0.01 * d1**2  # m_{-1} = 0, v_{-1} = tau^2
    m2, v2 = 0.9 * m1 + 0.1 * d2, 0.99 * v1 + 0.01 * d2**2
    x1 = X0["w"] + lr * m1 / (np.sqrt(v1) + tau)
    x2 = x1 + lr * m2 / (np.sqrt(v2) + tau)
    got1, got2, state = two_steps(ServerOptimizer("adam", lr=lr, beta1=b1, beta2=b2, tau=tau))
    np.testing.assert_allclose(got1["w"], x1, rtol=0, atol=OPT_ATOL)
    np.testing.assert_allclose(got2["w"], x2, rtol=0, atol=OPT_ATOL)
    np.testing.assert_allclose(state.v["w"], v2, rtol=1e-6, atol=0)


def test_fedyogi_matches_hand_computation_on_both_sides_of_the_sign():
    lr, tau = 0.1, 1e-3
    d1, d2 = D1["w"].astype(np.float64), D2["w"].astype(np.float64)
    # Step 1: v_{-1} = tau^2 > d1^2 only where d1 = 0 (element 4): sign = [-1, -1, -1, +1]
    v1 = tau**2 - 0.01 * d1**2 * np.array([-1, -1, -1, 1])
    # Step 2: v1 > d2^2 only for element 3 (d2 = 0.001 after d1 = 0.3): sign = [-1, -1, +1, -1]
    v2 = v1 - 0.01 * d2**2 * np.array([-1, -1, 1, -1])
    m1 = 0.1 * d1
    m2 = 0.9 * m1 + 0.1 * d2
    x1 = X0["w"] + lr * m1 / (np.sqrt(v1) + tau)
    x2 = x1 + lr * m2 / (np.sqrt(v2) + tau)
    got1, got2, state = two_steps(ServerOptimizer("yogi", lr=lr, beta1=0.9, beta2=0.99, tau=tau))
    np.testing.assert_allclose(got1["w"], x1, rtol=0, atol=OPT_ATOL)
    np.testing.assert_allclose(got2["w"], x2, rtol=0, atol=OPT_ATOL)
    np.testing.assert_allclose(state.v["w"], v2, rtol=1e-6, atol=0)
    assert state.num_steps == 2


def test_optimizer_on_fedsa_lora_moves_only_a():
    glob = make_global()
    result = get_strategy("fedsa-lora").aggregate(glob, make_updates(glob), SCALE)
    moved, _ = step(glob, result.delta, OptimizerState(), ServerOptimizer("adam"))
    for p in SHAPES:
        np.testing.assert_array_equal(moved[b(p)], glob[b(p)])
        assert np.max(np.abs(moved[a(p)] - glob[a(p)])) > 1e-3


def test_optimizer_state_round_trips_through_arrays():
    _, _, state = two_steps(ServerOptimizer("yogi"))
    back = OptimizerState.from_arrays(state.to_arrays())
    assert back.num_steps == 2
    np.testing.assert_array_equal(back.m["w"], state.m["w"])
    np.testing.assert_array_equal(back.v["w"], state.v["w"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "adagrad"}, "choose one of sgd, avgm, adam, yogi"),
        ({"kind": "adam", "lr": 0.0}, "positive"),
        ({"beta2": 1.0}, r"\[0, 1\)"),
        ({"kind": "yogi", "tau": -1.0}, "small positive"),
    ],
)
def test_server_optimizer_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerOptimizer(**kwargs)


def test_optimizer_rejects_state_of_another_adapter():
    _, state = step(X0, D1, OptimizerState(), ServerOptimizer("adam"))
    other = {"u": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match="fresh OptimizerState"):
        step(other, other, state, ServerOptimizer("adam"))


# ---- registry ----------------------------------------------------------------------------------


def test_registry_flags_strategies_needing_individual_updates():
    assert needs_individual_updates("fedex-lora") is True
    for name in ("fedit", "ffa-lora", "fedsa-lora"):
        assert needs_individual_updates(name) is False
    assert {n: get_strategy(n).name for n in STRATEGIES} == {n: n for n in STRATEGIES}
    with pytest.raises(ValueError, match="fedit, ffa-lora, fedsa-lora, fedex-lora"):
        get_strategy("fedprox")


def test_strategies_import_neither_torch_nor_flwr():
    code = (
        "import sys, fedlora.server.strategies; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
