"""The Flower ClientApp: one training round on a node's private data.

Settings merge, later winning: defaults given to :func:`make_client_app`, the run config, the node
config (``--node-config 'site="mental" base-model="/models/x"'`` in deployment; Flower sets
``partition-id`` in simulation). The reply holds the adapter delta and whitelisted metrics only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.client.node import (NodeSettings, get_lora_state, set_lora_state, site_examples,
                                 warm_model)
from fedlora.client.train import sample_batches, train_lora
from fedlora.lora import LoraSettings
from fedlora.protocol.adapter import validate
from fedlora.protocol.messages import ARRAYS, CONFIG, RoundConfig, TrainReply, arrays_of

log = logging.getLogger(__name__)


def run_round(message_content: Any, merged: Mapping[str, Any]) -> TrainReply:
    """Train on the global adapter in ``message_content`` and return the reply to send."""
    settings = NodeSettings.from_config(merged)
    rc = RoundConfig.from_record(message_content[CONFIG])
    lora = LoraSettings(r=rc.lora_r, alpha=float(rc.lora_alpha), dropout=float(rc.lora_dropout),
                        target_modules=rc.target_modules)
    node = warm_model(settings, lora)
    examples = site_examples(node, settings, rc.max_length)
    first = node.rounds_served == 0
    global_adapter = arrays_of(message_content[ARRAYS])
    validate(global_adapter, node.spec)  # the node checks what the server sends, too
    set_lora_state(node.model, global_adapter)
    pad_id = node.tokenizer.pad_token_id
    batches = sample_batches(examples, rc.batch_size, rc.local_steps,
                             seed=(rc.seed, settings.site_id, rc.server_round), pad_id=pad_id)
    stats = train_lora(node.model, batches, lr=rc.lr)
    local = get_lora_state(node.model)
    node.rounds_served += 1
    log.info("Round %d site %s: loss %.4f over %d steps in %.1f s", rc.server_round,
             settings.site, stats.loss, stats.steps, stats.seconds)
    return TrainReply(delta={k: local[k] - global_adapter[k] for k in node.spec},
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
        reply = run_round(msg.content, merged)
        return Message(content=reply.to_content(), reply_to=msg)

    return app


app = make_client_app()
