"""The ClientApp as Flower calls it: train and evaluate messages in, replies out.

The privacy guard captures every message a node sends in a round (train and evaluate replies,
serialized to the bytes that would cross the wire) and proves that nothing but adapter tensors of
the expected names and shapes and whitelisted scalars leave: no text, no token ids, no base
weights.
"""

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.common.serde import message_to_proto

from fedlora.client.app import DATA_FAILED, REFUSED, make_client_app
from fedlora.client.node import NodeSettings, encoded_rows, node_data, warm_model
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.adapter import is_lora_name
from fedlora.protocol.messages import (
    ARRAYS,
    CONFIG,
    EVAL_METRICS,
    METRICS,
    TRAIN_METRICS,
    EvalReply,
    RoundConfig,
    to_array_record,
)

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)
FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _content(adapter, **overrides) -> RecordDict:
    values = dict(
        server_round=1,
        local_steps=3,
        batch_size=4,
        lr=5e-3,
        max_length=192,
        seed=0,
        lora_r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=LORA.target_modules,
    )
    values.update(overrides)
    return RecordDict({ARRAYS: to_array_record(adapter), CONFIG: RoundConfig(**values).to_record()})


def _call(app, content: RecordDict, kind: str, node_config: dict, state=None) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    msg = Message(content=content, metadata=meta)
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node_config,
        state=state if state is not None else RecordDict(),
        run_config={},
    )
    return app(msg, context)


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir: Path):
    return initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)


def test_evaluate_reply_holds_whitelisted_metrics_with_accuracy(tiny_model_dir, start_adapter):
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"}
    reply = _call(make_client_app(), _content(start_adapter), "evaluate", node)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {METRICS}
    result = EvalReply.from_content(reply.content)
    assert result.num_examples == 9  # 10 % of the site's 90 reviews, held out by seed
    assert np.isfinite(result.loss) and result.perplexity == pytest.approx(np.exp(result.loss))
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0


def test_node_trains_on_its_own_jsonl_data(tiny_model_dir, start_adapter):
    node = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "data-path": str(FIXTURES / "chat.jsonl"),
        "site": "clinic-a",
        "eval-fraction": 0.0,
    }
    reply = _call(make_client_app(), _content(start_adapter), "train", node)
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records[METRICS]
    assert metrics["site-id"] == -1 and metrics["num-examples"] > 0


def test_round_beyond_the_node_limits_is_refused_with_a_reason(tiny_model_dir, start_adapter):
    node = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "site": "pain",
        "max-local-steps": 2,
    }
    reply = _call(make_client_app(), _content(start_adapter, local_steps=5), "train", node)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "max-local-steps=2" in reply.error.reason


def test_round_config_the_node_cannot_parse_is_refused(tiny_model_dir, start_adapter):
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"}
    content = _content(start_adapter)
    content[CONFIG]["loss"] = "contrastive"
    reply = _call(make_client_app(), content, "train", node)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "loss='contrastive'" in reply.error.reason


def test_bad_node_data_is_reported_without_its_details(
    tiny_model_dir, start_adapter, tmp_path: Path
):
    secret = tmp_path / "patients.jsonl"
    secret.write_text('{"prompt": "Patient Jane Roe, 54, HIV positive"}\n')
    node = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "site": "x",
        "data-path": str(secret),
    }
    reply = _call(make_client_app(), _content(start_adapter), "train", node)
    assert reply.has_error() and reply.error.code == DATA_FAILED
    assert "Jane" not in reply.error.reason and "patients" not in reply.error.reason


def test_privacy_guard_every_outbound_message_of_a_round(tiny_model_dir, start_adapter):
    # Prepare: a node with its private reviews; every reply it sends in a round is captured.
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "dermatology"}
    app, state = make_client_app(), RecordDict()
    sent = [
        _call(app, _content(start_adapter), "train", node, state),
        _call(app, _content(start_adapter, server_round=1), "evaluate", node, state),
    ]
    settings = NodeSettings.from_config(node)
    warm = warm_model(settings, LORA)
    data = node_data(settings)
    rows = encoded_rows(data, "train", warm.tokenizer, 192, "completion", False)
    texts = [t.content for ex in data.train + data.eval for t in ex.turns]
    base = {
        k: v.detach().float().numpy() for k, v in warm.model.named_parameters() if "lora_" not in k
    }

    for reply in sent:
        assert not reply.has_error(), reply.error
        content = reply.content
        # Only the whitelisted records: arrays (train only) and scalar metrics.
        assert not content.config_records
        whitelist = TRAIN_METRICS if ARRAYS in content else EVAL_METRICS
        assert set(content.keys()) <= {ARRAYS, METRICS}
        for value in content.metric_records[METRICS].values():
            assert isinstance(value, int | float) and not isinstance(value, bool)
        assert set(content.metric_records[METRICS]) <= whitelist
        if ARRAYS in content:
            arrays = {k: v.numpy() for k, v in content.array_records[ARRAYS].items()}
            assert set(arrays) == set(start_adapter) and all(map(is_lora_name, arrays))
            for name, array in arrays.items():
                assert array.dtype == np.float32 and array.shape == start_adapter[name].shape
                # No base weight is sent, whole or as a slice of matching shape.
                assert not any(
                    w.shape == array.shape and np.allclose(w, array) for w in base.values()
                )
        # The bytes on the wire: no text of any example, no run of token ids of one.
        wire = message_to_proto(reply).SerializeToString()
        for text in texts:
            for chunk in (text[:24], text[-24:]):
                assert chunk.encode() not in wire
        for row in rows:
            ids = np.asarray(row.input_ids[8:24])
            for dtype in (np.int64, np.int32):
                assert ids.astype(dtype).tobytes() not in wire


def test_a_node_charges_its_own_dp_ledger_and_refuses_past_its_budget(
    tiny_model_dir, start_adapter, tmp_path
):
    import json

    from fedlora.client.dp_ledger import Charge, NodeLedger

    dp = {"dp_noise_multiplier": 1.0, "dp_clip_norm": 0.5, "dp_expected_clients": 3}
    one = NodeLedger(charges=[Charge(1, 1.0, 3, 0.5)]).epsilon()
    two = NodeLedger(charges=[Charge(1, 1.0, 3, 0.5), Charge(2, 1.0, 3, 0.5)]).epsilon()
    ledger = tmp_path / "dp-ledger.json"
    node = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "site": "pain",
        "dp-ledger": str(ledger),
        "dp-max-epsilon": (one + two) / 2,
    }
    app = make_client_app()
    reply = _call(app, _content(start_adapter, local_steps=1, **dp), "train", node)
    assert not reply.has_error(), reply.error
    saved = json.loads(ledger.read_text())
    assert [c["round"] for c in saved["charges"]] == [1]
    assert saved["epsilon"] == pytest.approx(one)
    # Round 2 would pass the budget: refused before training, nothing charged.
    content = _content(start_adapter, server_round=2, local_steps=1, **dp)
    reply = _call(app, content, "train", node)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "past its dp-max-epsilon" in reply.error.reason
    assert len(json.loads(ledger.read_text())["charges"]) == 1
    # A round without DP noise is refused too while the node keeps a budget.
    reply = _call(app, _content(start_adapter, server_round=2, local_steps=1), "train", node)
    assert reply.has_error() and "adds no DP noise" in reply.error.reason


def test_a_node_sizes_its_noise_share_for_at_most_its_own_bound(
    tiny_model_dir, start_adapter, tmp_path
):
    """The server announces 10**6 nodes sharing the noise; the node's dp-max-contributors=4
    stands: its noise share has std z * C / sqrt(4), and its ledger charges for four nodes."""
    import json

    dp = {"dp_noise_multiplier": 1.0, "dp_clip_norm": 0.5, "dp_expected_clients": 10**6}
    ledger = tmp_path / "dp-ledger.json"
    node = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "site": "pain",
        "dp-ledger": str(ledger),
        "dp-max-contributors": 4,
    }
    reply = _call(make_client_app(), _content(start_adapter, local_steps=1, **dp), "train", node)
    assert not reply.has_error(), reply.error
    assert [c["expected_clients"] for c in json.loads(ledger.read_text())["charges"]] == [4]
    delta = np.concatenate(
        [a.numpy().ravel() for a in reply.content.array_records[ARRAYS].values()]
    )
    # the clipped delta (norm 0.5 over thousands of values) is far below the noise
    assert float(delta.std()) == pytest.approx(1.0 * 0.5 / 2, rel=0.1)
