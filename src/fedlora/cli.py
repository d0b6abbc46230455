"""The ``fedlora`` command line: demo, simulate, export, plan, prepare-base, check-data.

Bad input (a wrong model path, a missing data file, a malformed config) ends with one line on
stderr that says what to fix, and exit status 2; never a traceback.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedlora.config import RunConfig
from fedlora.console import configure as configure_console
from fedlora.console import verbose_requested
from fedlora.errors import ConfigError, FedloraError
from fedlora.export.parity import ATOL, NOISE_FACTOR
from fedlora.server.tracking import require as require_tracking

log = logging.getLogger(__name__)

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Federated LoRA fine-tuning on quantized bases, exported to ONNX.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file with run settings (dashed keys)")
]
RoundsOpt = Annotated[int | None, typer.Option("--rounds", help="federated rounds")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="output folder")]
BaseOpt = Annotated[
    str | None, typer.Option("--base-model", help="'default' or a local model folder")
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(help="experiment tracking: none | mlflow | tensorboard (docs/monitoring.md)"),
]
_DEMO_KEYS = {"eval-samples", "export", "client-cpus"}

# The range [low, high] of every numeric option that is not a run setting (those are checked by
# RunConfig's RANGES), checked once per command by _check_options.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "eval_samples": (1, 10_000_000),
    "seeds": (1, 1000),
    "num_clients": (0, 100_000),
    "test_fraction": (0, 0.9),
    "gpus_per_client": (0, 64),
    "cpus_per_client": (0.01, 1024),
    "client_cpus": (0, 1024),  # the demo's; 0: every site at once
    "atol": (0, 1),
    "noise_factor": (1, 1e6),
    "answer_tokens": (0, 1 << 20),
    "memory": (0.01, 1e5),
    "tflops": (1e-3, 1e6),
}


def _check_options(**values: float | None) -> None:
    """Each given option finite and within OPTION_RANGES; the first one out is a ConfigError."""
    for name, value in values.items():
        if value is None:
            continue
        low, high = OPTION_RANGES[name]
        option = "--" + name.replace("_", "-")
        if not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"{option} {value}: use a number in [{low:g}, {high:g}]")


@cli.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="show every library's warnings and logs (default: fedlora's)"
        ),
    ] = False,
) -> None:
    """Federated LoRA fine-tuning on quantized bases, exported to ONNX."""
    configure_console(verbose=verbose or verbose_requested())


# The demo shows the deployment posture: secure aggregation on (it needs two nodes per round),
# on a plain base in the machine's fast dtype ("auto": bf16 where the CPU computes bf16 natively,
# as with AMX, where it trains faster than the 4-bit backends; else fp32, since emulated bf16
# was 24x slower than fp32 on an AVX2 EPYC). The 135M model needs 0.3-0.6 GB of weights either
# way (bench-quality and README: the recipe and its figures).
# Sites evaluate after the default recipe's last round only: each federated evaluation costs
# about 45 s here, and make demo must stay under 15 minutes from a fresh clone.
_DEMO_DEFAULTS = {
    "secure-aggregation": True,
    "min-nodes": 2,
    "quantization": "auto",
    "evaluate-every": RunConfig.num_server_rounds,
}


def _demo_defaults() -> dict[str, Any]:
    """The demo's run settings here: the lighter recipe where the base would train in fp32."""
    import torch

    from fedlora.precision import cpu_has_bf16
    from fedlora.simulations.demo import FP32_RECIPE

    if torch.cuda.is_available() or cpu_has_bf16():
        return dict(_DEMO_DEFAULTS)
    return _DEMO_DEFAULTS | FP32_RECIPE


def _load(
    config: Path | None, overrides: dict[str, Any], defaults: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    from fedlora.config import read_toml

    values: dict[str, Any] = {**(defaults or {}), **(read_toml(config) if config else {})}
    demo = {k: values.pop(k) for k in list(values) if k in _DEMO_KEYS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig.from_mapping(values, source=str(config) if config else "options")
    require_tracking(cfg.tracking)  # a missing extra: one line, before anything starts
    return cfg, demo


@cli.command()
def demo(
    config: ConfigOpt = None,
    rounds: RoundsOpt = None,
    output: OutputOpt = "runs/demo",
    base_model: BaseOpt = None,
    eval_samples: Annotated[int | None, typer.Option(help="held-out reviews")] = None,
    export: Annotated[bool, typer.Option(help="export to ONNX at the end")] = True,
    tracking: TrackingOpt = None,
) -> None:
    """Simulated sites fine-tune the default model; evaluate; export to ONNX."""
    from fedlora.simulations.demo import DemoOptions, run_demo

    cfg, extra = _load(
        config,
        {
            "num-server-rounds": rounds,
            "output-dir": output,
            "base-model": base_model,
            "tracking": tracking,
        },
        _demo_defaults(),
    )
    opts = {k.replace("-", "_"): v for k, v in extra.items()}
    if eval_samples is not None:
        opts["eval_samples"] = eval_samples
    opts.setdefault("export", export)
    try:
        options = DemoOptions(**opts)
    except TypeError as exc:
        raise ConfigError(f"{config}: {exc}") from None
    _check_options(eval_samples=options.eval_samples, client_cpus=options.client_cpus)
    run_demo(cfg, options)


FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="data format: auto | chat | pairs | preference (prompt, chosen, rejected: DPO) | csv "
        "| tsv | text | parquet | dataset (a datasets save_to_disk folder)",
    ),
]
PromptColOpt = Annotated[str, typer.Option(help="column with the prompt")]
ResponseColOpt = Annotated[str, typer.Option(help="column with the answer")]
SystemColOpt = Annotated[str, typer.Option(help="column with a system prompt")]
TextColOpt = Annotated[str, typer.Option(help="column with plain text instead")]
BadRecordOpt = Annotated[str, typer.Option(help="stop | skip")]
EncodingOpt = Annotated[str, typer.Option(help="the files' text encoding")]


def _data_description(
    fmt: str,
    prompt_column: str,
    response_column: str,
    system_column: str,
    text_column: str,
    on_bad_record: str,
    encoding: str,
) -> dict[str, str]:
    """The data options as one description (:class:`fedlora.data.formats.DataSpec`'s fields):
    every command that reads data (simulate's --data and --test, export's --eval-data) reads it
    the same way."""
    return {
        "format": fmt,
        "prompt_column": prompt_column,
        "response_column": response_column,
        "system_column": system_column,
        "text_column": text_column,
        "on_bad_record": on_bad_record,
        "encoding": encoding,
    }


@cli.command()
def simulate(
    config: ConfigOpt = None,
    rounds: RoundsOpt = None,
    output: OutputOpt = None,
    base_model: BaseOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="training data: a file or folder check-data accepts, or 'drugreview'; "
            "default: the five packaged drug-review sites"
        ),
    ] = None,
    num_clients: Annotated[
        int, typer.Option(help="simulated clients (column:NAME: one per value)")
    ] = 0,
    partition: Annotated[
        str, typer.Option(help="iid | dirichlet:ALPHA[:COLUMN] | column:NAME | shards:K")
    ] = "iid",
    test: Annotated[str, typer.Option(help="held-out test data the server scores")] = "",
    test_fraction: Annotated[
        float, typer.Option(help="hold out this share of --data as the test split instead")
    ] = 0.0,
    fmt: FormatOpt = "auto",
    prompt_column: PromptColOpt = "prompt",
    response_column: ResponseColOpt = "response",
    system_column: SystemColOpt = "",
    text_column: TextColOpt = "",
    on_bad_record: BadRecordOpt = "stop",
    encoding: EncodingOpt = "utf-8",
    gpus_per_client: Annotated[
        float | None,
        typer.Option(
            help="GPU share per virtual client (Ray num_gpus; 0.125 packs 8 on one GPU); "
            "0: clients run on CPU; default: this machine's GPUs shared by the clients "
            "(none: CPU)"
        ),
    ] = None,
    cpus_per_client: Annotated[
        float, typer.Option(help="CPUs per virtual client (Ray num_cpus)")
    ] = 1.0,
    ray_address: Annotated[
        str,
        typer.Option(
            help="run on this existing Ray cluster (HEAD:6379, from `ray start --head`); "
            "default: a private Ray instance"
        ),
    ] = "",
    tracking: TrackingOpt = None,
) -> None:
    """Run only the federation on the simulation engine: the packaged sites, or your data
    split across --num-clients clients."""
    from functools import partial

    from fedlora.simulations import report
    from fedlora.simulations.run import simulate

    _check_options(
        num_clients=num_clients,
        test_fraction=test_fraction,
        gpus_per_client=gpus_per_client,
        cpus_per_client=cpus_per_client,
    )
    run_sim = partial(
        simulate,
        client_cpus=cpus_per_client,
        client_gpus=gpus_per_client,
        ray_address=ray_address,
    )

    overrides = {
        "num-server-rounds": rounds,
        "output-dir": output,
        "base-model": base_model,
        "tracking": tracking,
    }
    cfg, _ = _load(config, overrides)
    if data is None:
        if num_clients or test or test_fraction or partition != "iid":
            raise ConfigError("--num-clients, --partition and --test need --data")
        report.rounds(run_sim(cfg).history)
        return
    from fedlora.simulations.partition import PartitionSpec, prepare
    from fedlora.simulations.run import partitioned_config

    spec = PartitionSpec.parse(partition)
    if not num_clients and spec.kind != "column":
        raise ConfigError(f"--partition {spec} needs --num-clients N")
    part = prepare(
        data,
        Path(cfg.output_dir) / "partition",
        num_clients,
        spec,
        seed=cfg.seed,
        test=test,
        test_fraction=test_fraction,
        spec_kwargs=_data_description(
            fmt, prompt_column, response_column, system_column, text_column, on_bad_record, encoding
        ),
    )
    given = _given_keys(config, overrides)
    report.rounds(run_sim(partitioned_config(cfg, part, given), partition=part).history)


@cli.command()
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="comparison TOML file")],
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            help="run every method on N seeds (the [run] seed and the next N - 1) and report "
            "means with 95% confidence intervals; overrides [compare] seeds",
        ),
    ] = None,
    tracking: TrackingOpt = None,
) -> None:
    """Centralized, local-only and federated methods on one data set, split and test set."""
    import dataclasses

    from fedlora.simulations.compare import CompareConfig, run_compare, with_seeds

    _check_options(seeds=seeds)
    cc = CompareConfig.from_toml(config)
    if tracking is not None:
        cc = dataclasses.replace(cc, run=cc.run | {"tracking": tracking})
    require_tracking(RunConfig.from_mapping(cc.run, source="[run]").tracking)
    if seeds is not None:
        cc = with_seeds(cc, seeds)
    run_compare(cc)
    from fedlora.simulations import report

    report.console.print((Path(cc.output) / "compare.md").read_text())


def _given_keys(config: Path | None, overrides: dict[str, Any]) -> set[str]:
    """The run-config keys the user set (in the TOML file or as options)."""
    from fedlora.config import read_toml

    keys = {k for k, v in overrides.items() if v is not None}
    return keys | (set(read_toml(config)) if config else set())


@cli.command()
def export(
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter folder")] = None,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("runs/export"),
    base_model: BaseOpt = "default",
    atol: Annotated[
        float, typer.Option(help="parity: logits tolerance floor against PyTorch fp64")
    ] = ATOL,
    noise_factor: Annotated[
        float,
        typer.Option(
            help="parity: ONNX Runtime may be this many times as far from PyTorch fp64 as "
            "PyTorch's own fp32 is (the noise floor measured in the same run)"
        ),
    ] = NOISE_FACTOR,
    quantize: Annotated[
        str,
        typer.Option(help="weight-only quantized variants to build and gate: int8, int4, or none"),
    ] = "int8",
    block_size: Annotated[int, typer.Option(help="quantization: weights per scale")] = 32,
    accuracy_level: Annotated[
        int, typer.Option(help="quantized matmuls: 4 = int8 compute (fast), 1 = fp32")
    ] = 4,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="held-out data of the adapter's task (any file check-data accepts) for the "
            "gates and the parity prompt; default: the packaged drug reviews' test split"
        ),
    ] = None,
    eval_labels: Annotated[
        str,
        typer.Option(help="comma-separated answers of a label task (scored by accuracy)"),
    ] = "",
    eval_samples: Annotated[int, typer.Option(help="held-out examples the gates use")] = 150,
    fmt: FormatOpt = "auto",
    prompt_column: PromptColOpt = "prompt",
    response_column: ResponseColOpt = "response",
    system_column: SystemColOpt = "",
    text_column: TextColOpt = "",
    on_bad_record: BadRecordOpt = "stop",
    encoding: EncodingOpt = "utf-8",
    gate: Annotated[
        list[str] | None,
        typer.Option(
            help="a gate threshold, VARIANT.NAME=VALUE, e.g. int4.max-accuracy-drop=3 (repeat)"
        ),
    ] = None,
    graph: Annotated[
        str,
        typer.Option(
            help="ONNX graph: fused (one attention op per layer; Llama, Mistral, Qwen2), "
            "traced (optimum's trace of transformers), or auto (fused where it applies)"
        ),
    ] = "auto",
    base_only: Annotated[
        bool, typer.Option(help="export the base alone, with a LoRA slot per linear layer")
    ] = False,
    adapter_only: Annotated[
        bool, typer.Option(help="write only the adapter file for the --base bundle")
    ] = False,
    base: Annotated[
        Path | None, typer.Option(help="with --adapter-only: the --base-only bundle it fits")
    ] = None,
) -> None:
    """Merge an adapter into the base, export to ONNX with parity and task gates, answer once.
    On-device adapters: --base-only exports the base once; --adapter-only --base BUNDLE writes
    each adapter as one small file for it (docs/edge.md)."""
    from fedlora.basemodel import resolve_base_model
    from fedlora.export.card import DRUG_REVIEWS
    from fedlora.export.gates import parse_overrides
    from fedlora.export.pipeline import export_adapter
    from fedlora.export.quantize import QuantSettings, parse_variants
    from fedlora.server.central import central_examples
    from fedlora.simulations import report

    _check_options(eval_samples=eval_samples, atol=atol, noise_factor=noise_factor)
    variants = () if quantize.strip().lower() == "none" else parse_variants(quantize)
    thresholds = parse_overrides(gate or [])
    quant = QuantSettings(block_size=block_size, accuracy_level=accuracy_level)
    names = tuple(x.strip() for x in eval_labels.split(",") if x.strip())
    source = str(eval_data) if eval_data is not None else "drugreview"
    description = _data_description(
        fmt, prompt_column, response_column, system_column, text_column, on_bad_record, encoding
    )
    examples, labels = central_examples(
        source, eval_samples, names, option="--eval-data", spec=description
    )
    first = examples[0]
    prompt = [{"role": t.role, "content": t.content} for t in first.turns[:-1]]
    if base_only or adapter_only or adapter is None:
        from fedlora.export.adaptable import run_cli

        base_dir = resolve_base_model(base_model or "default")
        run_cli(base_dir, adapter, output, prompt, base_only, adapter_only, base, atol=atol,
                noise_factor=noise_factor, default_base=(base_model or "default") == "default",
                quantize=variants, quant=quant, eval_examples=examples, labels=labels,
                thresholds=thresholds)  # fmt: skip
        return
    exp = export_adapter(
        resolve_base_model(base_model or "default"),
        adapter,
        output,
        prompt,
        atol=atol,
        noise_factor=noise_factor,
        default_base=(base_model or "default") == "default",
        eval_data=(
            DRUG_REVIEWS
            if eval_data is None
            else {"name": source, "licence": "the data owner's", "source": source}
        ),
        quantize=variants,
        quant=quant,
        eval_examples=examples,
        labels=labels,
        thresholds=thresholds,
        graph=graph,
    )
    report.export(exp, first.turns[-2].content, first.turns[-1].content)


@cli.command()
def plan(
    config: ConfigOpt = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="'default', a model folder, a folder with only config.json, or a file"),
    ] = None,
    quantization: Annotated[
        str | None, typer.Option(help="auto | bf16 | fp32 | nf4 | int8 | quanto-int4 | ...")
    ] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
    target_modules: Annotated[str | None, typer.Option(help="'all-linear' or names")] = None,
    lora_layers: Annotated[int | None, typer.Option(help="LoRA on the last N layers")] = None,
    max_length: Annotated[int | None, typer.Option(help="tokens per row")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per micro-batch")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    compute: Annotated[
        str, typer.Option(help="auto (this machine's native dtype) | bf16 | fp32")
    ] = "auto",
    answer_tokens: Annotated[
        int, typer.Option(help="columns the loss scores (0: every column, the worst case)")
    ] = 0,
    memory: Annotated[
        float | None, typer.Option("--memory", help="GiB the node may use: largest batch")
    ] = None,
    tflops: Annotated[
        float | None, typer.Option(help="achieved TFLOP/s of the device (default: measured CPU)")
    ] = None,
    allocator: Annotated[
        str,
        typer.Option(
            help="CPU nodes: glibc (its defaults: adds an allowance for freed memory it keeps) "
            "or fixed (nodes run with MALLOC_MMAP_THRESHOLD_=131072)"
        ),
    ] = "glibc",
    plain: Annotated[bool, typer.Option(help="plain text instead of a table")] = False,
) -> None:
    """Memory, traffic and time of one node per round, from the config alone (no weights)."""
    from fedlora.basemodel import resolve_base_model
    from fedlora.planner import make_plan, table, with_budget
    from fedlora.planner import plain as plain_text

    overrides = {
        "base-model": base_model,
        "quantization": quantization,
        "lora-r": lora_r,
        "target-modules": target_modules,
        "lora-layers": lora_layers,
        "max-length": max_length,
        "batch-size": batch_size,
        "gradient-checkpointing": gradient_checkpointing,
    }
    cfg, _ = _load(config, overrides)
    given = Path(cfg.base_model)
    base = resolve_base_model("default") if cfg.base_model == "default" else given
    _check_options(answer_tokens=answer_tokens, memory=memory, tflops=tflops)
    found = make_plan(
        cfg,
        base,
        device=device,
        compute=compute,
        answer_tokens=answer_tokens,
        tflops=tflops,
        allocator=allocator,
    )
    if memory is not None:
        found = with_budget(found, int(memory * 2**30))
    if plain:
        typer.echo(plain_text(found))
    else:
        from rich.console import Console

        Console(highlight=False).print(table(found))


@cli.command("prepare-base")
def prepare_base() -> None:
    """De-quantize the packaged default model into the cache (done on first use anyway)."""
    from fedlora.basemodel import prepare_default

    typer.echo(prepare_default())


@cli.command("check-data")
def check_data(
    path: Annotated[Path, typer.Argument(help="a data file, or a folder of them")],
    fmt: FormatOpt = "auto",
    prompt_column: PromptColOpt = "prompt",
    response_column: ResponseColOpt = "response",
    system_column: SystemColOpt = "",
    text_column: TextColOpt = "",
    on_bad_record: BadRecordOpt = "stop",
    encoding: EncodingOpt = "utf-8",
) -> None:
    """Read training data as a node would, and report what it holds or what to fix."""
    from fedlora.data.formats import DataSpec, describe, load_examples

    result = load_examples(
        DataSpec(
            str(path),
            format=fmt,
            prompt_column=prompt_column,
            response_column=response_column,
            system_column=system_column,
            text_column=text_column,
            on_bad_record=on_bad_record,
            encoding=encoding,
        )
    )
    typer.echo(describe(result))


# ---- fedlora federation: deployment tooling (deploy/, needs only cryptography and Flower) ----
from fedlora.deploy.cli import federation as _federation  # noqa: E402

cli.add_typer(_federation, name="federation")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    from fedlora.simulations.run import offline_environment

    offline_environment()
    configure_console(verbose=verbose_requested())
    try:
        code = cli(args=argv, standalone_mode=False)
    except FedloraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if isinstance(exc, click.exceptions.Abort):
            raise SystemExit(130) from None
        raise
    if isinstance(code, int) and code:  # typer.Exit(code) without standalone mode
        raise SystemExit(code)


if __name__ == "__main__":
    main()
