"""The Flower ClientApp: one training round on a node's private data.

Settings merge, later winning: defaults given to :func:`make_client_app`, the run config, the node
config (``--node-config 'site="mental" base-model="/models/x"'`` in deployment; Flower sets
``partition-id`` in simulation). The reply holds the adapter delta and whitelisted metrics only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client.node import (NodeSettings, get_lora_state, seed_torch, set_lora_state,
                                 set_trainable, site_examples, warm_model)
from fedlora.client.train import sample_batches, train_lora
from fedlora.lora import LoraSettings
from fedlora.protocol.adapter import restrict, validate
from fedlora.protocol.messages import (ARRAYS, CONFIG, RoundConfig, TrainReply, arrays_of,
                                       to_array_record)

log = logging.getLogger(__name__)


PERSONAL = "fedlora.personal-lora"  # node state: trained factors that never leave the node


def run_round(message_content: Any, merged: Mapping[str, Any],
              state: RecordDict | None = None) -> TrainReply:
    """Train on the global adapter in ``message_content`` and return the reply to send.

    The round config says which LoRA factors to train and which to send. A factor that is not
    trained is frozen at the global value (FFA-LoRA's A); one that is trained but not sent is
    personal: it is restored from, and saved back to, the node's ``state`` (FedSA-LoRA's B).
    """
    settings = NodeSettings.from_config(merged)
    rc = RoundConfig.from_record(message_content[CONFIG])
    lora = LoraSettings(r=rc.lora_r, alpha=float(rc.lora_alpha), dropout=float(rc.lora_dropout),
                        target_modules=rc.target_modules)
    node = warm_model(settings, lora)
    examples = site_examples(node, settings, rc.max_length)
    first = node.rounds_served == 0
    global_adapter = arrays_of(message_content[ARRAYS])
    validate(global_adapter, node.spec)  # the node checks what the server sends, too
    start = dict(global_adapter)
    personal_spec = restrict(node.spec, rc.personal_factors) if rc.personal_factors else {}
    if personal_spec and state is not None and PERSONAL in state.array_records:
        personal = arrays_of(state.array_records[PERSONAL])
        validate(personal, personal_spec)
        start.update(personal)
    set_lora_state(node.model, start)
    set_trainable(node.model, rc.train_factors)
    seed_torch(rc.seed, settings.site_id, rc.server_round)  # LoRA dropout draws from it
    pad_id = node.tokenizer.pad_token_id
    batches = sample_batches(examples, rc.batch_size, rc.local_steps,
                             seed=(rc.seed, settings.site_id, rc.server_round), pad_id=pad_id)
    stats = train_lora(node.model, batches, lr=rc.lr)
    local = get_lora_state(node.model)
    node.rounds_served += 1
    if personal_spec and state is not None:
        state[PERSONAL] = to_array_record({k: local[k] for k in personal_spec})
    log.info("Round %d site %s: loss %.4f over %d steps in %.1f s", rc.server_round,
             settings.site, stats.loss, stats.steps, stats.seconds)
    sent = restrict(node.spec, rc.send_factors)
    return TrainReply(delta={k: local[k] - global_adapter[k] for k in sent},
                      num_examples=len(examples), train_loss=stats.loss,
                      site_id=settings.site_id,
                      load_seconds=node.load_seconds if first else 0.0,
                      train_seconds=stats.seconds)


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    base = dict(defaults or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        merged = {**base, **context.run_config, **context.node_config}
        reply = run_round(msg.content, merged, context.state)
        return Message(content=reply.to_content(), reply_to=msg)

    return app


app = make_client_app()
