"""Client training benchmark: fedlora's training loop against a bare peft + transformers loop.

Tokens per second and peak memory for each quantization backend, both loops on the same model,
batches and data, measured in the same run.

Usage (``make bench-client``)::

    .venv/bin/python benchmarks/bench_client.py                    # every backend
    .venv/bin/python benchmarks/bench_client.py --quick            # nf4 and bf16, 2 steps
    .venv/bin/python benchmarks/bench_client.py --backends nf4,fp32 --steps 8 --budget-s 0

Both loops train the same LoRA (``LoraSettings()``: r=8, alpha 16, the recipe's dropout, all
linear layers) on the same base, loaded by ``fedlora.client.quantization.load_base`` (what nodes
run), on the rows nodes train on: the packaged drug reviews of one site, chat-templated and
tokenized by ``fedlora.encoding.encode_examples`` with completion-only labels (the node
default), batch 4, max-length 256, in the order ``fedlora.client.train.sample_batches`` draws
them (seed 0).

- fedlora: ``train_lora`` (left padding, vocabulary logits from the first scored column on only).
- bare: what a user writes with plain peft + transformers: the same rows right-padded with an
  attention mask, ``model(input_ids, attention_mask, labels).loss`` (transformers' loss over the
  full logits), ``torch.optim.AdamW`` on the trainable tensors, ``clip_grad_norm_(1.0)``, step,
  ``zero_grad``.

Each (backend, loop) runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own: one
warmup step (not timed), then the timed steps. tokens/s counts non-padding tokens; useful tokens
are the scored (response) ones. For the default backend, fedlora also trains on packed rows
(``fedlora.encoding.pack``: several examples per 256-token row, no padding).

Hardware use: a first run measures this machine's matmul peak, bf16 and fp32, on the model's own
linear shapes (1024 tokens, the same torch threads as the runs). Model FLOP utilisation (MFU) of a
run = tokens/s x model FLOPs per token / the peak of its compute dtype (fp32 for the fp32 backend,
bf16 otherwise). Model FLOPs per token = 4 x the non-embedding parameters (forward plus input
gradients; a frozen base needs no weight gradients; LoRA's own FLOPs and attention scores are left
out, and so is the lm_head, which the bare loop runs on every token and fedlora on scored ones).

Time budget (``--budget-s``, 540 s by default, so that ``make bench-client`` ends within 10
minutes on a 2-core machine that other work shares): before each backend, the runs left get a
fair share of the remaining budget. The first run of a backend stops after the step that
exhausts its share (at least one step); its partner runs the same number of steps, on the same
batches. A backend for which not even one step per run fits is skipped, and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig

DEFAULT_BACKEND = "nf4"
BATCH_SIZE = 4
MAX_LENGTH = 256
SITE = "reproductive"
LR = 3e-4
LENGTH_GROUPING = RunConfig().length_grouping  # fedlora's default: batches sorted by length
MAX_STEPS = 6  # timed steps per run unless --steps or the budget says otherwise
QUICK_BACKENDS = ("nf4", "bf16")
QUICK_STEPS = 2
BUSY_CPU_USE = 0.8  # below this CPU use (see Result.cpu_use) a row is marked unreliable
BUDGET_S = 540.0  # `make bench-client` must finish in 10 minutes; this leaves a margin
# Until runs are measured: seconds a run spends outside its timed steps (interpreter, imports,
# loading, tokenizing, the warmup step), and seconds per step (nf4 on 2 idle Xeon cores).
FIRST_OVERHEAD_S, FIRST_STEP_S = 17.0, 4.5
JOB_TIMEOUT_S = 900


@dataclass
class Job:
    loop: str  # "fedlora", "bare", or "peak" (the matmul peak; no training)
    backend: str
    steps: int  # timed steps at most (after one warmup step)
    packing: bool = False
    max_seconds: float = 0.0  # no step starts after this many timed seconds (0 = no limit)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    draw: int = 0  # bare loop: the batch count fedlora's sampler drew for its run (0 = steps)


@dataclass
class Result:
    job: Job
    steps: int = 0  # timed steps done
    tokens: int = 0  # non-padding tokens of the timed steps
    scored: int = 0  # tokens the loss covered (response tokens)
    seconds: float = 0.0  # wall time of the timed steps
    cpu_seconds: float = 0.0  # CPU time of the process (all threads) during the timed steps
    load_seconds: float = 0.0  # base + LoRA load
    load_mib: float = 0.0  # peak RSS after loading, before training
    peak_mib: float = 0.0  # peak RSS of the whole process
    rows: int = 0  # training rows (packed rows with packing)
    examples: int = 0
    loss: float = float("nan")  # mean loss of the timed steps (fedlora: if not stopped early)
    error: str = ""  # why the job did not run (unavailable backend, crash, budget)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def useful_s(self) -> float:
        return self.scored / self.seconds

    @property
    def cpu_use(self) -> float:
        """CPU time over wall time x threads during the timed steps: about 1 on an idle
        machine; well below 1 when other work took the cores."""
        return self.cpu_seconds / (self.seconds * int(self.extra.get("threads", 1)))


# ---- worker: one (backend, loop) in its own process ------------------------------------------


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Timed:
    """Hands out a loop's batches and times them: the clock starts when the first batch is
    taken and stops when the loop comes back for a batch after ``max_seconds`` (one step at
    least) or when :meth:`stop` is called. Taking a batch means the previous step is done, so
    every batch handed out is a finished step. Stopping early raises StopIteration in the loop:
    ``train_lora`` lets it escape, a ``for`` loop ends."""

    def __init__(
        self,
        batches: Iterator[dict[str, Any]],
        max_seconds: float,
        counts: Callable[[dict[str, Any]], tuple[int, int]],
    ) -> None:
        self.batches, self.max_seconds, self.counts = batches, max_seconds, counts
        self.steps = self.tokens = self.scored = 0
        self.start = self.cpu = self.seconds = self.cpu_seconds = 0.0

    def __iter__(self) -> Timed:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.steps == 0:
            self.start, self.cpu = time.perf_counter(), time.process_time()
        elif self.max_seconds and time.perf_counter() - self.start >= self.max_seconds:
            self.stop()
            raise StopIteration
        batch = next(self.batches)
        tokens, scored = self.counts(batch)
        self.steps, self.tokens, self.scored = (
            self.steps + 1,
            self.tokens + tokens,
            self.scored + scored,
        )
        return batch

    def stop(self) -> None:
        if not self.seconds:
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu


def _draw(rows: Sequence[Any], count: int, grouping: int, pad_id: int) -> list[list[int]]:
    """The row indices of the ``count`` batches ``sample_batches`` draws (seed 0) with
    ``length_grouping=grouping``, taken from fedlora's own sampler by feeding it rows of the
    real lengths whose tokens are their own index (left padding: the last column is real)."""
    from fedlora.client.train import sample_batches
    from fedlora.prompting import Encoded

    marks = [
        Encoded([i] * len(r.input_ids), [i] * len(r.input_ids), False) for i, r in enumerate(rows)
    ]
    return [
        b["input_ids"][:, -1].tolist()
        for b in sample_batches(
            marks, BATCH_SIZE, count, seed=(0,), pad_id=pad_id, length_grouping=grouping
        )
    ]


def bare_order(rows: Sequence[Any], steps: int, draw: int, pad_id: int) -> list[list[int]]:
    """The bare loop's ``steps`` batches: exactly the rows of fedlora's first ``steps`` timed
    batches (fedlora's sampler drew ``draw`` batches for its run), in the order they were drawn,
    cut into consecutive batches as a plain shuffled DataLoader does. When fedlora ran all the
    batches it drew, these are the sampler's draws without length grouping."""
    natural = [i for b in _draw(rows, draw, 1, pad_id) for i in b]
    pending = Counter(i for b in _draw(rows, draw, LENGTH_GROUPING, pad_id)[:steps] for i in b)
    ordered = []
    for i in natural:  # draw order, each used row as many times as it was used
        if pending[i]:
            pending[i] -= 1
            ordered.append(i)
    return [ordered[k : k + BATCH_SIZE] for k in range(0, len(ordered), BATCH_SIZE)]


def _warmup_batch(rows: Sequence[Any], pad_id: int) -> list[int]:
    """One batch, drawn apart from the timed ones (seed 1), for both loops' untimed step."""
    from fedlora.client.train import sample_batches
    from fedlora.prompting import Encoded

    marks = [Encoded([i], [i], False) for i in range(len(rows))]
    batch = next(sample_batches(marks, BATCH_SIZE, 1, seed=(1,), pad_id=pad_id))
    return batch["input_ids"][:, -1].tolist()


def _bare_batch(rows: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """Right padding with an attention mask, labels -100 on padding: the usual collator."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _bare_counts(batch: dict[str, Any]) -> tuple[int, int]:
    return int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum())


def _fedlora_counts(batch: dict[str, Any]) -> tuple[int, int]:
    return int(batch["tokens"]), int((batch["labels"][:, 1:] != -100).sum())


def bare_loop(model: Any, rows: Sequence[Any], pad_id: int, job: Job) -> tuple[Timed, float]:
    """The bare loop: a warmup step, then the timed ones; ``(timer, mean loss)``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()

    def step(batch: dict[str, Any]) -> float:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.item())

    step(_bare_batch([rows[i] for i in _warmup_batch(rows, pad_id)], pad_id))  # warmup
    batches = (
        _bare_batch([rows[i] for i in take], pad_id)
        for take in bare_order(rows, job.steps, job.draw or job.steps, pad_id)
    )
    timer = Timed(batches, job.max_seconds, _bare_counts)
    losses = [step(batch) for batch in timer]
    timer.stop()
    return timer, sum(losses) / len(losses)


def fedlora_loop(model: Any, rows: Sequence[Any], pad_id: int, job: Job) -> tuple[Timed, float]:
    """fedlora's ``train_lora`` on ``sample_batches``: a warmup step, then the timed ones."""
    from fedlora.client.train import TrainOptions, sample_batches, train_lora
    from fedlora.prompting import collate

    warmup = collate([rows[i] for i in _warmup_batch(rows, pad_id)], pad_id)
    train_lora(model, iter([warmup]), TrainOptions(lr=LR, steps=1))
    batches = sample_batches(
        rows, BATCH_SIZE, job.steps, seed=(0,), pad_id=pad_id, length_grouping=LENGTH_GROUPING
    )
    timer = Timed(batches, job.max_seconds, _fedlora_counts)
    loss = float("nan")
    with contextlib.suppress(StopIteration):  # stopped early by the time budget
        loss = train_lora(model, timer, TrainOptions(lr=LR, steps=job.steps)).loss
    timer.stop()
    return timer, loss


PEAK_TOKENS = 1024
PEAK_REPEATS = 5


def linear_shapes(config: Any) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's linear layers, from a Llama-style config."""
    h = config.hidden_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    i = config.intermediate_size
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def model_flops_per_token(config: Any) -> float:
    """4 x non-embedding parameters: forward (2) plus the input gradients (2) of a frozen base."""
    per_layer = sum(a * b for a, b in linear_shapes(config))
    return 4.0 * per_layer * config.num_hidden_layers


def peak_worker(job: Job) -> Result:
    """This machine's matmul throughput (FLOP/s) on the model's linear shapes, bf16 and fp32."""
    import torch
    from transformers import AutoConfig

    from fedlora.basemodel import resolve_base_model

    if job.threads:
        torch.set_num_threads(job.threads)
    config = AutoConfig.from_pretrained(resolve_base_model("default"))
    shapes = linear_shapes(config)
    result = Result(job)
    for dtype in (torch.bfloat16, torch.float32):
        xs = {k: torch.randn(PEAK_TOKENS, k, dtype=dtype) for k in {a for a, _ in shapes}}
        ws = [torch.randn(a, b, dtype=dtype) for a, b in shapes]
        flops = sum(2.0 * PEAK_TOKENS * a * b for a, b in shapes)
        for w in ws:  # warmup
            torch.mm(xs[w.shape[0]], w)
        best = float("inf")
        for _ in range(PEAK_REPEATS):
            start = time.perf_counter()
            for w in ws:
                torch.mm(xs[w.shape[0]], w)
            best = min(best, time.perf_counter() - start)
        result.extra[str(dtype).removeprefix("torch.")] = flops / best
    result.extra["threads"] = torch.get_num_threads()
    result.extra["flops_per_token"] = model_flops_per_token(config)
    return result


def worker(job: Job) -> Result:
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from fedlora.basemodel import resolve_base_model
    from fedlora.client.node import site_examples
    from fedlora.client.quantization import get_backend, load_base
    from fedlora.encoding import encode_examples, pack
    from fedlora.lora import LoraSettings

    if job.threads:
        torch.set_num_threads(job.threads)
    result = Result(job)
    reason = get_backend(job.backend).available()
    if reason is not None:
        result.error = f"unavailable: {reason}"
        return result
    model_dir = resolve_base_model("default")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = site_examples(SITE)
    rows, _ = encode_examples(tokenizer, examples, MAX_LENGTH, loss="completion")
    if job.packing:
        rows = pack(rows, MAX_LENGTH)
    result.rows, result.examples = len(rows), len(examples)

    torch.manual_seed(0)
    start = time.perf_counter()
    model = get_peft_model(load_base(model_dir, job.backend), LoraSettings().peft_config(model_dir))
    result.load_seconds = time.perf_counter() - start
    result.load_mib = _peak_mib()
    torch.manual_seed(0)  # LoRA dropout draws from it
    loop = fedlora_loop if job.loop == "fedlora" else bare_loop
    timer, result.loss = loop(model, rows, tokenizer.pad_token_id, job)
    result.steps, result.tokens, result.scored = timer.steps, timer.tokens, timer.scored
    result.seconds, result.cpu_seconds = timer.seconds, timer.cpu_seconds
    result.peak_mib = _peak_mib()
    result.extra["threads"] = torch.get_num_threads()
    result.extra["flops_per_token"] = model_flops_per_token(model.config)
    return result


# ---- driver --------------------------------------------------------------------------------


def run_job(job: Job) -> Result:
    """``job`` in a fresh interpreter (clean peak RSS); its result comes back as JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=JOB_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return Result(job, error=f"timed out after {JOB_TIMEOUT_S} s")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(job, error=f"failed (exit {proc.returncode}): {tail[:200]}")
    data = json.loads(lines[-1])
    data["job"] = job
    result = Result(**data)
    result.extra["wall"] = time.perf_counter() - started
    return result


def groups(backends: Sequence[str]) -> list[list[Job]]:
    """The runs of each backend (steps set later): fedlora and bare, in alternating order so
    that a load that drifts over the run favours neither; plus packed fedlora for the default."""
    out = []
    for k, name in enumerate(backends):
        pair = [Job("fedlora", name, 0), Job("bare", name, 0)]
        out.append(pair[::-1] if k % 2 else pair)
        if name == DEFAULT_BACKEND:
            out[-1].append(Job("fedlora", name, 0, packing=True))
    return out


def time_share(
    remaining_s: float, runs_left: int, group_runs: int, overhead_s: float, step_s: float
) -> float | None:
    """Seconds of timed steps for each run of the next group: a fair share of the remaining
    budget (``remaining_s / runs_left``) less a run's overhead (interpreter, loading, warmup);
    a tiny value (one step) if that is not even one step but the group fits with one step
    each; None (skip the group) if it does not."""
    share = remaining_s / runs_left - overhead_s
    if share >= step_s:
        return share
    return 0.01 if remaining_s >= group_runs * (overhead_s + step_s) else None


def _describe(r: Result) -> str:
    if r.job.loop == "peak":
        if r.error:
            return f"  matmul peak: {r.error}"
        return (
            f"  matmul peak: bf16 {r.extra['bfloat16'] / 1e9:.0f} GFLOP/s, fp32 "
            f"{r.extra['float32'] / 1e9:.0f} GFLOP/s"
        )
    what = f"{r.job.backend:<12} {r.job.loop:<8}{' packed' if r.job.packing else '':<7}"
    if r.error:
        return f"  {what} {r.error}"
    return (
        f"  {what} {r.steps} steps {r.seconds:6.1f} s {r.tok_s:5.0f} tok/s "
        f"(CPU use {r.cpu_use:4.0%})  peak {r.peak_mib:5.0f} MiB  loss "
        f"{'-' if r.loss != r.loss else f'{r.loss:.3f}'}  "
        f"[run {r.extra['wall']:.0f} s, load avg {os.getloadavg()[0]:.1f}]"
    )


def measure(backends: Sequence[str], steps: int, budget_s: float, threads: int = 0) -> list[Result]:
    """The peak run, then each backend's runs; returns every result, the peak first."""
    todo = groups(backends)
    runs_left = sum(len(g) for g in todo)
    overheads, step_times = [FIRST_OVERHEAD_S], [FIRST_STEP_S]
    start = time.perf_counter()
    results: list[Result] = [run_job(Job("peak", "-", 0, threads=threads))]
    print(_describe(results[0]), file=sys.stderr, flush=True)
    for group in todo:
        share: float | None = 0.0
        if budget_s > 0:
            share = time_share(
                budget_s - (time.perf_counter() - start),
                runs_left,
                len(group),
                statistics.median(overheads),
                statistics.median(step_times),
            )
        runs_left -= len(group)
        first: Result | None = None
        for job in group:
            job.steps, job.threads = steps, threads
            if share is None:
                results.append(
                    Result(job, error=f"skipped: over the time budget (--budget-s {budget_s:.0f})")
                )
            else:
                if first is None or first.error:
                    job.max_seconds = share
                else:  # the same rows as the first run; a limit only against runaways
                    job.steps, job.max_seconds = first.steps, 3 * share
                    if job.loop == "bare" and first.job.loop == "fedlora":
                        job.draw = first.job.steps  # what fedlora's sampler drew
                results.append(run_job(job))
                first = first or results[-1]
            r = results[-1]
            print(_describe(r), file=sys.stderr, flush=True)
            if not r.error:
                step_times.append(r.seconds / r.steps)
                overheads.append(max(0.0, r.extra["wall"] - r.seconds))
    return results


def _find(
    results: Sequence[Result], backend: str, loop: str, packing: bool = False
) -> Result | None:
    return next(
        (
            r
            for r in results
            if r.job.backend == backend and r.job.loop == loop and r.job.packing == packing
        ),
        None,
    )


def mfu(r: Result, peak: Result | None) -> str:
    """Model FLOP utilisation of run ``r`` against the peak of its compute dtype."""
    if peak is None or peak.error:
        return "-"
    flops = r.tok_s * float(r.extra["flops_per_token"])
    return f"{flops / peak.extra['float32' if r.job.backend == 'fp32' else 'bfloat16']:.1%}"


def backend_table(results: Sequence[Result]) -> str:
    peak = _find(results, "-", "peak")
    lines = [
        "| backend | steps | fedlora tok/s | bare tok/s | ratio | MFU fedlora / bare | "
        "fedlora peak MiB | bare peak MiB | load peak MiB | CPU use fedlora / bare | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in dict.fromkeys(r.job.backend for r in results if r.job.loop != "peak"):
        fed, bare = _find(results, name, "fedlora"), _find(results, name, "bare")
        assert fed is not None and bare is not None
        if fed.error or bare.error:
            lines.append(
                f"| {name} | - | - | - | - | - | - | - | - | - | {fed.error or bare.error} |"
            )
            continue
        steps = str(fed.steps) if fed.steps == bare.steps else f"{fed.steps} / {bare.steps}"
        notes = [] if fed.steps == bare.steps else ["steps differ (budget)"]
        if min(fed.cpu_use, bare.cpu_use) < BUSY_CPU_USE:
            notes.append("other work took the CPUs: ratio unreliable")
        lines.append(
            f"| {name} | {steps} | {fed.tok_s:.0f} | {bare.tok_s:.0f} | "
            f"{fed.tok_s / bare.tok_s:.2f}x | {mfu(fed, peak)} / {mfu(bare, peak)} | "
            f"{fed.peak_mib:.0f} | "
            f"{bare.peak_mib:.0f} | {max(fed.load_mib, bare.load_mib):.0f} | "
            f"{fed.cpu_use:.0%} / {bare.cpu_use:.0%} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def useful_table(results: Sequence[Result]) -> str:
    picks = [
        ("fedlora, completion-only", _find(results, DEFAULT_BACKEND, "fedlora")),
        (
            "fedlora, completion-only + packing",
            _find(results, DEFAULT_BACKEND, "fedlora", packing=True),
        ),
        ("bare peft + transformers", _find(results, DEFAULT_BACKEND, "bare")),
    ]
    rows = [(label, r) for label, r in picks if r is not None and not r.error]
    if not rows:
        return ""
    bare = picks[2][1] if picks[2][1] is not None and not picks[2][1].error else None
    lines = [
        f"| {DEFAULT_BACKEND}: loop | steps | rows | tokens/step | useful tokens/step | "
        f"tok/s | useful tok/s | useful x bare | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        ratio = f"{r.useful_s / bare.useful_s:.2f}x" if bare else "-"
        lines.append(
            f"| {label} | {r.steps} | {r.rows} | {r.tokens / r.steps:.0f} | "
            f"{r.scored / r.steps:.1f} | {r.tok_s:.0f} | {r.useful_s:.2f} | "
            f"{ratio} | {r.peak_mib:.0f} |"
        )
    return "\n".join(lines)


def report(results: Sequence[Result], elapsed: float, loads: Sequence[float]) -> None:
    ok = [r for r in results if not r.error]
    threads = sorted({int(r.extra["threads"]) for r in ok})
    print(
        f"\ntok/s: non-padding tokens of the timed steps / their wall time. ratio: fedlora "
        f"tok/s / bare tok/s on the same rows in the same batches (>= 1.00x: fedlora is not "
        f"slower). CPU use: CPU time / (wall time x threads) of the timed steps, about 100% on "
        f"an idle machine; below {BUSY_CPU_USE:.0%} other work took the cores and the row is "
        f"marked. "
        f"Peak MiB: ru_maxrss of the run's process; load peak: after loading base + LoRA, "
        f"before training. Torch threads {threads}, {os.cpu_count()} CPUs shared with other "
        f"work (1-min load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end): "
        f"timings are noisy.\n"
    )
    print(backend_table(results))
    peak = _find(results, "-", "peak")
    if peak is not None and not peak.error:
        print(
            f"\nMFU: tokens/s x {peak.extra['flops_per_token'] / 1e6:.0f} MFLOP per token (4 x the "
            f"non-embedding parameters) / this machine's matmul peak on the model's linear "
            f"shapes, measured in this run: bf16 {peak.extra['bfloat16'] / 1e9:.0f} GFLOP/s, "
            f"fp32 {peak.extra['float32'] / 1e9:.0f} GFLOP/s (fp32 backend against fp32, the "
            f"others against bf16, their compute dtype)."
        )
    useful = useful_table(results)
    if useful:
        packed = _find(ok, DEFAULT_BACKEND, "fedlora", packing=True)
        plain = _find(ok, DEFAULT_BACKEND, "fedlora")
        print(
            "\nUseful tokens: the scored (response) tokens, here the one-word rating and its "
            "end-of-turn tokens; the bare loop computes logits for every token, fedlora only "
            "from the first scored column on."
        )
        if packed and plain:
            print(
                f"Packing: {packed.examples} examples into {packed.rows} rows of at most "
                f"{MAX_LENGTH} tokens = {packed.examples / packed.rows:.2f} examples per row "
                f"({packed.tokens / packed.steps / BATCH_SIZE:.0f} tokens per row in these "
                f"batches; an unpacked row is one example, "
                f"{plain.tokens / plain.steps / BATCH_SIZE:.0f} tokens on average)."
            )
        print(f"\n{useful}")
    print(f"\nTotal {elapsed:.0f} s for {len(results)} runs.")
    fed, bare = _find(ok, DEFAULT_BACKEND, "fedlora"), _find(ok, DEFAULT_BACKEND, "bare")
    value = f"{fed.tok_s / bare.tok_s:.2f}x" if fed and bare else "not measured"
    print(f"default backend ({DEFAULT_BACKEND}): fedlora / bare = {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backends",
        default="",
        help="comma-separated backends (default: all of fedlora.client.quantization.BACKEND_NAMES)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per run at most, after one warmup step (default "
        f"{MAX_STEPS}; the budget may stop a run earlier)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"backends {','.join(QUICK_BACKENDS)}, {QUICK_STEPS} timed steps",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help=f"seconds for all runs (default {BUDGET_S:.0f}): each backend's "
        f"runs get a fair share of what is left; 0 = no budget",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (default: torch's own, one per core); 1 "
        "suffers less when other work shares the cores",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = Job(**json.loads(args.worker))
        run = peak_worker if job.loop == "peak" else worker
        print(json.dumps(asdict(run(job)), default=str))
        return 0
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")

    from fedlora.client.quantization import BACKEND_NAMES
    from fedlora.lora import LoraSettings

    backends = [b.strip() for b in args.backends.split(",") if b.strip()] or list(
        QUICK_BACKENDS if args.quick else BACKEND_NAMES
    )
    unknown = [b for b in backends if b not in BACKEND_NAMES]
    if unknown:
        parser.error(f"unknown backends {unknown}: use {', '.join(BACKEND_NAMES)}")
    steps = args.steps or (QUICK_STEPS if args.quick else MAX_STEPS)
    print(
        f"Client training: SmolLM2-135M-Instruct + LoRA r=8 (all linear layers, dropout "
        f"{LoraSettings().dropout}), "
        f"site {SITE!r}, batch {BATCH_SIZE}, max-length {MAX_LENGTH}, completion-only loss, "
        f"lr {LR}. Each run in its own process: 1 warmup step (not timed), then up to {steps} "
        f"timed steps within a budget of {args.budget_s:.0f} s for all runs.",
        flush=True,
    )
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    results = measure(backends, steps, args.budget_s, args.threads)
    report(results, time.perf_counter() - start, (load_start, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
