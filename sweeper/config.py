"""Structured configs: the schema Hydra validates every composed trial config against.

Types are checked by OmegaConf while composing; ranges are checked in `__post_init__`, which runs
when `OmegaConf.to_object` turns the composed config into these dataclasses, before any model is
loaded. Every violation raises `ConfigError`, whose message is one line naming the key, the value
and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

KV_CACHE_MODES = ("dynamic", "static", "offloaded", "quantized", "off")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value outside what is allowed; the message is meant for the user as is."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid value for '{key}': {value!r} (allowed: {allowed})")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(choices))


def looks_like_local_path(path: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper) is a local path."""
    return (
        path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()
    )


def check_existing_path(key: str, path: str | None, what: str = "an existing path") -> None:
    if path is not None:
        _check(Path(path).expanduser().exists(), key, path, what)


@dataclass
class EngineConfig:
    name: str = MISSING
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("engine.device", self.device, DEVICES)
        _check_choice("engine.dtype", self.dtype, DTYPES)


@dataclass
class HFEngineConfig(EngineConfig):
    name: str = "hf"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("engine.attn_implementation", self.attn_implementation, ("sdpa", "eager"))


@dataclass
class ModelConfig:
    """`path` is a local folder or a hub id; `builder` makes a tiny model offline instead."""

    name: str = MISSING
    path: str | None = None
    builder: str | None = None
    random_weights: bool = False
    cache_dir: str = "~/.cache/sweeper/models"

    def __post_init__(self) -> None:
        _check(
            (self.path is None) != (self.builder is None),
            "model.path",
            self.path,
            "exactly one of model.path and model.builder",
        )
        if self.builder is not None:
            _check_choice("model.builder", self.builder, ("tiny_random",))
        if self.path is not None and looks_like_local_path(self.path):
            check_existing_path("model.path", self.path, "an existing model folder or a hub id")


@dataclass
class DatasetConfig:
    name: str = MISSING
    limit: int | None = None
    seed: int | None = None  # shuffle with this seed before `limit`; None keeps file order
    prefetch: int = 16  # decoded images kept ready ahead of the engine

    def __post_init__(self) -> None:
        if self.limit is not None:
            _check(self.limit >= 1, "dataset.limit", self.limit, "an integer >= 1 or null")
        _check(self.prefetch >= 1, "dataset.prefetch", self.prefetch, "an integer >= 1")


@dataclass
class EasyVQAConfig(DatasetConfig):
    name: str = "easy_vqa"
    split: str = "test"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("dataset.split", self.split, ("train", "test"))


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    log_predictions: bool = True


@dataclass
class TrialConfig:
    engine: Any = MISSING
    model: Any = MISSING
    dataset: Any = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment_name: str = "sweeper"

    # Decoding. temperature 0 is greedy; top_k 0 is off. With beam_num > 1 and temperature > 0
    # the beams are extended by sampling (HF "beam sample"); num_samples <= beam_num then returns
    # the best num_samples beams, whose answers are majority-voted like sampled ones.
    beam_num: int = 1
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    batch_size: int = 8
    seed: int = 0

    # Serving flags; an engine that cannot honour a value raises a ConfigError.
    prefix_caching: bool = False
    continuous_batching: bool = False
    kv_cache: str = "dynamic"

    # Measurement: warm-up batches are never counted; batch efficiency is calibrated on the
    # first `calibration_samples` samples.
    warmup_batches: int = 1
    calibration_samples: int = 16

    def __post_init__(self) -> None:
        _check(self.beam_num >= 1, "beam_num", self.beam_num, "an integer >= 1")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        _check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check_choice("kv_cache", self.kv_cache, KV_CACHE_MODES)
        _check(self.warmup_batches >= 0, "warmup_batches", self.warmup_batches, "an integer >= 0")
        _check(
            self.calibration_samples >= 1,
            "calibration_samples",
            self.calibration_samples,
            "an integer >= 1",
        )
        if self.beam_num > 1:
            _check(
                self.num_samples <= self.beam_num,
                "num_samples",
                self.num_samples,
                f"at most beam_num ({self.beam_num}) when beam search is on",
            )
        elif self.num_samples > 1:
            _check(
                self.temperature > 0,
                "num_samples",
                self.num_samples,
                "1 with greedy decoding (temperature=0); sample with temperature > 0",
            )


def register_configs() -> None:
    """Register the schemas that conf/ YAML files extend (`defaults: [<name>_schema, _self_]`)."""
    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    cs.store(group="engine", name="hf_schema", node=HFEngineConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="easy_vqa_schema", node=EasyVQAConfig)
