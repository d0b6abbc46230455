"""The Flower ServerApp: R rounds of LoRA FedAvg, the global adapter saved after every round.

Outputs under ``output-dir``: ``rounds/round-NNN/`` and ``global-adapter/`` (PEFT adapter
folders), ``metrics.jsonl`` (one line per round: per-site and aggregated loss), ``run.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.basemodel import resolve_base_model
from fedlora.config import RunConfig
from fedlora.lora import adapter_shapes, initial_adapter
from fedlora.protocol.adapter import spec_of
from fedlora.protocol.messages import RoundConfig, to_array_record
from fedlora.server.checkpoint import save_adapter
from fedlora.server.strategies import get_strategy
from fedlora.server.strategy import LoraFedAvg

log = logging.getLogger(__name__)


def round_config(cfg: RunConfig) -> RoundConfig:
    train, send = get_strategy(cfg.strategy).factors()
    return RoundConfig(server_round=0, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                       lr=cfg.lr, max_length=cfg.max_length, seed=cfg.seed, lora_r=cfg.lora_r,
                       lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout),
                       target_modules=cfg.target_modules, train_factors=train, send_factors=send)


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, np.ndarray]:
    """Run ``cfg.num_server_rounds`` rounds on ``grid``; return the final global adapter."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_base_model(cfg.base_model)
    adapter = initial_adapter(adapter_shapes(base_dir, cfg.lora), cfg.seed)
    n_params = sum(int(v.size) for v in adapter.values())
    log.info("Global adapter: %d tensors, %d parameters (%.1f MiB fp32)", len(adapter),
             n_params, n_params * 4 / 2**20)
    (out / "run.json").write_text(json.dumps({"config": cfg.to_mapping(),
                                              "base-model-dir": str(base_dir),
                                              "adapter-parameters": n_params}, indent=2))
    history = out / "metrics.jsonl"
    history.unlink(missing_ok=True)

    def save(server_round: int, arrays: dict[str, np.ndarray],
             residuals: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        meta = {"round": server_round, "train-loss": record["train-loss"],
                "strategy": cfg.strategy, "server-optimizer": cfg.server_optimizer}
        for folder in (out / "rounds" / f"round-{server_round:03d}", out / "global-adapter"):
            save_adapter(arrays, folder, cfg.lora, base_dir, meta, residuals)

    strategy = LoraFedAvg(spec=spec_of(adapter), global_adapter=adapter,
                          aggregator=get_strategy(cfg.strategy), optimizer=cfg.optimizer,
                          scale=cfg.lora.alpha / cfg.lora.r, history_file=history,
                          on_round=save, fraction_train=1.0, min_train_nodes=cfg.min_nodes,
                          min_available_nodes=cfg.min_nodes)
    log.info("Strategy %s, server optimizer %s (lr %g)", cfg.strategy, cfg.server_optimizer,
             cfg.optimizer.server_lr)
    start = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=to_array_record(adapter),
                   num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                   train_config=round_config(cfg).to_record())
    log.info("Federation finished: %d rounds in %.1f s; global adapter in %s",
             cfg.num_server_rounds, time.perf_counter() - start, out / "global-adapter")
    return strategy.global_adapter


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp reading ``context.run_config``, overlaid by ``overrides``."""
    extra = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**context.run_config, **extra}, source="run config")
        run_federation(grid, cfg)

    return app


app = make_server_app()
