"""The Flower ServerApp: R rounds of LoRA FedAvg, the global adapter saved after every round.

Outputs under ``output-dir``: ``rounds/round-NNN/`` and ``global-adapter/`` (PEFT adapter
folders), ``metrics.jsonl`` (one line per round: per-site and aggregated loss), ``run.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora import choices
from fedlora.basemodel import resolve_base_model
from fedlora.config import RunConfig
from fedlora.console import configure_worker, ensure_log_output
from fedlora.data.drugreview import SITES
from fedlora.errors import ConfigError
from fedlora.lora import adapter_shapes, initial_adapter
from fedlora.protocol.adapter import spec_of
from fedlora.protocol.messages import RoundConfig, to_array_record
from fedlora.protocol.secagg import SecAggSettings
from fedlora.protocol.secagg_graph import least_threshold, max_holders
from fedlora.server.bounds import ReplyBounds
from fedlora.server.build import compose
from fedlora.server.central import make_central_eval
from fedlora.server.checkpoint import save_adapter
from fedlora.server.live import watch
from fedlora.server.privacy import DpSettings, PrivacyLedger
from fedlora.server.report import write_report
from fedlora.server.settings import StrategySettings
from fedlora.server.state import (
    STATE_DIR,
    ServerState,
    capture_random,
    check_resumable,
    load_state,
    restore_random,
    save_state,
)
from fedlora.server.strategies import ServerOptimizer, get_strategy, make_reducer
from fedlora.server.strategy import Arrays, CentralEval, LoraFedAvg
from fedlora.server.tracking import track_rounds
from fedlora.server.wrappers import LoraWrapper

log = logging.getLogger(__name__)


def server_optimizer(cfg: RunConfig) -> ServerOptimizer:
    """The server optimizer the run config names (server-lr 0: the optimizer's default)."""
    return ServerOptimizer(kind=cfg.server_optimizer, lr=cfg.server_lr or None)


def dp_settings(cfg: RunConfig) -> DpSettings:
    """Client-level DP settings; the sampling rate is fraction-train (see server/privacy)."""
    return DpSettings(
        noise_multiplier=float(cfg.dp_noise_multiplier),
        clip_norm=float(cfg.dp_clip_norm),
        sampling_rate=float(cfg.fraction_train),
        delta=float(cfg.dp_delta),
    )


def secagg_settings(cfg: RunConfig, nodes: int) -> SecAggSettings:
    """SecAgg+ settings for a round with ``nodes`` sampled nodes (shares capped at nodes).

    A narrow wire (secagg-wire-bits 16 or 32) weighs before quantizing, so weights cost bits:
    32-bit wires cap a node's weight (its training examples) at 4096, 16-bit wires and DP rounds
    weigh every node 1 (16 bits leave no room for weights; under DP each node's contribution is
    bounded by the clip alone). Quantization takes the most bits that cannot overflow.
    """
    shares = max(3, min(cfg.secagg_num_shares, nodes))
    corrupt = cfg.secagg_corrupt_nodes
    # 2t > holders + c for the most holders the round's graph can give a node (its nodes refuse
    # less: fedlora.protocol.secagg_graph)
    least = least_threshold(max_holders(nodes, shares), corrupt)
    threshold = min(max(cfg.secagg_threshold, least), shares, nodes)
    if threshold < least:
        raise ConfigError(
            f"secagg-corrupt-nodes={corrupt} on {nodes} nodes with secagg-num-shares={shares} "
            f"needs a threshold of {least}, more than the shares: raise secagg-num-shares or "
            f"lower secagg-corrupt-nodes"
        )
    if cfg.secagg_wire_bits == 64:
        return SecAggSettings(
            clip_norm=float(cfg.secagg_clip_norm),
            num_shares=shares,
            reconstruction_threshold=threshold,
            corrupt_nodes=corrupt,
        )
    equal = cfg.secagg_wire_bits == 16 or cfg.dp_noise_multiplier > 0
    return SecAggSettings.for_nodes(
        float(cfg.secagg_clip_norm),
        nodes,
        wire_bits=cfg.secagg_wire_bits,
        max_weight=1 if equal else NARROW_MAX_WEIGHT,
        num_shares=shares,
        reconstruction_threshold=threshold,
        corrupt_nodes=corrupt,
    )


NARROW_MAX_WEIGHT = 2**12  # a node's weight cap on 32-bit secure wires


def capped_secagg_settings(cfg: RunConfig, nodes: int) -> SecAggSettings:
    """:func:`secagg_settings` with each node's weight capped at max-examples-per-node when set:
    the nodes' encoders clip their weight to ``max_weight`` and the server checks the decoded
    total against ``nodes x max_weight`` (fedlora.server.secagg.checked_decode)."""
    settings = secagg_settings(cfg, nodes)
    cap = cfg.max_examples_per_node
    if 0 < cap < settings.max_weight:
        settings = dataclasses.replace(settings, max_weight=cap)
    return settings


# RoundConfig fields that do not come from a run-config key of the same name, and where they
# come from; every other field is copied from the run config by name (tests/test_server.py).
DERIVED_ROUND_FIELDS = {
    "server_round": "the round number (Flower's loop sets it)",
    "train_factors": "the strategy (fedlora.server.strategies)",
    "send_factors": "the strategy (fedlora.server.strategies)",
    # DP noise shares: set per round by SecureAggregation.configure_train from its privacy
    # ledger, under secure aggregation only (without it the server clips and adds the noise).
    "dp_noise_multiplier": "the privacy ledger (SecureAggregation.configure_train)",
    "dp_clip_norm": "the privacy ledger (SecureAggregation.configure_train)",
    "dp_expected_clients": "the nodes sampled for the round (SecureAggregation.configure_train)",
    # The downlink, per node and round (server/downlink.py, SecureAggregation.configure_train)
    "down_base": "the version the node holds (server/downlink.py)",
    "down_version": "the global adapter's version (server/downlink.py)",
    "down_digest": "the global adapter's sent factors (server/downlink.py)",
    "frozen_digest": "the factors nodes derive from the seed (server/downlink.py)",
    "wire_version": "the protocol",
}


def wire_codec(cfg: RunConfig) -> str:
    """How nodes encode deltas: the run's codec, or none under secure aggregation (which masks
    64-bit integers and applies no codec; fedlora.choices.wire_codec)."""
    return choices.wire_codec(cfg.codec, cfg.secure_aggregation)


def round_config(cfg: RunConfig) -> RoundConfig:
    """What every node is asked to do each round: the run config's round settings by name, the
    strategy's factors and the wire codec (the strategy adds DP noise shares per round)."""
    train, send = get_strategy(cfg.strategy).factors()
    shared = {f.name: f for f in fields(RoundConfig) if f.name not in DERIVED_ROUND_FIELDS}
    values: dict[str, Any] = {
        name: float(getattr(cfg, name)) if f.type in ("float", float) else getattr(cfg, name)
        for name, f in shared.items()
    }
    values.update(codec=wire_codec(cfg))
    return RoundConfig(server_round=0, train_factors=train, send_factors=send, **values)


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, np.ndarray]:
    """Run ``cfg.num_server_rounds`` rounds on ``grid``; return the final global adapter.

    With ``resume``, the run saved in ``output-dir`` continues from its last completed round
    (same settings required) and ends as an uninterrupted run would; otherwise a new run
    replaces whatever an earlier run left there.
    """
    out = Path(cfg.output_dir)
    base_dir = resolve_base_model(cfg.base_model)
    saved, adapter = start_or_resume(cfg, out, base_dir)
    ledger = privacy_ledger(cfg, saved)
    grid = watch(grid, out)  # the round and stage in progress in status.json (server/live.py)

    def save(server_round: int, arrays: Arrays, residuals: Arrays, record: dict[str, Any]) -> None:
        checkpoint(cfg, out, base_dir, ledger, strategy.lora, server_round, arrays, residuals)

    # save and the central evaluation read the strategy they are handed to (late binding)
    central = central_eval(cfg, base_dir, lambda: strategy.lora.residuals)
    plain = LoraFedAvg(
        spec=spec_of(adapter),
        global_adapter=adapter,
        aggregator=get_strategy(cfg.strategy, make_reducer(cfg.aggregation, cfg.trim_fraction)),
        optimizer=server_optimizer(cfg),
        settings=strategy_settings(cfg, out, seeded=saved is None),
        central_eval=central,
        on_round=track_rounds(cfg.tracking, out, cfg.to_mapping(), cfg.num_server_rounds, save),
        resumed=saved,
    )
    secagg = partial(capped_secagg_settings, cfg) if cfg.secure_aggregation else None
    strategy = compose(plain, cfg.clip_norm or None, ledger, secagg)
    log_protection(cfg)
    if saved is not None:  # Python's random as the interrupted run left it, just before rounds
        restore_random(saved.python_random)
    return run_rounds(grid, cfg, strategy, out)


def start_or_resume(cfg: RunConfig, out: Path, base_dir: Path) -> tuple[ServerState | None, Arrays]:
    """The saved state (``resume``, checked against these settings) or None with a new seeded
    adapter (what an earlier run left in ``out`` removed); ``run.json`` written either way."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = adapter_shapes(base_dir, cfg.lora)
    settings = cfg.to_mapping()
    saved = load_state(out) if cfg.resume else None
    if saved is not None:
        check_resumable(saved.settings, settings, out)
        if {k: tuple(v.shape) for k, v in saved.global_adapter.items()} != shapes:
            raise ConfigError(
                f"the adapter saved in {out} does not fit {base_dir} with these "
                f"LoRA settings: resume with the same model and LoRA settings"
            )
        adapter = saved.global_adapter
        log.info(
            "Resuming %s after round %d of %d", out, saved.completed_round, cfg.num_server_rounds
        )
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in saved.history))
    else:
        if cfg.resume:
            log.warning("resume: nothing saved in %s yet; starting a new run", out)
        _clear_run(out)
        adapter = initial_adapter(shapes, cfg.seed)
    n_params = sum(int(v.size) for v in adapter.values())
    log.info(
        "Global adapter: %d tensors, %d parameters (%.1f MiB fp32)",
        *(len(adapter), n_params, n_params * 4 / 2**20),
    )
    run = {"config": settings, "base-model-dir": str(base_dir), "adapter-parameters": n_params}
    (out / "run.json").write_text(json.dumps(run, indent=2))
    return saved, adapter


def privacy_ledger(cfg: RunConfig, saved: ServerState | None) -> PrivacyLedger | None:
    """The DP ledger (dp-noise-multiplier > 0), charged for a resumed run's past rounds."""
    if cfg.dp_noise_multiplier <= 0:
        return None
    ledger = PrivacyLedger(dp_settings(cfg), accountant=cfg.dp_accountant)
    for past in saved.history if saved is not None else []:
        if "dp-noise-multiplier" in past:
            ledger.record_round(
                past["round"], past["dp-noise-multiplier"], past["dp-sampling-rate"]
            )
    log.info(
        "Differential privacy on: clip %g, noise multiplier %g, sampling rate %g, "
        "delta %g (%s accountant)",
        *(cfg.dp_clip_norm, cfg.dp_noise_multiplier, cfg.fraction_train, cfg.dp_delta),
        cfg.dp_accountant,
    )
    return ledger


def strategy_settings(cfg: RunConfig, out: Path, seeded: bool) -> StrategySettings:
    """The strategy's settings from the run config (``seeded``: a new run, whose adapter is
    still the seeded initial one nodes derive)."""
    return StrategySettings(
        scale=cfg.lora.scaling,
        evaluate_every=cfg.evaluate_every,
        federated_eval=cfg.federated_eval,
        num_rounds=cfg.num_server_rounds,
        round_timeout=cfg.round_timeout,
        codec=wire_codec(cfg),
        codec_block=cfg.codec_block,
        down_codec=cfg.down_codec,
        seeded=seeded,
        bounds=ReplyBounds(cfg.max_examples_per_node, cfg.norm_bound_factor),
        site_names=SITES,  # packaged drug-review sites report their index as site-id
        history_file=out / "metrics.jsonl",
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate if cfg.evaluate_every else 0.0,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes,
        min_available_nodes=max(cfg.min_available_nodes, cfg.min_nodes),
    )


def central_eval(
    cfg: RunConfig, base_dir: Path, residuals: Callable[[], Arrays]
) -> CentralEval | None:
    """The server's own evaluation on ``central-eval`` data, or None when unset."""
    if not cfg.central_eval:
        return None
    labels = tuple(x.strip() for x in cfg.eval_labels.split(",") if x.strip())
    return make_central_eval(
        base_dir,
        cfg.lora,
        cfg.central_eval,
        cfg.central_eval_samples,
        labels,
        cfg.max_length,
        residuals=residuals,
        dpo_beta=cfg.dpo_beta if cfg.objective == "dpo" else 0.0,
    )


def log_protection(cfg: RunConfig) -> None:
    """One line saying whether the server sees each node's update."""
    if cfg.secure_aggregation:
        log.info(
            "Secure aggregation (SecAgg+) on: nodes clip to L2 norm %g; the server learns "
            "only the sum of the updates",
            cfg.secagg_clip_norm,
        )
    else:
        log.warning(
            "Secure aggregation is OFF: the server sees every node's update. Set "
            "secure-aggregation=true (with min-nodes >= 2) to hide them."
        )


def checkpoint(
    cfg: RunConfig,
    out: Path,
    base_dir: Path,
    ledger: PrivacyLedger | None,
    strategy: LoraFedAvg,
    server_round: int,
    arrays: Arrays,
    residuals: Arrays,
) -> None:
    """After each round: the round's and the latest adapter folders, the resumable server
    state and the report."""
    record = strategy.history[-1]
    meta = {
        "round": server_round,
        "train-loss": record.get("train-loss", float("nan")),
        "strategy": cfg.strategy,
        "server-optimizer": cfg.server_optimizer,
    }
    meta.update({k: v for k, v in record.items() if k.startswith(("eval-", "central-", "dp-"))})
    if ledger is not None:
        meta["privacy"] = ledger.summary()
    for folder in (out / "rounds" / f"round-{server_round:03d}", out / "global-adapter"):
        save_adapter(arrays, folder, cfg.lora, base_dir, meta, residuals)
    state = ServerState(
        completed_round=server_round,
        global_adapter=arrays,
        optimizer=strategy.opt_state,
        residuals=residuals,
        history=strategy.history,
        settings=cfg.to_mapping(),
        python_random=capture_random(),
    )
    save_state(out, state)
    write_report(out, strategy.history, cfg.to_mapping())


def run_rounds(
    grid: Grid, cfg: RunConfig, strategy: LoraFedAvg | LoraWrapper, out: Path
) -> dict[str, np.ndarray]:
    """Flower's loop over the rounds still to run; the final global adapter."""
    remaining = cfg.num_server_rounds - strategy.lora.round_offset
    log.info(
        "Strategy %s, server optimizer %s (lr %g); %d rounds to run",
        *(cfg.strategy, cfg.server_optimizer, server_optimizer(cfg).server_lr, max(remaining, 0)),
    )
    if remaining <= 0:
        return strategy.lora.global_adapter
    start = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=to_array_record(strategy.lora.global_adapter),
        num_rounds=remaining,
        timeout=cfg.round_timeout,
        train_config=round_config(cfg).to_record(),
        evaluate_config=round_config(cfg).to_record(),
    )
    log.info(
        "Federation finished: %d rounds in %.1f s; global adapter in %s",
        *(remaining, time.perf_counter() - start, out / "global-adapter"),
    )
    return strategy.lora.global_adapter


def _clear_run(out: Path) -> None:
    """Remove what an earlier run left in ``out`` (a new run replaces it)."""
    leftovers = [
        out / STATE_DIR,
        out / "rounds",
        out / "global-adapter",
        out / "metrics.jsonl",
        out / "report.md",
        out / "loss.png",
        out / "accuracy.png",
    ]
    if any(p.exists() for p in leftovers):
        log.warning(
            "Starting a new run in %s: the earlier run there is replaced (set resume "
            "to continue it instead)",
            out,
        )
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp reading ``context.run_config``, overlaid by ``overrides``."""
    extra = dict(overrides or {})
    configure_worker()  # a flwr-serverapp process: quiet library noise
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_log_output()  # a deployment's ServerApp: its rounds reach `flwr run --stream`
        cfg = RunConfig.from_mapping({**context.run_config, **extra}, source="run config")
        run_federation(grid, cfg)

    return app


app = make_server_app()
