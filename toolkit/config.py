"""Run configuration: a typed schema, TOML loading, `--set key=value` overrides and validation.

Every problem is reported as a `ConfigError` naming the dotted key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Stage1Method = Literal["fedce", "fedsc", "hybrid"]
GateMethod = Literal["rangate", "rollgate", "fedavggate", "fedgate", "localgate",
                     "fedgate_ood", "fedgate_vl", "localgate_vl", "fedgate_heldout", "fedgate_switch"]
BaselineMethod = Literal["local", "fedavg", "fedavg_ft", "centralized"]
STAGE1_METHODS: tuple[Stage1Method, ...] = ("fedce", "fedsc", "hybrid")
CLASSIC_GATES: tuple[GateMethod, ...] = ("rangate", "rollgate", "fedavggate", "fedgate", "localgate")
EXTENDED_GATES: tuple[GateMethod, ...] = (  # toolkit.gates
    "fedgate_ood", "fedgate_vl", "localgate_vl", "fedgate_heldout", "fedgate_switch")
GATE_METHODS: tuple[GateMethod, ...] = CLASSIC_GATES + EXTENDED_GATES
BASELINE_METHODS: tuple[BaselineMethod, ...] = ("local", "fedavg", "fedavg_ft", "centralized")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending dotted key."""


@dataclass(frozen=True)
class DataConfig:
    """Dataset and its non-IID split over clients."""

    dataset: Literal["fashion_mnist", "cifar10", "synthetic"] = "fashion_mnist"
    path: str = ""  # empty: the dataset's default location
    num_clients: int = 10
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration
    classes_per_client: int = 2  # shards
    min_client_size: int = 10  # Dirichlet resamples until every client has this many samples
    personal_test_size: int = 1000  # per-client test split drawn with the client's label mix
    max_train_samples: int = 0  # 0: all; otherwise a seeded stratified subsample (fast runs)
    synthetic_train: int = 2000
    synthetic_test: int = 500
    synthetic_image_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the extractor, experts and gate."""

    width: int = 16  # channels of the first conv; doubled per stage
    latent_dim: int = 64
    expert_hidden: int = 128
    gate_hidden: int = 64
    top_k: int = 2


@dataclass(frozen=True)
class FederatedConfig:
    """Rounds of Stage 1 (extractor) and of the `fedavg` baseline, which share one training loop;
    the round keys (quorum, deadline, retries) mean the same in [gate]."""

    rounds: int = 10
    local_epochs: int = 1
    client_fraction: float = 1.0
    min_fit_fraction: float = 1.0  # quorum: share of a round's sampled clients that must deliver ...
    min_fit_clients: int = 1  # ... and at least this many; else the round is asked again
    round_timeout: float = 0.0  # seconds a round waits for its clients; 0: no deadline
    round_retries: int = 2  # a round without quorum is asked again this often, then the run stops
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class Stage1Config:
    """Which extractor objectives to run, and the contrastive settings."""

    methods: tuple[Stage1Method, ...] = STAGE1_METHODS
    sc_temperature: float = 0.5
    sc_weight: float = 1.0  # weight of the contrastive term in `hybrid`
    sc_batch_size: int = 128
    projection_dim: int = 32


@dataclass(frozen=True)
class ExpertConfig:
    """Stage 2: each client trains its own expert on its own data, extractor frozen; every device
    must do it (and then gather the experts' outputs for Stage 3)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    timeout: float = 0.0  # seconds each step every device must do (extractor, expert, gate data); 0: none
    retries: int = 2  # devices that failed such a step are asked again this often, then the run stops


@dataclass(frozen=True)
class GateConfig:
    """Stage 3: gate variants and their federated schedule."""

    methods: tuple[GateMethod, ...] = CLASSIC_GATES
    rounds: int = 20
    local_epochs: int = 1
    client_fraction: float = 1.0
    min_fit_fraction: float = 1.0
    min_fit_clients: int = 1
    round_timeout: float = 0.0
    round_retries: int = 2
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.0
    virtual_per_class: int = 300  # *_vl: virtual latents per class drawn from the pooled class statistics
    class_stats: Literal["full", "diagonal"] = "full"  # *_vl: covariances devices share
    heldout_fraction: float = 0.25  # fedgate_heldout: gate data; fedgate_ood: data that sets the threshold
    ood_quantile: float = 0.95  # fedgate_ood: held-out score quantile where the shared expert takes half
    ood_temperature: float = 0.25  # fedgate_ood: softness of the switch, in units of the held-out spread


@dataclass(frozen=True)
class BaselineConfig:
    """Reference methods that train a whole dense model (extractor + classifier head)."""

    methods: tuple[BaselineMethod, ...] = BASELINE_METHODS
    local_epochs: int = 10
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    centralized_epochs: int = 5


@dataclass(frozen=True)
class Config:
    """A whole run."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    def nmoe_methods(self) -> list[str]:
        """`nmoe_<stage1>_<gate>` names this config runs."""
        return [f"nmoe_{s}_{g}" for s in self.stage1.methods for g in self.gate.methods]

    def method_names(self) -> list[str]:
        """All method names, baselines first."""
        return list(self.baselines.methods) + self.nmoe_methods()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), as written to the run dir."""
        plain: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return plain

    def hash(self) -> str:
        """Stable sha256 of the resolved config."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def describe(width: int = 96) -> str:
    """Every config key with its default, by section (for --help; generated, so never stale)."""
    lines, defaults = [], Config()
    for f in dataclasses.fields(Config):
        section = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(section):
            lines.append(f"  {f.name}={_show(section)}")
            continue
        doc = (type(section).__doc__ or "").strip()
        items = ", ".join(f"{g.name}={_show(getattr(section, g.name))}" for g in dataclasses.fields(section))
        lines.append(f"  [{f.name}] {doc}")
        lines += textwrap.wrap(items, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


# ---- building from dicts -------------------------------------------------------------------

def _check_scalar(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _convert(key: str, value: Any, tp: Any) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = tuple(_check_scalar(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
        if len(set(items)) != len(items):
            raise ConfigError(f"{key}: duplicate entries in {list(items)}")
        return items
    return _check_scalar(key, value, tp)


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    where = prefix or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & raw.keys():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(full, raw[name], hints[name])
    return cls(**kwargs)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> Config:
    """Reject impossible values; returns cfg unchanged when it is sound."""
    d, m = cfg.data, cfg.model
    _require(d.num_clients >= 2, "data.num_clients", f"need at least 2 clients, got {d.num_clients}")
    _require(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _require(d.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
    _require(d.min_client_size >= 1, "data.min_client_size", "must be >= 1")
    _require(d.personal_test_size >= 1, "data.personal_test_size", "must be >= 1")
    _require(d.max_train_samples >= 0, "data.max_train_samples", "must be >= 0 (0 = all)")
    _require(d.synthetic_train >= 10, "data.synthetic_train", "must be >= 10")
    _require(d.synthetic_test >= 10, "data.synthetic_test", "must be >= 10")
    _require(d.synthetic_image_size >= 8, "data.synthetic_image_size", "must be >= 8")
    _require(d.dataset != "cifar10" or bool(d.path), "data.path",
             "cifar10 needs the folder holding cifar-10-batches-py (it cannot be downloaded here)")
    for key in ("width", "latent_dim", "expert_hidden", "gate_hidden"):
        _require(getattr(m, key) >= 1, f"model.{key}", "must be >= 1")
    _require(1 <= m.top_k <= d.num_clients, "model.top_k",
             f"must be between 1 and data.num_clients={d.num_clients}, got {m.top_k}")
    schedules: dict[str, FederatedConfig | GateConfig] = {"federated": cfg.federated, "gate": cfg.gate}
    for section, sc in schedules.items():
        _require(sc.rounds >= 1, f"{section}.rounds", f"must be >= 1, got {sc.rounds}")
        _require(sc.local_epochs >= 1, f"{section}.local_epochs", "must be >= 1")
        _require(0 < sc.client_fraction <= 1, f"{section}.client_fraction",
                 f"must be in (0, 1], got {sc.client_fraction}")
        _require(0 < sc.min_fit_fraction <= 1, f"{section}.min_fit_fraction",
                 f"must be in (0, 1], got {sc.min_fit_fraction}")
        _require(1 <= sc.min_fit_clients <= d.num_clients, f"{section}.min_fit_clients",
                 f"must be between 1 and data.num_clients={d.num_clients}, got {sc.min_fit_clients}")
        _require(sc.round_timeout >= 0, f"{section}.round_timeout", "must be >= 0 (0 = no deadline)")
        _require(sc.round_retries >= 0, f"{section}.round_retries", "must be >= 0")
    for section in ("federated", "stage1", "expert", "gate"):
        for key in ("batch_size", "sc_batch_size"):
            value = getattr(getattr(cfg, section), key, None)
            _require(value is None or value >= 2, f"{section}.{key}", f"must be >= 2, got {value}")
    for key in ("federated.lr", "expert.lr", "gate.lr", "baselines.finetune_lr"):
        section, name = key.split(".")
        _require(getattr(getattr(cfg, section), name) > 0, key, "must be > 0")
    _require(0 <= cfg.federated.momentum < 1, "federated.momentum", "must be in [0, 1)")
    _require(cfg.stage1.sc_temperature > 0, "stage1.sc_temperature", "must be > 0")
    _require(cfg.stage1.sc_weight >= 0, "stage1.sc_weight", "must be >= 0")
    _require(cfg.stage1.projection_dim >= 1, "stage1.projection_dim", "must be >= 1")
    _require(cfg.expert.epochs >= 1, "expert.epochs", "must be >= 1")
    _require(cfg.gate.virtual_per_class >= 1, "gate.virtual_per_class", "must be >= 1")
    _require(0 < cfg.gate.heldout_fraction < 1, "gate.heldout_fraction", "must be in (0, 1)")
    _require(0 < cfg.gate.ood_quantile < 1, "gate.ood_quantile", "must be in (0, 1)")
    _require(cfg.gate.ood_temperature > 0, "gate.ood_temperature", "must be > 0")
    if "fedgate_switch" in cfg.gate.methods:
        before = cfg.gate.methods[:cfg.gate.methods.index("fedgate_switch")]
        _require("fedgate" in before and "fedgate_vl" in before, "gate.methods",
                 "fedgate_switch switches between fedgate and fedgate_vl: list both before it")
    _require(cfg.expert.timeout >= 0, "expert.timeout", "must be >= 0 (0 = no deadline)")
    _require(cfg.expert.retries >= 0, "expert.retries", "must be >= 0")
    for key in ("local_epochs", "finetune_epochs", "centralized_epochs"):
        _require(getattr(cfg.baselines, key) >= 1, f"baselines.{key}", "must be >= 1")
    _require(bool(cfg.method_names()), "baselines.methods",
             "nothing to run: select baselines or both stage1.methods and gate.methods")
    return cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. gate.rounds=5")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: --set data.partition=iid
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as TOML) to a raw config dict."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a table")
        node[path[-1]] = value
    return out


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict."""
    return validate(_build(Config, raw))


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config file, apply overrides, validate."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e}); expected a TOML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; expected a TOML config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return from_dict(apply_overrides(raw, overrides or []))
