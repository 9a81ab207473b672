"""Structured configs: the schema Hydra validates every composed trial config against.

Defaults live here and in each component's own config (engines/*/config.py, tasks/config.py,
workloads/config.py), once: the config groups `engine`, `dataset` and `workload` are these
dataclasses themselves, registered in Hydra's ConfigStore; only presets with values of their own
(models, Optuna sweepers) are YAML files under conf/. Closed choices are Enums, which OmegaConf
checks while composing; ranges and cross-field rules are checked in `__post_init__`, which runs
when `OmegaConf.to_object` turns the composed config into these dataclasses, before any model
is loaded. Every violation raises `ConfigError`, one line naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value outside what is allowed; the message is meant for the user as is."""

    def __init__(self, key: str, value: Any, allowed: str):
        if isinstance(value, Enum):  # as the user wrote it
            value = value.value
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid value for '{key}': {value!r} (allowed: {allowed})")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`."""
    if not ok:
        raise ConfigError(key, value, allowed)


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):
    auto = "auto"  # bfloat16 on a GPU, float32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class KVCache(StrEnum):
    dynamic = "dynamic"
    static = "static"
    offloaded = "offloaded"
    quantized = "quantized"
    off = "off"


class Selection(StrEnum):
    """The rule a sweep's recommended setting is chosen by (sweeper/reports/recommend.py)."""

    throughput_within_accuracy = "throughput_within_accuracy"
    accuracy = "accuracy"
    throughput = "throughput"
    memory = "memory"


class ModelBuilder(StrEnum):
    tiny_random = "tiny_random"
    qwen2_5_vl_7b_arch = "qwen2_5_vl_7b_arch"


def looks_like_local_path(path: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper) is a local path."""
    return (
        path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()
    )


def check_existing_path(key: str, path: str | None, what: str = "an existing path") -> None:
    if path is not None:
        check(Path(path).expanduser().exists(), key, path, what)


def check_file(key: str, path: str | None, what: str) -> None:
    check(path is not None and Path(path).expanduser().is_file(), key, path, what)


@dataclass
class ModelConfig:
    """`path` is a local folder or a hub id; `builder` makes a tiny model offline instead."""

    name: str = MISSING
    path: str | None = None
    builder: ModelBuilder | None = None
    random_weights: bool = False
    cache_dir: str = "~/.cache/sweeper/models"
    # A Jinja chat template (a string or a file) used instead of the checkpoint's; needed for a
    # checkpoint without one (sweeper/engines/toolkit/chat.py says how a template is chosen).
    chat_template: str | None = None

    def __post_init__(self) -> None:
        check(
            (self.path is None) != (self.builder is None),
            "model.path",
            self.path,
            "exactly one of model.path and model.builder",
        )
        if self.path is not None and looks_like_local_path(self.path):
            check_existing_path("model.path", self.path, "an existing model folder or a hub id")
            from sweeper.models import has_weights

            # A folder without weights gets random ones: only when asked, so that its runs are
            # tagged and nobody reads its accuracy as the model's.
            check(
                self.random_weights or has_weights(self.path),
                "model.path",
                self.path,
                "a folder with weight files (*.safetensors, *.bin), or model.random_weights=true "
                "for an architecture-only folder",
            )
            from sweeper.models.info import weights_problem

            if problem := weights_problem(self.path):
                raise ConfigError("model.path", self.path, f"whole weight files: {problem}")


@dataclass
class SLOConfig:
    """Service-level objectives a request must meet to count in `goodput` (null: none)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s", "e2el_s"):
            value = getattr(self, key)
            if value is not None:
                check(0 < value < math.inf, f"slo.{key}", value, "null or seconds > 0")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2el_s))


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    log_predictions: bool = True


EXACT_REFERENCE = "exact"


@dataclass
class TrialConfig:
    engine: Any = MISSING
    model: Any = MISSING
    dataset: Any = MISSING
    workload: Any = MISSING
    load: Any = MISSING
    slo: SLOConfig = field(default_factory=SLOConfig)
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
    # Generate exactly max_new_tokens tokens, EOS ignored (HF min_new_tokens, vLLM ignore_eos):
    # performance runs with a fixed output length, e.g. on random weights.
    ignore_eos: bool = False
    batch_size: int = 8
    seed: int = 0
    # A system message before every question, the same for all (null: the chat template's
    # default). A long one gives requests a shared prompt prefix, which prefix caching reuses.
    system_prompt: str | None = None

    # Serving flags; an engine that cannot honour a value refuses it before loading.
    prefix_caching: bool = False
    continuous_batching: bool = False
    kv_cache: KVCache = KVCache.dynamic

    # Measurement: warm-up batches are never counted; batch efficiency is calibrated on the
    # first `calibration_samples` samples, its two passes timed `calibration_repeats` times
    # (interleaved; the median is logged); the measured run is done `repeats` times on the
    # loaded engine, each metric logged as the mean with its 95% confidence interval.
    warmup_batches: int = 1
    calibration_samples: int = 16
    calibration_repeats: int = 3
    repeats: int = 1

    # How a sweep's answer is chosen from its trials (sweeper/reports/recommend.py):
    # throughput_within_accuracy | accuracy | throughput | memory; budget_gb bounds it.
    select: Selection = Selection.throughput_within_accuracy

    # Peak-memory budget in GiB for `hydra/sweeper=vram_budget` (its constraint reads it); on CPU
    # it bounds the peak PSS, as peak_mem_gb does. Unused by a trial itself.
    budget_gb: float | None = None

    # What the trial's answers are compared with (answer_agreement, accuracy_delta and its
    # interval, reference_accuracy): `exact`, this trial with every output-changing knob at its
    # exact setting (no KV-cache or weight quantization, no speculation, greedy), run once per
    # sweep and reused; a predictions table (an earlier trial's predictions.json); null: none.
    reference: str | None = EXACT_REFERENCE

    def __post_init__(self) -> None:
        check(self.beam_num >= 1, "beam_num", self.beam_num, "an integer >= 1")
        if self.budget_gb is not None:
            check(0 < self.budget_gb < math.inf, "budget_gb", self.budget_gb, "a number of GiB > 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(
            0 <= self.temperature < math.inf,
            "temperature",
            self.temperature,
            "a finite number >= 0",
        )
        check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.warmup_batches >= 0, "warmup_batches", self.warmup_batches, "an integer >= 0")
        for key in ("calibration_samples", "calibration_repeats", "repeats"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        if self.beam_num > 1:
            check(
                self.num_samples <= self.beam_num,
                "num_samples",
                self.num_samples,
                f"at most beam_num ({self.beam_num}) when beam search is on",
            )
        elif self.num_samples > 1:
            check(
                self.temperature > 0,
                "num_samples",
                self.num_samples,
                "1 with greedy decoding (temperature=0); sample with temperature > 0",
            )
        if self.reference not in (None, EXACT_REFERENCE):
            check_file(
                "reference",
                self.reference,
                f"{EXACT_REFERENCE}, null, or an existing predictions table (predictions.json)",
            )
        self.workload.check(self)
        self.load.check(self)


def asset_path(name: str) -> str:
    """Absolute path of a file or folder shipped in the package's `assets/` (e.g. a model)."""
    from importlib.resources import files

    return str(files("sweeper") / "assets" / name)


def register_configs() -> None:
    """Register the trial schema, the engine, dataset and workload groups (their dataclasses),
    and the schemas that conf/ presets extend (`defaults: [/schema_model@_here_, _self_]`)."""
    from omegaconf import OmegaConf

    from sweeper.engines.hf.config import HFEngineConfig
    from sweeper.engines.openai.config import OpenAIEngineConfig
    from sweeper.engines.vllm.config import VLLMEngineConfig
    from sweeper.loads.config import LOAD_CONFIGS
    from sweeper.tasks.config import DATASET_CONFIGS
    from sweeper.workloads.config import WORKLOAD_CONFIGS

    # `${sweeper_asset:tiny_vlm}` in conf/ resolves to the checkpoint shipped with the package.
    OmegaConf.register_new_resolver("sweeper_asset", asset_path, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    for node in (HFEngineConfig, VLLMEngineConfig, OpenAIEngineConfig):
        cs.store(group="engine", name=node.name, node=node)
    for node in DATASET_CONFIGS:
        cs.store(group="dataset", name=node.name, node=node)
    for node in WORKLOAD_CONFIGS:
        cs.store(group="workload", name=node.name, node=node)
    for node in LOAD_CONFIGS:
        cs.store(group="load", name=node.name, node=node)
    cs.store(name="schema_model", node=ModelConfig)
