"""The range of every numeric run setting a real run can use: one table, read by the run config
(:mod:`fedlora.config`) and by the round config a node accepts from the server
(:mod:`fedlora.protocol.messages`), so both refuse the same values."""

from __future__ import annotations

# [low, high] per setting (field names), checked once at the run config's construction; the open
# bounds and the rules between settings are checked after it. The upper bounds are far past any
# run's need: they catch a typo, a unit slip or an overflow (2^63 - 1 rounds, 1e308 epochs)
# before it reaches a node or a loop.
DAY = 86_400.0
RANGES: dict[str, tuple[float, float]] = {
    "num_server_rounds": (1, 100_000),
    "local_steps": (1, 1_000_000),
    "batch_size": (1, 65_536),
    "max_length": (32, 1 << 20),
    "lora_r": (1, 65_536),
    "lora_r_max": (0, 65_536),
    "lora_alpha": (0, 1e6),
    "lora_layers": (0, 100_000),
    "local_epochs": (0, 10_000),
    "grad_accum": (1, 65_536),
    "warmup_steps": (0, 1_000_000),
    "max_grad_norm": (0, 1e6),
    "weight_decay": (0, 10),
    "length_grouping": (1, 10_000),
    "evaluate_every": (0, 100_000),
    "central_eval_samples": (1, 10_000_000),
    "secagg_clip_norm": (0, 1e6),
    "secagg_num_shares": (1, 10_000),
    "secagg_threshold": (1, 10_000),
    "codec_block": (1, 1 << 24),
    "dp_noise_multiplier": (0, 1e4),
    "dp_clip_norm": (0, 1e6),
    "dp_delta": (0, 1),
    "server_lr": (0, 100),
    "trim_fraction": (0, 1),
    "clip_norm": (0, 1e9),
    "max_examples_per_node": (0, 1e12),
    "norm_bound_factor": (0, 1e6),
    "secagg_corrupt_nodes": (0, 10_000),
    "seed": (0, 2**63 - 1),
    "min_nodes": (1, 100_000),
    "min_available_nodes": (0, 100_000),
    "round_timeout": (0, 7 * DAY),
    "dpo_beta": (0, 1e3),
    "dpo_sft_weight": (0, 1e3),
}
