"""The Flower ClientApp: train the global adapter on a node's private data, or evaluate it.

Settings merge, later winning: defaults given to :func:`make_client_app`, the run config, the node
config (``--node-config 'data-path="/data/notes.jsonl" base-model="/models/x"'`` in deployment;
Flower sets ``partition-id`` in simulation). A train reply holds the adapter delta and
whitelisted metrics only; an evaluate reply holds whitelisted metrics only.

Every handler answers through :func:`_answer`: whatever is raised while decoding, validating,
training or evaluating becomes a typed one-line error reply (:func:`error_reply`), never an
exception out of the ClientApp. A round the node cannot honour (a message or round config it
cannot accept, settings beyond its limits in client/limits.py, its DP budget) is refused with the
reason; problems with the node's own data, files, model or machine are reported by kind only,
their details staying in the node's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error

from fedlora.basemodel import resolve_base_model
from fedlora.client.adapter_state import (
    RoundRefused,
    keep_personal,
    load_adapter,
)
from fedlora.client.audit import make_audit_mod
from fedlora.client.dp_ledger import BudgetExceeded, Charge, LedgerSettings, check_budget
from fedlora.client.dp_ledger import charge as charge_ledger
from fedlora.client.dpo import encoded_pairs, evaluate_pairs, pair_batches, train_dpo
from fedlora.client.limits import (
    DEFAULT_MAX_LOCAL_STEPS,
    NodeBudget,
    limit_problem,
    machine_bytes,
    model_limits,
)
from fedlora.client.memory_plan import round_checkpointing
from fedlora.client.node import (
    DATA_KEYS,
    NodeData,
    NodeSettings,
    WarmModel,
    encoded_rows,
    get_lora_state,
    node_data,
    seed_torch,
    set_trainable,
    warm_model,
)
from fedlora.client.privacy import noise_share_std, noise_shares
from fedlora.client.ranks import rank_problem
from fedlora.client.secagg import NOISE_SHARES, SecAggPolicy, handle_secagg
from fedlora.client.train import (
    TrainOptions,
    TrainStats,
    sample_batches,
    steps_for_epochs,
    train_lora,
)
from fedlora.client.worker import SOCKET_KEY, WorkerDown, WorkerFailed, forward
from fedlora.clipping import add_noise, clip_l2
from fedlora.console import configure_worker, name_node_lines
from fedlora.errors import ConfigError, DataError, FedloraError, WireError
from fedlora.evaluate import eval_loss, label_accuracy
from fedlora.lora import LoraSettings
from fedlora.planner import compute_dtype, resolve_auto
from fedlora.precision import device
from fedlora.protocol.adapter import restrict
from fedlora.protocol.messages import (
    CONFIG,
    EvalReply,
    ProtocolError,
    RoundConfig,
    TrainReply,
)

log = logging.getLogger(__name__)

SECURE_ROUNDS = "fedlora.secagg.rounds"  # node state: the last round trained under SecAgg+
REFUSED, DATA_FAILED = 4001, 4002  # error codes of replies the server logs and drops
WORKER_DOWN = 4003  # the node's warm worker (client/worker.py) is not running
NODE_FAILED = 4004  # any other failure on the node (its files, model, machine): see its log


def round_settings(content: Any, settings: NodeSettings) -> tuple[RoundConfig, LoraSettings]:
    """Parse the server's round config and check it against the node's limits
    (client/limits.py), before anything is loaded or allocated for it."""
    try:
        rc = RoundConfig.from_record(content[CONFIG])
        lora = LoraSettings(
            r=rc.lora_r_max or rc.lora_r,  # the adapter's rank; this node's is node_rank
            alpha=float(rc.lora_alpha),
            dropout=float(rc.lora_dropout),
            target_modules=rc.target_modules,
            rslora=rc.lora_rslora,
            sb=rc.train_factors == "R",
            layers=rc.lora_layers,
        )
    except (ProtocolError, ConfigError, KeyError, TypeError) as exc:
        raise RoundRefused(f"round config not accepted: {exc}") from None
    problem = rank_problem(settings.lora_r, rc.lora_r, rc.lora_r_max) or limit_problem(
        rc, model_limits(resolve_base_model(settings.base_model)), _budget(settings)
    )
    if problem:
        raise RoundRefused(problem)
    if rc.dp_noise_multiplier < settings.dp_min_noise_multiplier:
        raise RoundRefused(
            f"dp-noise-multiplier={rc.dp_noise_multiplier} is below this node's "
            f"dp-min-noise-multiplier={settings.dp_min_noise_multiplier} (the nodes add the "
            f"noise under secure aggregation; without it, this node cannot check it)"
        )
    return rc, lora


def _budget(settings: NodeSettings) -> NodeBudget:
    """What this node gives a round: its memory and steps (client/limits.py)."""
    dev = device(settings.device)
    quantization = resolve_auto(settings.quantization, dev)
    return NodeBudget(
        dev=dev,
        quantization=quantization,
        compute=compute_dtype(quantization, dev, "auto"),
        memory_bytes=machine_bytes(dev, settings.memory_gib),
        max_batch_size=settings.max_batch_size,
        max_local_steps=settings.max_local_steps or DEFAULT_MAX_LOCAL_STEPS,
    )


@dataclass
class RoundSetup:
    """What a train or evaluate message starts from: the node's settings, the server's round
    config (checked), the DP charge it would make, the warm model and the node's data."""

    settings: NodeSettings
    rc: RoundConfig
    lora: LoraSettings
    ledger: LedgerSettings
    dp_charge: Charge
    node: WarmModel
    data: NodeData


def set_up_round(content: Any, merged: Mapping[str, Any], state: RecordDict | None) -> RoundSetup:
    """Check the round against the node's settings, limits and DP budget, then load what it
    needs (the warm model and the node's data): every check before any allocation."""
    settings = NodeSettings.from_config(merged)
    rc, lora = round_settings(content, settings)
    ledger = LedgerSettings.from_config(merged)
    dp_charge = Charge(
        round=rc.server_round,
        noise_multiplier=rc.dp_noise_multiplier,
        expected_clients=noise_shares(rc.dp_expected_clients, settings.dp_max_contributors),
        clip_norm=rc.dp_clip_norm,
    )
    try:
        check_budget(ledger, state, dp_charge)
    except BudgetExceeded as exc:
        raise RoundRefused(str(exc)) from None
    node = warm_model(settings, lora)
    return RoundSetup(settings, rc, lora, ledger, dp_charge, node, node_data(settings))


def run_round(
    message_content: Any, merged: Mapping[str, Any], state: RecordDict | None = None
) -> TrainReply:
    """Train on the global adapter in ``message_content`` and return the reply to send.

    The round config says which LoRA factors to train and which to send. A factor that is not
    trained is frozen at the global value (FFA-LoRA's A); one that is trained but not sent is
    personal: it is restored from, and saved back to, the node's ``state`` (FedSA-LoRA's B).
    """
    setup = set_up_round(message_content, merged, state)
    settings, rc, node, data = setup.settings, setup.rc, setup.node, setup.data
    first = node.rounds_served == 0
    if rc.objective == "dpo":  # preference pairs (client/dpo.py)
        stats, global_adapter, received = _train_dpo(setup, message_content, state)
    else:
        stats, global_adapter, received = _train_sft(setup, message_content, state)
    local = get_lora_state(node.model)
    node.rounds_served += 1
    personal_spec = restrict(node.spec, rc.personal_factors) if rc.personal_factors else {}
    if personal_spec:
        keep_personal(settings, state, {k: local[k] for k in personal_spec})
    log.info(
        "Round %d site %s: loss %.4f -> %.4f over %d steps in %.1f s (%d tokens)",
        rc.server_round,
        settings.site,
        stats.first_loss,
        stats.last_loss,
        stats.steps,
        stats.seconds,
        stats.tokens,
    )
    sent = restrict(node.spec, rc.send_factors)
    delta = {k: local[k] - global_adapter[k] for k in sent}
    norm_before, shares = -1.0, 0
    if rc.dp_noise_multiplier > 0:  # distributed DP: this node's share of the Gaussian noise
        delta, norm_before, shares = _noised(setup, delta, state)
    return TrainReply(
        delta=delta,
        num_examples=len(data.train),
        train_loss=stats.loss,
        site_id=settings.site_id,
        load_seconds=node.load_seconds if first else 0.0,
        train_seconds=stats.seconds,
        train_tokens=stats.tokens,
        scored_tokens=stats.scored_tokens,
        codec=rc.codec,
        codec_block=rc.codec_block,
        bytes_received=received,
        dp_norm_before_clip=norm_before,
        dp_noise_shares=shares,
    )


def _train_sft(
    setup: RoundSetup, message_content: Any, state: RecordDict | None
) -> tuple[TrainStats, dict[str, np.ndarray], int]:
    """The round's local training on the next-token loss; its stats, the global adapter it
    started from and the bytes received."""
    settings, rc, node, data = setup.settings, setup.rc, setup.node, setup.data
    rows = encoded_rows(data, "train", node.tokenizer, rc.max_length, rc.loss, rc.packing)
    options = _train_options(setup, len(rows))
    steps = options.steps
    global_adapter, received = load_adapter(node, message_content, rc, state, settings)
    set_trainable(node.model, rc.train_factors)
    seed_torch(rc.seed, settings.seed_id, rc.server_round)  # LoRA dropout draws from it
    batches = sample_batches(
        rows,
        rc.batch_size,
        steps * rc.grad_accum,
        seed=(rc.seed, settings.seed_id, rc.server_round),
        pad_id=node.tokenizer.pad_token_id,
        length_grouping=rc.length_grouping,
    )
    stats = train_lora(node.model, batches, options)
    return stats, global_adapter, received


def _train_dpo(
    setup: RoundSetup, message_content: Any, state: RecordDict | None
) -> tuple[TrainStats, dict[str, np.ndarray], int]:
    """The round's local training on the DPO loss of the node's preference pairs, the frozen
    base (the adapter off) as the reference (client/dpo.py); as :func:`_train_sft` returns."""
    settings, rc, node, data = setup.settings, setup.rc, setup.node, setup.data
    pairs = encoded_pairs(data, "train", node.tokenizer, rc.max_length)
    options = _train_options(setup, len(pairs))
    global_adapter, received = load_adapter(node, message_content, rc, state, settings)
    set_trainable(node.model, rc.train_factors)
    seed_torch(rc.seed, settings.seed_id, rc.server_round)  # LoRA dropout draws from it
    batches = pair_batches(
        pairs,
        rc.batch_size,
        options.steps * rc.grad_accum,
        seed=(rc.seed, settings.seed_id, rc.server_round),
        pad_id=node.tokenizer.pad_token_id,
    )
    stats = train_dpo(node.model, batches, options, rc.dpo_beta, rc.dpo_sft_weight)
    return stats, global_adapter, received


def _train_options(setup: RoundSetup, rows: int) -> TrainOptions:
    """The round's optimizer settings for ``rows`` training rows, within the node's step limit."""
    settings, rc, node = setup.settings, setup.rc, setup.node
    steps = (
        rc.local_steps
        if rc.local_epochs == 0
        else steps_for_epochs(rows, rc.local_epochs, rc.batch_size, rc.grad_accum)
    )
    most = settings.max_local_steps or DEFAULT_MAX_LOCAL_STEPS
    if steps * rc.grad_accum > most:
        raise RoundRefused(
            f"{rc.local_epochs} local epochs = {steps} steps exceed this node's "
            f"max-local-steps={most}"
        )
    return TrainOptions(
        lr=rc.lr,
        steps=steps,
        grad_accum=rc.grad_accum,
        warmup_steps=min(rc.warmup_steps, steps),
        schedule=rc.lr_schedule,
        max_grad_norm=rc.max_grad_norm,
        weight_decay=rc.weight_decay,
        gradient_checkpointing=round_checkpointing(
            node.model, node.spec, rc, setup.lora, settings.memory_gib, settings.quantization
        ),
    )


def _noised(
    setup: RoundSetup, delta: dict[str, np.ndarray], state: RecordDict | None
) -> tuple[dict[str, np.ndarray], float, int]:
    """Distributed DP: the delta clipped, with this node's share of the Gaussian noise (sized
    for the server's count of nodes, bounded by the node's own), the ledger charged before it
    leaves. Returns the noised delta, its norm before clipping and the count it was sized for."""
    rc = setup.rc
    delta, norm_before, _ = clip_l2(delta, rc.dp_clip_norm, "dp-clip-norm")
    shares = setup.dp_charge.expected_clients
    std = noise_share_std(rc.dp_noise_multiplier, rc.dp_clip_norm, shares)
    delta = add_noise(delta, std, np.random.default_rng())  # OS entropy: never predictable
    charge_ledger(setup.ledger, state, setup.dp_charge)
    log.info(
        "DP: clipped the delta from L2 norm %.4f to %g and added N(0, %.3g^2) noise",
        norm_before,
        rc.dp_clip_norm,
        std,
    )
    return delta, norm_before, shares


def run_evaluation(
    message_content: Any, merged: Mapping[str, Any], state: RecordDict | None = None
) -> EvalReply:
    """Evaluate the global adapter (plus personal factors) on the node's eval split."""
    start = time.perf_counter()
    setup = set_up_round(message_content, merged, state)
    settings, rc, node, data = setup.settings, setup.rc, setup.node, setup.data
    if not data.eval:
        raise DataError("no eval split: eval-fraction is 0 or the node has one example")
    load_adapter(node, message_content, rc, state, settings)
    if rc.objective == "dpo":  # held-out preference pairs (client/dpo.py)
        return _evaluate_dpo(setup, start)
    rows = encoded_rows(data, "eval", node.tokenizer, rc.max_length, rc.loss, False)
    pad_id = node.tokenizer.pad_token_id
    loss = eval_loss(node.model, rows, pad_id, per_batch=rc.batch_size * 2)
    accuracy = None
    labelled = [
        ex
        for ex in data.eval
        if ex.kind == "chat" and ex.turns[-1].content.strip() in settings.labels
    ]
    if settings.labels and labelled:
        accuracy = label_accuracy(
            node.model,
            node.tokenizer,
            labelled,
            settings.labels,
            rc.max_length,
            per_batch=rc.batch_size * 2,
        ).accuracy
    reply = EvalReply(
        num_examples=len(data.eval),
        loss=loss.loss,
        perplexity=loss.perplexity,
        tokens=loss.tokens,
        accuracy=accuracy,
        site_id=settings.site_id,
        seconds=time.perf_counter() - start,
    )
    log.info(
        "Round %d site %s: eval loss %.4f, perplexity %.2f, accuracy %s (%d examples)",
        rc.server_round,
        settings.site,
        reply.loss,
        reply.perplexity,
        "n/a" if accuracy is None else f"{accuracy:.3f}",
        reply.num_examples,
    )
    return reply


def _evaluate_dpo(setup: RoundSetup, start: float) -> EvalReply:
    """The DPO loss, preference accuracy and reward margin of the node's held-out pairs."""
    rc, node = setup.rc, setup.node
    pairs = encoded_pairs(setup.data, "eval", node.tokenizer, rc.max_length)
    pad_id = node.tokenizer.pad_token_id
    scores = evaluate_pairs(node.model, pairs, pad_id, rc.dpo_beta, per_batch=rc.batch_size)
    log.info(
        "Round %d site %s: DPO eval loss %.4f, preference accuracy %.3f, margin %.4f (%d pairs)",
        rc.server_round,
        setup.settings.site,
        scores.loss,
        scores.accuracy,
        scores.margin,
        scores.pairs,
    )
    return EvalReply(
        num_examples=scores.pairs,
        loss=scores.loss,
        perplexity=float(np.exp(min(scores.loss, 50.0))),
        tokens=scores.tokens,
        site_id=setup.settings.site_id,
        seconds=time.perf_counter() - start,
        pref_accuracy=scores.accuracy,
        reward_margin=scores.margin,
    )


def error_reply(exc: Exception) -> Error:
    """The one-line error reply for an error raised while decoding, validating, training or
    evaluating. A refusal of the server's message says why (it concerns only that message);
    anything about the node's own data, files, model or machine says only its kind, and the
    details stay in the node's log."""
    if isinstance(exc, RoundRefused | WireError | BudgetExceeded):
        log.warning("Refusing round: %s", exc)
        return Error(code=REFUSED, reason=_one_line(str(exc)))
    if isinstance(exc, DataError):  # the details name private files and records: keep them here
        log.error("Node data problem: %s", exc)
        return Error(code=DATA_FAILED, reason="the node's data could not be used; see its log")
    if isinstance(exc, FedloraError):
        log.error("The node cannot run the round: %s", exc)
    else:
        log.error("The round failed on this node: %s: %s", type(exc).__name__, _one_line(str(exc)))
        log.debug("Traceback of the failed round", exc_info=exc)
    return Error(
        code=NODE_FAILED,
        reason=f"the node could not run the round ({type(exc).__name__}); see the node's log",
    )


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _answer(msg: Message, work: Callable[[], Message | RecordDict]) -> Message:
    """Run ``work()``: its reply, or the error reply for whatever it raised (:func:`error_reply`).
    Every handler of the ClientApp answers through here."""
    try:
        out = work()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error reply
        return Message(error=error_reply(exc), reply_to=msg)
    return out if isinstance(out, Message) else Message(content=out, reply_to=msg)


def _once_per_round(content: Any, context: Context) -> None:
    """Train at most once per server round under SecAgg+: a second setup in the same round
    would mask the same update (same seeds, same data) twice, and a server that asks one set of
    holders for the self-mask seed and another for the mask key would recover it."""
    try:
        rnd = RoundConfig.from_record(content[CONFIG]).server_round
    except (ProtocolError, KeyError) as exc:
        raise RoundRefused(f"the round config cannot be used: {exc}") from None
    seen = context.state.config_records.get(SECURE_ROUNDS)
    last = int(cast(int, seen["last-round"])) if seen is not None else -1
    if rnd <= last:
        raise RoundRefused(
            f"secure round {rnd} asked after round {last} was set up on this node: "
            f"a node trains once per round under secure aggregation"
        )
    context.state.config_records[SECURE_ROUNDS] = ConfigRecord({"last-round": rnd})


def _to_worker(msg: Message, context: Context, call_next: Any) -> Message:
    """A Flower mod: when the node names a warm worker (``worker-socket``), the worker runs the
    message in its long-lived process, where the base model stays loaded; this process only
    hands the message over and returns the reply and the node's updated state."""
    path = context.node_config.get(SOCKET_KEY)
    if not path:
        reply: Message = call_next(msg, context)
        return reply
    try:
        return forward(str(path), msg, context)
    except WorkerDown as exc:
        log.error("%s", exc)
        reason = "the node's worker is not running; see the node's log"
    except WorkerFailed as exc:
        log.error("The node worker failed: %s", exc)
        reason = "the node's worker failed; see the node's log"
    return Message(error=Error(code=WORKER_DOWN, reason=reason), reply_to=msg)


def _quiet_console(msg: Message, context: Context, call_next: Any) -> Message:
    """A Flower mod: quiet library noise in the process that runs the ClientApp (a Ray actor or
    a ``flwr-clientapp`` process), which fedlora's CLI did not set up itself."""
    configure_worker()
    reply: Message = call_next(msg, context)
    return reply


# Settings that only the node itself (its node config, or the simulation's defaults) may give:
# its data, limits, DP ledger and budget, worker. The server's run config never sets them.
NODE_ONLY_KEYS = frozenset(DATA_KEYS) | {
    "site",
    "partition-dir",
    "partition-id",
    "personal-state-dir",
    "max-local-steps",
    "max-batch-size",
    "dp-min-noise-multiplier",
    "dp-max-contributors",
    "dp-ledger",
    "dp-max-epsilon",
    "dp-ledger-delta",
    SOCKET_KEY,
}


def node_view(base: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """The settings a node acts on: defaults, the run config without node-only keys (logged
    when the server tried to set one), then the node config."""
    ignored = sorted(set(context.run_config) & NODE_ONLY_KEYS)
    if ignored:
        log.warning("the run config sets node-only settings %s: ignored", ignored)
    run = {k: v for k, v in context.run_config.items() if k not in NODE_ONLY_KEYS}
    return {**base, **run, **context.node_config}


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    base = dict(defaults or {})
    app = ClientApp(mods=[make_audit_mod(base), name_node_lines(base), _to_worker, _quiet_console])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        merged = node_view(base, context)
        return _answer(msg, lambda: run_round(msg.content, merged, context.state).to_content())

    @app.train("secagg")
    def secure_train(msg: Message, context: Context) -> Message:
        """SecAgg+ stages: the node trains in the first, then sends only masked sums."""
        merged = node_view(base, context)

        def train_fn(content: RecordDict) -> tuple[Any, int, Any]:
            _once_per_round(content, context)
            reply = run_round(content, merged, context.state)
            # Under DP every node weighs 1: one node's whole contribution is bounded by the clip.
            weight = 1 if reply.dp_norm_before_clip >= 0 else reply.num_examples
            # kept on the node (never sent): the secure round checks that as many nodes take
            # part and confirm the sum as this node's noise share was sized for
            return reply.delta, weight, reply.metrics() | {NOISE_SHARES: reply.dp_noise_shares}

        # the node's own policy: its node config (or defaults), never the server's run config
        return _answer(
            msg,
            lambda: handle_secagg(
                msg, context, train_fn, SecAggPolicy.from_config({**base, **context.node_config})
            ),
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        merged = node_view(base, context)
        return _answer(msg, lambda: run_evaluation(msg.content, merged, context.state).to_content())

    return app


app = make_client_app()
