"""The downlink: nodes receive only what they send back, exact or as a delta, and hold exactly
the server's global adapter afterwards."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.client.adapter_state import RoundRefused, load_adapter
from fedlora.client.app import run_round
from fedlora.client.node import NodeSettings, warm_model
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.adapter import restrict, spec_of
from fedlora.protocol.compression import nbytes
from fedlora.protocol.downlink import EXACT, digest
from fedlora.protocol.messages import ARRAYS, CONFIG, RoundConfig, wire_record
from fedlora.server.downlink import Downlink

A = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
B = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A: rng.normal(0, 0.1, (4, 32)).astype(np.float32),
        B: rng.normal(0, 0.1, (24, 4)).astype(np.float32),
    }


def _moved(glob: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in glob.items()}


def test_a_new_node_gets_exact_values_then_deltas_then_nothing():
    down = Downlink(_global(), "AB", codec="fp16")
    arrays, fields = down.payload(7)
    assert fields["down_base"] == EXACT and arrays.keys() == {A, B}
    assert all(v.dtype == np.float32 for v in arrays.values())
    down.acknowledge(7, down.version)
    down.publish(_moved(_global(), 1))
    arrays, fields = down.payload(7)  # one version behind: the change, in fp16
    assert fields["down_base"] == 0 and fields["down_version"] == 1
    assert all(v.dtype == np.float16 for v in arrays.values())
    assert nbytes(arrays) == nbytes(down.held) // 2
    down.acknowledge(7, 1)
    arrays, fields = down.payload(7)  # up to date: nothing to send
    assert arrays == {} and fields["down_base"] == fields["down_version"] == 1
    down.publish(_moved(down.held, 2))
    down.publish(_moved(down.held, 3))
    assert down.payload(7)[1]["down_base"] == EXACT  # two versions behind: exact again
    down.acknowledge(7, down.version)
    down.forget(7)  # its reply was dropped: it may hold anything
    assert down.payload(7)[1]["down_base"] == EXACT


@pytest.mark.parametrize(
    "codec, rtol", [("fp16", 2**-11), ("int8", 1 / 127), ("int8-block", 1 / 127)]
)
def test_published_global_is_what_nodes_hold_and_near_the_true_one(codec, rtol):
    glob = _global()
    down = Downlink(glob, "AB", codec=codec, block=16)
    down.acknowledge(1, 0)
    true_new = _moved(glob, 5)
    published = down.publish(true_new)
    arrays, fields = down.payload(1)
    from fedlora.protocol.downlink import apply_delta

    held = apply_delta(glob, arrays, codec, {k: v.shape for k, v in glob.items()}, 16)
    for name in glob:  # bit for bit what the server now calls its global
        np.testing.assert_array_equal(held[name], published[name])
        change = np.abs(true_new[name] - glob[name]).max()
        assert np.abs(published[name] - true_new[name]).max() <= rtol * change + 1e-7
    assert digest(held) == fields["down_digest"]


def test_codec_none_always_sends_exact_values():
    down = Downlink(_global(), "AB")
    down.acknowledge(3, 0)
    new = _moved(_global(), 1)
    assert all(np.array_equal(down.publish(new)[k], new[k]) for k in new)
    arrays, fields = down.payload(3)
    assert fields["down_base"] == EXACT and all(np.array_equal(arrays[k], new[k]) for k in new)


def test_a_seeded_run_sends_nothing_first_then_the_change_then_exact_values():
    down = Downlink(_global(), "AB", codec="fp16", seeded=True)
    arrays, fields = down.payload(7)  # version 0 is the seeded start: every node derives it
    assert arrays == {} and fields["down_base"] == fields["down_version"] == 0
    down.publish(_moved(_global(), 1))
    arrays, fields = down.payload(8)  # never heard of: still holds (or derives) version 0
    assert fields["down_base"] == 0 and fields["down_version"] == 1
    assert nbytes(arrays) == nbytes(down.held) // 2
    down.forget(8)  # its reply was dropped: it may hold anything, even at version 1
    assert down.payload(8)[1]["down_base"] == EXACT
    down.publish(_moved(down.held, 2))
    assert down.payload(9)[1]["down_base"] == EXACT  # two versions past the seeded start
    assert Downlink(_global(), "AB", seeded=True).payload(1)[1]["down_base"] == EXACT  # no codec


def test_only_the_sent_factors_travel_and_the_frozen_ones_have_a_digest():
    glob = _global()
    down = Downlink(glob, "B")
    arrays, fields = down.payload(1)
    assert arrays.keys() == {B}
    assert fields["frozen_digest"] == digest({A: glob[A]})


# ---- the node's side, on the tiny model ---------------------------------------------------------

LORA = LoraSettings(r=4, alpha=8.0)


def _content(arrays, fields, train="AB", send="AB", seed=0) -> RecordDict:
    rc = RoundConfig(
        server_round=1,
        local_steps=2,
        batch_size=4,
        lr=1e-2,
        max_length=192,
        seed=seed,
        lora_r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=0.0,
        target_modules=LORA.target_modules,
        train_factors=train,
        send_factors=send,
        **fields,
    )
    return RecordDict({ARRAYS: wire_record(arrays), CONFIG: rc.to_record()})


@pytest.fixture(scope="module")
def node_setup(tiny_model_dir: Path):
    settings = NodeSettings(base_model=str(tiny_model_dir), quantization="fp32", site="pain")
    node = warm_model(settings, LORA)
    glob = initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)
    return settings, node, glob


def test_a_node_follows_the_chain_and_holds_the_servers_global(node_setup):
    settings, node, glob = node_setup
    down = Downlink(glob, "AB", codec="int8-block", block=64)
    state = RecordDict()
    rc = lambda f: RoundConfig.from_record(_content({}, f)[CONFIG])  # noqa: E731
    arrays, fields = down.payload(9)
    got, received = load_adapter(node, _content(arrays, fields), rc(fields), state, settings)
    assert received == nbytes(glob) and digest(got) == digest(glob)
    down.acknowledge(9, down.version)
    for seed in (1, 2):
        down.publish(_moved(down.held, seed))
        arrays, fields = down.payload(9)
        assert fields["down_base"] == down.version - 1
        got, received = load_adapter(node, _content(arrays, fields), rc(fields), state, settings)
        assert digest(got) == down.held_digest and received == nbytes(arrays)
        assert received < nbytes(glob) / 3  # int8 plus a scale per 64 values
        down.acknowledge(9, down.version)


def test_a_node_without_the_base_version_refuses_in_one_line(node_setup):
    settings, node, glob = node_setup
    down = Downlink(glob, "AB", codec="fp16")
    down.publish(_moved(glob, 1))
    down.acknowledge(4, 1)  # the server believes it; the node's state was lost
    down.publish(_moved(down.held, 2))
    arrays, fields = down.payload(4)
    assert fields["down_base"] == 1
    content = _content(arrays, fields)
    with pytest.raises(RoundRefused, match="holds none; the server sends the exact adapter"):
        load_adapter(
            node, content, RoundConfig.from_record(content[CONFIG]), RecordDict(), settings
        )


def test_a_new_node_of_a_seeded_run_derives_version_0_and_follows_the_chain(node_setup):
    settings, node, glob = node_setup
    down = Downlink(glob, "AB", codec="int8-block", block=64, seeded=True)
    rc = lambda f: RoundConfig.from_record(_content({}, f)[CONFIG])  # noqa: E731
    arrays, fields = down.payload(5)
    state = RecordDict()
    got, received = load_adapter(node, _content(arrays, fields), rc(fields), state, settings)
    assert received == 0 and digest(got) == digest(glob)
    down.publish(_moved(glob, 1))  # a node joining in round 2 gets only the change
    arrays, fields = down.payload(6)
    got, received = load_adapter(node, _content(arrays, fields), rc(fields), RecordDict(), settings)
    assert digest(got) == down.held_digest and 0 < received < nbytes(glob) / 3


def test_a_version_0_that_is_not_the_seeded_start_is_refused_on_the_digest(node_setup):
    settings, node, glob = node_setup
    other = _moved(glob, 3)  # e.g. a resumed run's adapter, announced as if seeded
    arrays, fields = Downlink(other, "AB", codec="fp16", seeded=True).payload(1)
    content = _content(arrays, fields)
    with pytest.raises(RoundRefused, match="does not match the server's digest"):
        load_adapter(
            node, content, RoundConfig.from_record(content[CONFIG]), RecordDict(), settings
        )


def test_a_wrong_digest_is_refused(node_setup):
    settings, node, glob = node_setup
    arrays, fields = Downlink(glob, "AB", codec="fp16").payload(1)
    fields["down_digest"] = "0" * 32
    content = _content(arrays, fields)
    with pytest.raises(RoundRefused, match="does not match the server's digest"):
        load_adapter(
            node, content, RoundConfig.from_record(content[CONFIG]), RecordDict(), settings
        )


def test_ffa_lora_node_derives_a_from_the_seed_and_trains_on_b_alone(node_setup):
    settings, _, glob = node_setup
    down = Downlink(glob, "B")
    arrays, fields = down.payload(1)
    assert all(".lora_B." in k for k in arrays)
    node_cfg = {"base-model": settings.base_model, "quantization": "fp32", "site": "pain"}
    reply = run_round(_content(arrays, fields, train="B", send="B"), node_cfg)
    assert set(reply.delta) == set(restrict(spec_of(glob), "B"))
    assert reply.bytes_received == nbytes(arrays) < nbytes(glob)
    # A server whose A was not built from the seed: the node refuses, naming the seed.
    other = dict(glob, **{k: v + 1 for k, v in glob.items() if ".lora_A." in k})
    arrays, fields = Downlink(other, "B").payload(1)
    with pytest.raises(RoundRefused, match="derives from seed 0"):
        run_round(_content(arrays, fields, train="B", send="B"), node_cfg)
