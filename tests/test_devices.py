"""Device and precision selection: the FEDLORA_CPU_BF16 override, CUDA-or-CPU selection (CUDA
visibility is mocked: no GPU here), and what quantization="auto" resolves to per device."""

from __future__ import annotations

import pytest

from fedlora import precision


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    """A CPU whose probes say AMX is there (whatever this machine has)."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    precision._cpu_probes_bf16.cache_clear()
    yield
    precision._cpu_probes_bf16.cache_clear()


def test_cpu_bf16_env_zero_makes_a_native_cpu_behave_like_avx2(native_bf16_cpu, monkeypatch):
    import torch

    monkeypatch.delenv("FEDLORA_CPU_BF16", raising=False)
    assert precision.cpu_has_bf16()
    assert precision.compute_dtype("cpu") == torch.bfloat16

    monkeypatch.setenv("FEDLORA_CPU_BF16", "0")

    assert not precision.cpu_has_bf16()
    assert precision.compute_dtype("cpu") == torch.float32


def test_cpu_bf16_env_other_values_keep_the_probe(native_bf16_cpu, monkeypatch):
    monkeypatch.setenv("FEDLORA_CPU_BF16", "1")
    assert precision.cpu_has_bf16()


# ---- device selection (CUDA visibility mocked) ----------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "_FELL_BACK", [])
    monkeypatch.delenv("FEDLORA_DEVICE", raising=False)


def test_auto_falls_back_to_cpu_with_one_log_line(no_cuda, caplog):
    with caplog.at_level("INFO", logger="fedlora.precision"):
        picked = [precision.device(), precision.device("auto"), precision.device("")]

    assert picked == ["cpu", "cpu", "cpu"]
    assert [r.getMessage() for r in caplog.records] == ["No CUDA GPU visible: models run on CPU"]


def test_cuda_asked_for_without_a_gpu_is_a_config_error(no_cuda, monkeypatch):
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="no CUDA GPU is visible.*--gpus-per-client"):
        precision.device("cuda")
    monkeypatch.setenv("FEDLORA_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="device='cuda'"):
        precision.device()
    with pytest.raises(ConfigError, match="use one of auto, cpu, cuda"):
        precision.device("tpu")


def test_cuda_is_picked_when_visible_unless_pinned_to_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FEDLORA_DEVICE", raising=False)
    assert precision.device() == "cuda"
    assert precision.device("cuda") == "cuda"
    monkeypatch.setenv("FEDLORA_DEVICE", "cpu")
    assert precision.device() == "cpu"
    assert precision.device("cuda") == "cuda"  # a node's own setting wins over the environment


def test_node_settings_carry_the_device():
    from fedlora.client.node import NodeSettings

    base = {"base-model": "default", "quantization": "auto", "site": "pain"}
    assert NodeSettings.from_config(base).device == ""
    assert NodeSettings.from_config(base | {"device": "cuda"}).device == "cuda"


# ---- quantization="auto" per device ---------------------------------------------------------


@pytest.mark.parametrize(
    ("dev", "dtype", "backend", "line"),
    [
        ("cuda", "bfloat16", "nf4", "nf4 (bitsandbytes NF4 weights, bfloat16 compute)"),
        ("cuda", "float32", "nf4", "nf4 (bitsandbytes NF4 weights, float32 compute)"),
        ("cpu", "bfloat16", "auto", "plain bfloat16 weights (native here)"),
        ("cpu", "float32", "auto", "plain float32 weights (no native bf16 here)"),
    ],
)
def test_auto_quantization_is_decided_per_device(dev, dtype, backend, line):
    import torch

    from fedlora.client.quantization import describe_auto, resolve_auto

    assert resolve_auto(dev) == backend
    assert describe_auto(dev, getattr(torch, dtype)) == f'quantization="auto" on {dev}: {line}'


def test_auto_on_cuda_loads_nf4_with_bf16_compute(tiny_model_dir, monkeypatch, caplog):
    """Where a GPU is visible, "auto" asks the nf4 backend for the GPU in bf16 (the load itself
    is faked: there is no GPU here)."""
    import torch

    from fedlora.client import quantization

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(quantization.Backend, "available", lambda self: None)
    asked = []

    def fake_load(self, model_dir, dev, dtype):
        asked.append((self.name, dev, dtype))
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(quantization.Backend, "load", fake_load)

    with caplog.at_level("INFO", logger="fedlora.client.quantization"):
        quantization.load_base(tiny_model_dir, "auto")

    assert asked == [("nf4", "cuda", torch.bfloat16)]
    assert any('quantization="auto" on cuda: nf4' in r.getMessage() for r in caplog.records)


def test_auto_on_cpu_is_unchanged_and_says_so(tiny_model_dir, no_cuda, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    from fedlora.client.quantization import load_base

    with caplog.at_level("INFO", logger="fedlora.client.quantization"):
        model = load_base(tiny_model_dir, "auto")

    assert {str(p.dtype) for p in model.parameters()} == {"torch.float32"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert 'quantization="auto" on cpu: plain float32 weights' in caplog.text


# ---- batches follow the model to its device -------------------------------------------------


class _MetaModel:
    """Stands in for a model on another device ("meta"): records where its inputs were."""

    def __init__(self):
        import torch

        self.embed = torch.nn.Embedding(8, 4, device="meta")
        self.seen: list[str] = []

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return None

    def __call__(self, **kw):
        import torch

        self.seen += [v.device.type for v in kw.values() if isinstance(v, torch.Tensor)]
        b = kw["input_ids"].shape[0]
        return type("Out", (), {"logits": torch.zeros(b, kw["logits_to_keep"], 8, device="meta")})


def test_answer_logits_moves_the_batch_to_the_models_device():
    from fedlora.prompting import Encoded, answer_logits, collate

    model = _MetaModel()
    batch = collate([Encoded([1, 2, 3], [-100, 2, 3], False)], pad_id=0)

    logits, targets = answer_logits(model, batch)

    assert model.seen == ["meta", "meta", "meta"]
    assert targets.device.type == logits.device.type == "meta"


# ---- simulate: resources and the Ray address reach Flower ------------------------------------


def test_backend_config_private_ray_and_cluster():
    from fedlora.errors import ConfigError
    from fedlora.simulations.run import backend_config

    private = backend_config(2.0, 0.25)
    assert private["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert private["init_args"]["address"] == "local"  # never a `ray start` cluster here
    cluster = backend_config(1.0, 0.0, "10.0.0.1:6379")
    assert cluster["init_args"]["address"] == "10.0.0.1:6379"
    assert "num_cpus" not in cluster["init_args"]  # ray.init refuses it for an existing cluster
    with pytest.raises(ConfigError, match="gpus-per-client"):
        backend_config(1.0, -1.0)
    with pytest.raises(ConfigError, match="cpus-per-client"):
        backend_config(0.0)


class _Captured(Exception):
    pass


def _invoke_simulate(monkeypatch, tiny_model_dir, tmp_path, *options):
    import flwr.simulation
    from typer.testing import CliRunner

    from fedlora.cli import cli

    captured = {}

    def fake_run_simulation(**kwargs):
        captured.update(kwargs)
        raise _Captured

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    result = CliRunner().invoke(
        cli,
        ["simulate", "--base-model", str(tiny_model_dir), "--output", str(tmp_path), *options],
    )
    assert isinstance(result.exception, _Captured), result.output
    return captured


def test_gpus_per_client_reaches_flowers_client_resources(monkeypatch, tiny_model_dir, tmp_path):
    captured = _invoke_simulate(
        monkeypatch,
        tiny_model_dir,
        tmp_path,
        "--gpus-per-client",
        "0.125",
        "--cpus-per-client",
        "2",
        "--ray-address",
        "127.0.0.1:6399",
    )

    backend = captured["backend_config"]
    assert backend["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.125}
    assert backend["init_args"]["address"] == "127.0.0.1:6399"


def test_simulate_defaults_keep_clients_on_cpu_in_private_ray(
    monkeypatch, tiny_model_dir, tmp_path
):
    captured = _invoke_simulate(monkeypatch, tiny_model_dir, tmp_path)

    backend = captured["backend_config"]
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert backend["init_args"]["address"] == "local"


def test_by_default_a_visible_gpu_is_shared_by_the_clients(monkeypatch, tiny_model_dir, tmp_path):
    from fedlora.simulations import run

    monkeypatch.setattr(run, "visible_gpus", lambda: 1)  # one GPU, mocked; five packaged sites

    captured = _invoke_simulate(monkeypatch, tiny_model_dir, tmp_path)

    assert captured["backend_config"]["client_resources"]["num_gpus"] == pytest.approx(0.2)
    assert run.default_gpus_per_client(5, ray_address="10.0.0.1:6379") == 0.0  # not our GPUs
    assert run.default_gpus_per_client(1) == 1.0  # at most one GPU per client
