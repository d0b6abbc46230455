"""GPU acceptance check (``make gpu-check``): QLoRA speed, MFU and memory on one CUDA GPU, and
eight virtual clients sharing that GPU through two secure rounds.

Usage::

    .venv/bin/python benchmarks/gpu_check.py                      # everything, ~10 min on an H100
    .venv/bin/python benchmarks/gpu_check.py --models default --no-federation
    .venv/bin/python benchmarks/gpu_check.py --peak-tflops 989    # a GPU missing from the table

1. Training, per model (the packaged default, SmolLM2-135M; and a random-initialised Llama of
   Llama-3.2-1B's shape, 1.24B parameters): the node's own loader and loop
   (``fedlora.client.quantization.load_base`` with ``quantization="auto"``, which is NF4 with
   bf16 compute on CUDA; peft LoRA r=8 on every linear layer; ``fedlora.client.train.train_lora``)
   on random token ids, every token scored. Reports tokens/s after two warm-up steps, MFU
   (model FLOPs per second over the GPU's dense bf16 peak, :data:`PEAK_BF16_TFLOPS` or
   ``--peak-tflops``; model FLOPs as in bench_client.py, :func:`model_flops_per_token`), peak GPU
   memory (``torch.cuda.max_memory_allocated``) beside the planner's estimate
   (``fedlora.planner.make_plan``: its peak less the CPU runtime it adds; the column says why
   when the planner is missing).
2. Federation: the drug reviews split iid over eight virtual clients, ``gpus-per-client 0.125``
   (all eight on one GPU), SecAgg+ on, two rounds, central evaluation on the GPU. Reports
   seconds per round and the load seconds per round (0 in round 2: the models stayed warm).

Exit status: 0 when measured; 77 when no CUDA GPU is visible (one line says so, nothing is
measured; 77 is the "skipped" status of automake's test harness, so scripts can tell a skip
from a pass); 1 on failure. Results also go to ``runs/gpu-check.json``.

Not yet run on a GPU: the CPU-side logic is unit-tested (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SKIPPED = 77
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (half the
# "with sparsity" figure); the first name that is a substring of torch.cuda.get_device_name()
# wins, so longer names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H200", 989.0),  # SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # AWS's A10 variant: no published figure here; pass --peak-tflops
    ("A10", 125.0),
)
LLAMA_1B = {  # Llama-3.2-1B's shape
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak of ``device_name`` in TFLOP/s (``override`` if given; None if the
    name is not in :data:`PEAK_BF16_TFLOPS`)."""
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def linear_params(config: Any) -> int:
    """Weights of a Llama-style decoder's linear layers (attention and MLP), from its config."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    return int(per_layer * config.num_hidden_layers)


def model_flops_per_token(config: Any) -> float:
    """4 x the linear layers' weights: forward (2) plus input gradients (2) through a frozen base,
    the definition ``benchmarks/bench_client.py`` uses for its MFU. LoRA's own FLOPs, attention
    scores and the lm_head are not counted, so the MFU is a lower bound."""
    return 4.0 * linear_params(config)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    return None if not peak else tokens_per_s * flops_per_token / (peak * 1e12)


def _batches(vocab: int, batch: int, seq: int) -> Any:
    import torch

    from fedlora.prompting import Encoded, collate

    gen = torch.Generator().manual_seed(0)
    while True:
        rows = [torch.randint(3, vocab, (seq,), generator=gen).tolist() for _ in range(batch)]
        yield collate([Encoded(r, r, False) for r in rows], 0)


def measure_training(
    model_dir: Path, steps: int, batch: int, seq: int, device: str = "cuda"
) -> dict[str, Any]:
    """Tokens/s, FLOPs per token and peak memory of ``steps`` LoRA steps after two warm-up
    steps, as a node trains (``quantization="auto"`` on ``device``). On CPU (the unit test)
    there is no GPU memory figure."""
    import torch
    from peft import get_peft_model

    from fedlora.client.quantization import load_base
    from fedlora.client.train import TrainOptions, train_lora
    from fedlora.config import RunConfig

    cfg = RunConfig(quantization="auto", batch_size=batch, max_length=seq)
    model = get_peft_model(load_base(model_dir, "auto", device), cfg.lora.peft_config(model_dir))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = _batches(model.config.vocab_size, batch, seq)
    train_lora(model, data, TrainOptions(lr=cfg.lr, steps=2))  # warm-up: kernels, allocator
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stats = train_lora(model, data, TrainOptions(lr=cfg.lr, steps=steps))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": stats.tokens / seconds,
        "seconds_per_step": seconds / steps,
        "flops_per_token": model_flops_per_token(model.config),
        "lora_params": lora,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "loss": stats.loss,
    }


def planned_bytes(model_dir: Path, batch: int, seq: int) -> tuple[int | None, str]:
    """The planner's GPU peak for this step (its train peak less the CPU runtime it adds), or
    None and why (``fedlora plan`` is being written alongside this check)."""
    try:
        from fedlora.config import RunConfig
        from fedlora.planner import make_plan

        cfg = RunConfig(quantization="nf4", batch_size=batch, max_length=seq)
        plan = make_plan(cfg, model_dir, device="cuda", compute="bf16")
        return int(plan.memory.train_peak - plan.memory.runtime), "fedlora.planner"
    except (ImportError, AttributeError, TypeError) as exc:
        return None, f"planner not available ({type(exc).__name__}: {exc})"


def build_llama_1b(folder: Path) -> Path:
    """A random-initialised Llama of :data:`LLAMA_1B`'s shape, saved in bf16, with the default
    model's tokenizer files (the loader needs none; peft and the loop need the config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
    model.save_pretrained(folder / "llama-1b")
    return folder / "llama-1b"


class MemoryWatch:
    """The largest device-wide GPU memory in use (all processes: the Ray actors too), sampled."""

    def __init__(self, every: float = 0.25) -> None:
        self.peak, self.every = 0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.every)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def federation_config(out: Path, clients: int = 8, rounds: int = 2) -> dict[str, Any]:
    """The run config of the shared-GPU federation (before partitioning)."""
    return {
        "quantization": "auto",
        "num-server-rounds": rounds,
        "secure-aggregation": True,
        "min-nodes": clients,
        "evaluate-every": 0,
        "central-eval-samples": 64,
        "output-dir": str(out),
    }


def run_federation(out: Path, clients: int, gpus_per_client: float) -> dict[str, Any]:
    """Eight (``clients``) virtual clients on one GPU, two secure rounds; per-round figures."""
    from fedlora.config import RunConfig
    from fedlora.simulations.partition import PartitionSpec, prepare
    from fedlora.simulations.run import partitioned_config, simulate

    cfg = RunConfig.from_mapping(federation_config(out, clients), source="gpu-check")
    part = prepare("drugreview", out / "partition", clients, PartitionSpec.parse("iid"))
    run_cfg = partitioned_config(cfg, part, given={"central-eval-samples"})
    with MemoryWatch() as watch:
        result = simulate(run_cfg, partition=part, client_gpus=gpus_per_client)
    return {
        "clients": clients,
        "gpus_per_client": gpus_per_client,
        "rounds": [
            {
                "round": r["round"],
                "seconds": r["seconds"],
                "replies": r["replies"],
                "load_seconds_sum": r.get("load-seconds-sum"),
                "train_tokens": r.get("train-tokens"),
                "central_eval_accuracy": r.get("central-eval-accuracy"),
            }
            for r in result.history
        ],
        "gpu_memory_peak_bytes": watch.peak,
    }


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _print_training(name: str, row: dict[str, Any]) -> None:
    m = row["mfu"]
    print(
        f"{name:>8}: {row['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {'-' if m is None else f'{100 * m:.1f}%'}, "
        f"peak {_gib(row['peak_bytes'])} (planner {_gib(row['planned_bytes'])}: "
        f"{row['planner']})",
        flush=True,
    )


def training_row(model: str, tmp: Path, args: argparse.Namespace, peak: float | None) -> dict:
    """Measure one model ("default" or "1b") and print its line."""
    import torch

    from fedlora.basemodel import resolve_base_model

    folder = resolve_base_model("default") if model == "default" else build_llama_1b(tmp)
    row = measure_training(folder, args.steps, args.batch_size, args.seq_len)
    row["mfu"] = mfu(row["tokens_per_s"], row["flops_per_token"], peak)
    row["planned_bytes"], row["planner"] = planned_bytes(folder, args.batch_size, args.seq_len)
    _print_training(model, row)
    torch.cuda.empty_cache()
    return row


def federation_rows(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the shared-GPU federation and print a line per round."""
    fed = run_federation(tmp / "federation", args.clients, args.gpus_per_client)
    for r in fed["rounds"]:
        print(
            f"federation round {r['round']}: {r['seconds']:.1f} s, "
            f"{r['replies']} replies, load {r['load_seconds_sum']} s",
            flush=True,
        )
    print(f"federation GPU memory peak {_gib(fed['gpu_memory_peak_bytes'])}")
    return fed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,1b", help="default and/or 1b")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--gpus-per-client", type=float, default=0.125)
    ap.add_argument("--no-federation", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check.json"))
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(models) <= {"default", "1b"}:
        ap.error(f"--models {args.models!r}: use default and/or 1b")

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible here; nothing measured (exit 77: skipped)")
        return SKIPPED
    from fedlora.simulations.run import offline_environment

    offline_environment()
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    print(f"gpu-check on {name}: dense bf16 peak {peak or 'unknown (--peak-tflops)'} TFLOP/s")
    report: dict[str, Any] = {"device": name, "peak_tflops": peak, "training": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            report["training"][model] = training_row(model, Path(tmp), args, peak)
        if not args.no_federation:
            report["federation"] = federation_rows(Path(tmp), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
