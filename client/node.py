"""A node's warm state: base model + LoRA loaded once per process, and the node's private data.

Flower calls the ClientApp once per message; the base model stays in a module-level cache so a
second round in the same process only swaps adapter weights (no reload). The data is read,
validated, split (train/eval, seeded) and tokenized once per process too.

A node's data is either a ``data-path`` (a file or folder in any format of
:mod:`fedlora.data.formats`) or, by default, one site of the packaged drug reviews.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.basemodel import resolve_base_model
from fedlora.config import parse_ranks
from fedlora.data.drugreview import LABELS, SITES, load_split, split_by_site
from fedlora.data.formats import DataSpec, describe, load_examples, train_eval_split
from fedlora.data.partitioned import client_examples
from fedlora.data.records import Example
from fedlora.encoding import EncodeReport, encode_examples, pack
from fedlora.errors import ConfigError, DataError
from fedlora.lora import R_WEIGHT, LoraSettings
from fedlora.prompting import Encoded, review_example
from fedlora.protocol.adapter import AdapterSpec, spec_of
from fedlora.protocol.gate import ProtocolError
from fedlora.readback import load_npz
from fedlora.savedfiles import atomic_file

log = logging.getLogger(__name__)

# Node-config keys that describe a node's own data (they never leave the node).
DATA_KEYS = {
    "data-path": "path",
    "data-format": "format",
    "prompt-column": "prompt_column",
    "response-column": "response_column",
    "system-column": "system_column",
    "text-column": "text_column",
    "on-bad-record": "on_bad_record",
    "data-encoding": "encoding",
}


@dataclass(frozen=True)
class NodeSettings:
    """Node-local settings: which base model, how to load it, which private data, and limits."""

    base_model: str
    quantization: str
    site: str  # a name for reports; one of SITES selects that packaged drug-review site
    data: DataSpec | None = None  # the node's own data; None = the packaged site
    eval_fraction: float = 0.1  # share of examples held out for evaluation (seeded split)
    eval_labels: tuple[str, ...] = ()  # label task: answers scored for accuracy
    seed: int = 0  # seeds the train/eval split
    # the node refuses rounds asking for more micro-batches; 0 = client/limits.py's default
    max_local_steps: int = 0
    # the node refuses rounds asking for larger batches; 0 = what its memory allows
    # (client/limits.py)
    max_batch_size: int = 0
    # the node refuses rounds whose DP noise multiplier (sent under secure aggregation, where
    # the nodes add the noise) is below this; 0 = no minimum
    dp_min_noise_multiplier: float = 0.0
    # the most nodes this node sizes its DP noise share for, whatever the server announces;
    # 0 = its roster's size when it has one (secagg-roster), else no bound
    dp_max_contributors: int = 0
    # simulation: a partition folder (fedlora.data.partitioned); this node trains on client
    # ``partition_id`` of it
    partition_dir: str = ""
    partition_id: int = -1
    # simulation: personal factors (FedSA-LoRA's B) kept in files here, not in memory
    personal_dir: str = ""
    # where the model runs: auto | cpu | cuda; "" = FEDLORA_DEVICE, else auto
    # (fedlora.precision.device)
    device: str = ""
    # memory this node may train in, GiB (RAM on CPU, GPU memory on CUDA): a round whose step
    # fits it only with gradient checkpointing turns it on (client/memory_plan.py); 0 = off
    memory_gib: float = 0.0
    # this node's LoRA rank, at most the run's lora-r-max (client/ranks.py); 0 = the run's
    # lora-r. In simulation, the run's client-ranks give it by partition-id
    lora_r: int = 0

    @property
    def site_id(self) -> int:
        return SITES.index(self.site) if self.site in SITES else -1

    @property
    def seed_id(self) -> int:
        """A non-negative number for seeding this node's sampling: the site index, or a hash."""
        return self.site_id if self.site_id >= 0 else zlib.crc32(self.site.encode()) + len(SITES)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.eval_labels or (LABELS if self.data is None else ())

    @classmethod
    def from_config(cls, merged: Mapping[str, Any]) -> NodeSettings:
        """From run config overlaid by node config (``site``, or ``partition-id`` in simulation)."""
        data = None
        if merged.get("data-path"):
            data = DataSpec(
                **{attr: merged[key] for key, attr in DATA_KEYS.items() if key in merged}
            )
        site = merged.get("site")
        partition_dir = str(merged.get("partition-dir", "") or "")
        partition_id = -1
        if partition_dir:
            partition_id = int(merged.get("partition-id", 0))
            site = site or f"client-{partition_id}"
        elif site is None and data is None:
            sites = [s.strip() for s in str(merged.get("sites", ",".join(SITES))).split(",")]
            pid = int(merged.get("partition-id", 0))
            if pid >= len(sites):
                raise ConfigError(
                    f"partition-id {pid} has no site: sites={sites}; run at most "
                    f"{len(sites)} nodes or list more sites"
                )
            site = sites[pid]
        if data is None and not partition_dir and site not in SITES:
            raise ConfigError(f"site={site!r}: use one of {SITES}, or give data-path")
        labels = tuple(
            x.strip() for x in str(merged.get("eval-labels", "")).split(",") if x.strip()
        )
        try:
            return cls(
                base_model=str(merged.get("base-model", "default")),
                quantization=str(merged.get("quantization", "nf4")),
                site=str(site or "node"),
                data=data,
                eval_fraction=float(merged.get("eval-fraction", 0.1)),
                eval_labels=labels,
                seed=int(merged.get("seed", 0)),
                max_local_steps=int(merged.get("max-local-steps", 0)),
                max_batch_size=int(merged.get("max-batch-size", 0)),
                dp_min_noise_multiplier=float(merged.get("dp-min-noise-multiplier", 0.0)),
                dp_max_contributors=_contributor_bound(merged),
                partition_dir=partition_dir,
                partition_id=partition_id,
                personal_dir=str(merged.get("personal-state-dir", "") or ""),
                device=str(merged.get("device", "") or ""),
                memory_gib=float(merged.get("memory-gib", 0.0)),
                lora_r=_own_rank(merged),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node settings: {exc}") from None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ConfigError(f"lora-r={self.lora_r!r}: this node's LoRA rank, a whole number >= 1")
        if self.dp_max_contributors < 0:
            raise ConfigError(
                f"dp-max-contributors={self.dp_max_contributors}: must be >= 0 (0: the roster's "
                f"size)"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval-fraction={self.eval_fraction}: must be in [0, 1)")
        if not 0 <= self.memory_gib < float("inf"):
            raise ConfigError(f"memory-gib={self.memory_gib}: must be >= 0 (0: no check)")
        if not 0 <= self.dp_min_noise_multiplier < float("inf"):
            raise ConfigError(
                f"dp-min-noise-multiplier={self.dp_min_noise_multiplier}: must be a number >= 0"
            )


def _contributor_bound(merged: Mapping[str, Any]) -> int:
    """``dp-max-contributors``, or the number of nodes in the node's roster (no secure round has
    more signed participants), or 0 (no bound: simulations, unauthenticated nodes)."""
    bound = int(merged.get("dp-max-contributors", 0) or 0)
    if bound or not merged.get("secagg-roster"):
        return bound
    from fedlora.protocol.secagg_auth import Roster

    return len(Roster.load(str(merged["secagg-roster"])).keys)


@dataclass
class WarmModel:
    model: Any  # peft model over the frozen base
    tokenizer: Any
    spec: AdapterSpec  # names and shapes of the LoRA tensors
    load_seconds: float
    rounds_served: int = 0


@dataclass
class NodeData:
    """A node's examples, split once (seeded) into train and eval."""

    train: list[Example]
    eval: list[Example]
    skipped: int = 0  # bad records dropped (on-bad-record=skip)
    encoded: dict[tuple[Any, ...], tuple[list[Encoded], EncodeReport]] = field(default_factory=dict)


_MODELS: dict[tuple[Any, ...], WarmModel] = {}
_DATA: dict[tuple[Any, ...], NodeData] = {}
DATA_CACHE = 8  # nodes' data kept per process: a simulation serves many clients in turn
_LOADS = [0]


def _own_rank(merged: Mapping[str, Any]) -> int:
    """The node's lora-r: from the run's client-ranks by partition-id (simulation), else its
    lora-r setting, else 0 (the run's)."""
    ranks = parse_ranks(str(merged.get("client-ranks", "") or ""))
    if ranks and "partition-id" in merged:
        return ranks[int(merged["partition-id"]) % len(ranks)]
    value = merged.get("lora-r", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"lora-r={value!r}: this node's LoRA rank, a whole number >= 1")
    return value


def warm_model(settings: NodeSettings, lora: LoraSettings) -> WarmModel:
    """The cached base + LoRA for these settings, loaded on first use.

    The key leaves out the site: in simulation one process serves different sites in turn, and
    only the data changes between them.
    """
    key = (settings.base_model, settings.quantization, settings.device, lora)
    if key not in _MODELS:
        _MODELS.clear()  # one base model per process: free the old one before loading another
        _MODELS[key] = _load_model(settings, lora)
    return _MODELS[key]


def node_data(settings: NodeSettings) -> NodeData:
    """The node's examples, read, validated and split once per process."""
    key = (
        settings.data,
        settings.site,
        settings.partition_dir,
        settings.eval_fraction,
        settings.seed,
    )
    if key in _DATA:
        _DATA[key] = _DATA.pop(key)  # most recently used last
    else:
        while len(_DATA) >= DATA_CACHE:  # memory must not grow with the clients served
            _DATA.pop(next(iter(_DATA)))
        if settings.partition_dir:
            examples = client_examples(settings.partition_dir, settings.partition_id)
            skipped = 0
        elif settings.data is not None:
            result = load_examples(settings.data)
            log.info("Node data: %s", describe(result))
            examples, skipped = result.examples, len(result.skipped)
        else:
            examples, skipped = site_examples(settings.site), 0
        train, held_out = train_eval_split(examples, settings.eval_fraction, settings.seed)
        if not train:
            raise DataError(
                f"{settings.data.path if settings.data else settings.site}: no "
                f"training examples left after the eval split"
            )
        _DATA[key] = NodeData(train=train, eval=held_out, skipped=skipped)
    return _DATA[key]


def encoded_rows(
    data: NodeData, part: str, tokenizer: Any, max_length: int, loss: str, packing: bool
) -> list[Encoded]:
    """``data.train`` or ``data.eval`` tokenized (and packed), cached per settings."""
    key = (part, id(tokenizer), max_length, loss, packing)
    if key not in data.encoded:
        examples = data.train if part == "train" else data.eval
        rows, report = encode_examples(tokenizer, examples, max_length, loss)
        if report.truncated or report.dropped:
            log.info(
                "%s split: %d of %d examples cut to max-length=%d, %d dropped with nothing "
                "to learn left (first: %s)",
                part,
                report.truncated,
                report.examples,
                max_length,
                report.dropped,
                report.dropped_sources[:3],
            )
        if part == "train" and not rows:
            raise DataError(f"no training example fits max-length={max_length}: raise it")
        data.encoded[key] = (pack(rows, max_length) if packing else rows, report)
    return data.encoded[key][0]


def site_examples(site: str) -> list[Example]:
    """A packaged drug-review site as chat examples (review + question -> rating)."""
    reviews = split_by_site(load_split("train"))[site]
    if not reviews:
        raise DataError(f"site {site!r} has no training reviews")
    return [
        review_example(r.text, r.label, f"drugreview:train:{site}:{i}")
        for i, r in enumerate(reviews)
    ]


def load_personal(settings: NodeSettings, kind: str = "") -> dict[str, np.ndarray] | None:
    """This node's personal factors (or another ``kind`` of its state, e.g. the downlink's
    copy) from ``personal_dir`` (None before its first round)."""
    path = _personal_path(settings, kind)
    if not path.exists():
        return None
    fix = (
        "this node's saved state is corrupted; move the file aside (the node then starts that "
        "state afresh) or restore it from a backup"
    )
    return load_npz(path, fix, ("float32", "float64"))  # the downlink's version is float64


def save_personal(settings: NodeSettings, arrays: Mapping[str, np.ndarray], kind: str = "") -> None:
    with atomic_file(_personal_path(settings, kind)) as f:  # a crash leaves the previous ones
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


def _personal_path(settings: NodeSettings, kind: str = "") -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.site)
    return Path(settings.personal_dir) / (f"{safe}.{kind}.npz" if kind else f"{safe}.npz")


def loads_so_far() -> int:
    """How many times this process has loaded a base model."""
    return _LOADS[0]


def _load_model(settings: NodeSettings, lora: LoraSettings) -> WarmModel:
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from fedlora.client.quantization import load_base

    start = time.perf_counter()
    base_dir = resolve_base_model(settings.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = load_base(base_dir, settings.quantization, settings.device)
    try:
        model = get_peft_model(base, lora.peft_config(base_dir))
    except ValueError as exc:  # peft's NoMatchingPeftModuleError: the server named no layer
        if "not found in the base model" not in str(exc):
            raise
        raise ProtocolError(
            f"round config target-modules={lora.target_modules[:40]!r} names no layer of this "
            f"node's model"
        ) from None
    if lora.sb:
        from fedlora.client.lora_sb import attach_sb

        attach_sb(model)
    _LOADS[0] += 1
    warm = WarmModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec_of(get_lora_state(model)),
        load_seconds=time.perf_counter() - start,
    )
    log.info(
        "Base %s (%s) + LoRA r=%d ready in %.1f s: %d LoRA tensors",
        base_dir.name,
        settings.quantization,
        lora.r,
        warm.load_seconds,
        len(warm.spec),
    )
    return warm


def get_lora_state(model: Any) -> dict[str, np.ndarray]:
    """The LoRA tensors under their PEFT file names (LoRA-SB's R as ``lora_R``), float32."""
    from peft import get_peft_model_state_dict

    from fedlora.client.lora_sb import is_sb_key, sb_state

    state = {
        k: v.detach().float().cpu().numpy()
        for k, v in get_peft_model_state_dict(model).items()
        if not is_sb_key(k)
    }
    return state | sb_state(model)


def set_lora_state(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    from fedlora.client.lora_sb import set_sb_state

    set_sb_state(model, {k: v for k, v in arrays.items() if k.endswith(R_WEIGHT)})
    result: Any = set_peft_model_state_dict(  # peft annotates a bare namedtuple
        model,
        {k: torch.from_numpy(np.array(v)) for k, v in arrays.items() if not k.endswith(R_WEIGHT)},
    )
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"adapter tensors not in the model: {bad[:3]}")


def set_trainable(model: Any, factors: str) -> None:
    """Train the LoRA factors in ``factors`` ("AB", "B" or "R"); freeze the others."""
    from fedlora.client.lora_sb import SB_PARAM

    for name, param in model.named_parameters():
        if name.endswith(f".{SB_PARAM}"):
            param.requires_grad_("R" in factors)
        elif ".lora_A." in name:
            param.requires_grad_("A" in factors)
        elif ".lora_B." in name:
            param.requires_grad_("B" in factors)


def seed_torch(*key: int) -> None:
    """Seed torch from a tuple (seed, site, round): a round trains the same wherever it runs."""
    import torch

    torch.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
