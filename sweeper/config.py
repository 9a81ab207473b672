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
ON_ERROR = ("raise", "skip")
DECODE_LOOPS = ("generate", "graphed")
MODEL_BUILDERS = ("tiny_random", "qwen2_5_vl_7b_arch")


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


# sdpa_gqa: sdpa with the KV heads shared inside the kernel (sweeper/engines/hf_attention.py).
ATTN_IMPLEMENTATIONS = ("sdpa", "sdpa_gqa", "eager")


@dataclass
class HFEngineConfig(EngineConfig):
    name: str = "hf"
    attn_implementation: str = "sdpa"
    # torch.compile the decoding step (with kv_cache=static only). Part of the engine's cache
    # key, so the compiled graphs live with the loaded model and are reused by later trials.
    compile: bool = False
    # Tokens of KV the prefix cache keeps (prefix_caching=true); least recently used go first.
    prefix_cache_tokens: int = 65536
    # `generate`: transformers' loop. `graphed`: sweeper's own (sweeper/engines/hf_graphed.py),
    # which replays one compiled decoding step without generate's Python work per token.
    decode_loop: str = "generate"
    # Qwen2.5-VL decoder layers: q/k/v and gate/up projections each as one linear, as vLLM
    # does (sweeper/engines/hf_fused.py). Part of the engine's cache key.
    fuse_projections: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("engine.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("engine.decode_loop", self.decode_loop, DECODE_LOOPS)
        _check(
            self.compile or self.decode_loop != "graphed",
            "engine.compile",
            self.compile,
            "true with engine.decode_loop=graphed (the step it replays is the compiled one)",
        )
        _check(
            self.prefix_cache_tokens >= 1,
            "engine.prefix_cache_tokens",
            self.prefix_cache_tokens,
            "an integer >= 1",
        )


VLLM_LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
# The KV cache element types vLLM 0.26 and 0.32 both take for any model (auto: the model's dtype).
VLLM_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
VLLM_FRONTENDS = ("llm", "async")


@dataclass
class VLLMEngineConfig(EngineConfig):
    """vLLM behind the engine interface; see conf/engine/vllm.yaml for what each key does."""

    name: str = "vllm"
    # llm: the offline `vllm.LLM`, which renders every request serially in this thread; async:
    # `AsyncLLM` (what `vllm serve` runs), requests submitted concurrently and rendered on
    # vLLM's pool of `renderer_num_workers` threads.
    frontend: str = "llm"
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # null: the model's own
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    max_num_batched_tokens: int | None = None  # null: vLLM's default
    max_num_seqs: int = 256  # running sequences at most with continuous_batching=false
    kv_cache_space_gb: float | None = None  # null: from gpu_memory_utilization (GPU), 1 (CPU)
    seed: int = 0  # vLLM's own RNG (dummy weights); sampling uses the trial's `seed`
    # The frontend's multimodal path (null: vLLM's default). The offline LLM processes every
    # image serially in this process, so these can bound an image workload's throughput.
    mm_processor_cache_gb: float | None = None
    mm_processor_cache_type: str | None = None  # lru | shm
    mm_tensor_ipc: str | None = None  # direct_rpc | torch_shm: how pixel tensors reach the core
    async_scheduling: bool | None = None
    renderer_num_workers: int | None = None  # null: vLLM's default (1)
    # The KV cache's element type (null: vLLM's "auto", the model's dtype). fp8 halves the bytes
    # decode attention reads per cached token, and doubles the tokens the cache holds.
    kv_cache_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("engine.frontend", self.frontend, VLLM_FRONTENDS)
        if self.mm_processor_cache_gb is not None:
            _check(
                self.mm_processor_cache_gb >= 0,
                "engine.mm_processor_cache_gb",
                self.mm_processor_cache_gb,
                "null or a number of GiB >= 0 (0 turns the cache off)",
            )
        if self.mm_processor_cache_type is not None:
            _check_choice(
                "engine.mm_processor_cache_type", self.mm_processor_cache_type, ("lru", "shm")
            )
        if self.mm_tensor_ipc is not None:
            _check_choice("engine.mm_tensor_ipc", self.mm_tensor_ipc, ("direct_rpc", "torch_shm"))
        _check(
            0 < self.gpu_memory_utilization <= 1,
            "engine.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "a share of the device's memory in (0, 1]",
        )
        if self.max_model_len is not None:
            _check(
                self.max_model_len >= 1, "engine.max_model_len", self.max_model_len, "null or >= 1"
            )
        _check(
            self.tensor_parallel_size >= 1,
            "engine.tensor_parallel_size",
            self.tensor_parallel_size,
            "an integer >= 1",
        )
        _check_choice("engine.load_format", self.load_format, VLLM_LOAD_FORMATS)
        if self.max_num_batched_tokens is not None:
            _check(
                self.max_num_batched_tokens >= 1,
                "engine.max_num_batched_tokens",
                self.max_num_batched_tokens,
                "null or an integer >= 1",
            )
        _check(self.max_num_seqs >= 1, "engine.max_num_seqs", self.max_num_seqs, "an integer >= 1")
        if self.kv_cache_space_gb is not None:
            _check(
                self.kv_cache_space_gb > 0,
                "engine.kv_cache_space_gb",
                self.kv_cache_space_gb,
                "null or a number of GiB > 0",
            )
        if self.renderer_num_workers is not None:
            self._check_renderer_num_workers()
        if self.kv_cache_dtype is not None:
            _check_choice("engine.kv_cache_dtype", self.kv_cache_dtype, VLLM_KV_CACHE_DTYPES)

    def _check_renderer_num_workers(self) -> None:
        key, value = "engine.renderer_num_workers", self.renderer_num_workers
        _check(value >= 1, key, value, "null or an integer >= 1")
        if value == 1:
            return
        # vLLM only warns that the offline LLM ignores the pool; a sweep would measure nothing.
        _check(
            self.frontend == "async",
            key,
            value,
            "null or 1 with engine.frontend=llm: the offline LLM renders requests serially and "
            "never uses the renderer pool (set engine.frontend=async)",
        )
        _check(
            self.mm_processor_cache_gb == 0,
            key,
            value,
            "null or 1 unless engine.mm_processor_cache_gb=0: vLLM's processed-image cache is "
            "not thread-safe, so several renderer workers need it off",
        )


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
            _check_choice("model.builder", self.builder, MODEL_BUILDERS)
        if self.path is not None and looks_like_local_path(self.path):
            check_existing_path("model.path", self.path, "an existing model folder or a hub id")
            from sweeper.models import has_weights

            # A folder without weights gets random ones: only when asked, so that its runs are
            # tagged and nobody reads its accuracy as the model's.
            _check(
                self.random_weights or has_weights(self.path),
                "model.path",
                self.path,
                "a folder with weight files (*.safetensors, *.bin), or model.random_weights=true "
                "for an architecture-only folder",
            )


@dataclass
class DatasetConfig:
    name: str = MISSING
    limit: int | None = None
    seed: int | None = None  # shuffle with this seed before `limit`; None keeps file order
    prefetch: int = 16  # decoded images kept ready ahead of the engine
    # A bad sample (missing or broken image, malformed record): raise a one-line error, or skip
    # it and count it (metric `skipped_samples`, artifact `skipped_samples.json`).
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.limit is not None:
            _check(self.limit >= 1, "dataset.limit", self.limit, "an integer >= 1 or null")
        _check(self.prefetch >= 1, "dataset.prefetch", self.prefetch, "an integer >= 1")
        _check_choice("dataset.on_error", self.on_error, ON_ERROR)


@dataclass
class EasyVQAConfig(DatasetConfig):
    name: str = "easy_vqa"
    split: str = "test"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("dataset.split", self.split, ("train", "test"))


@dataclass
class OKVQABaseConfig(DatasetConfig):
    """What both OK-VQA layouts share: the optional filter on the annotated question type."""

    question_types: list[str] | None = None  # e.g. [one, eight]; null keeps every type

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.question_types is not None:
            _check(
                len(self.question_types) > 0,
                "dataset.question_types",
                self.question_types,
                "a non-empty list of question types, or null for all",
            )


def _check_file(key: str, path: str | None, what: str) -> None:
    _check(path is not None and Path(path).expanduser().is_file(), key, path, what)


@dataclass
class OKVQAConfig(OKVQABaseConfig):
    """OK-VQA in its official files. null paths are refused here, before any model loads."""

    name: str = "okvqa"
    questions_file: str | None = None
    annotations_file: str | None = None
    image_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_file(
            "dataset.questions_file",
            self.questions_file,
            "an existing OpenEnded_mscoco_val2014_questions.json",
        )
        _check_file(
            "dataset.annotations_file",
            self.annotations_file,
            "an existing mscoco_val2014_annotations.json",
        )
        _check(
            self.image_dir is not None and Path(self.image_dir).expanduser().is_dir(),
            "dataset.image_dir",
            self.image_dir,
            "an existing folder of COCO_val2014_<image_id>.jpg files",
        )


@dataclass
class OKVQAHFConfig(OKVQABaseConfig):
    """OK-VQA in the Hugging Face layout (lmms-lab/OK-VQA).

    `path`: a hub id, a folder of parquet files, a parquet file, a list of parquet files, or a
    folder written by `save_to_disk`. (Any: OmegaConf has no str-or-list type.)
    """

    name: str = "okvqa_hf"
    path: Any = "lmms-lab/OK-VQA"
    split: str = "val2014"  # for a hub id or a save_to_disk DatasetDict
    cache_dir: str | None = None  # where `datasets` keeps its Arrow copy; null: its own cache

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "dataset.path"
        allowed = "a hub id, an existing parquet file or folder, or a list of parquet files"
        if isinstance(self.path, list):
            _check(len(self.path) > 0, key, self.path, allowed)
            for item in self.path:
                _check_file(key, item, allowed)
        else:
            _check(isinstance(self.path, str) and bool(self.path), key, self.path, allowed)
            if looks_like_local_path(self.path):
                check_existing_path(key, self.path, allowed)


@dataclass
class WorkloadConfig:
    """How dataset questions become requests (sweeper/workloads.py). `images: false` sends the
    question without its image (text-only prompts: what transformers' continuous batching takes).
    """

    name: str = "single"
    images: bool = True


@dataclass
class SharedPrefixWorkloadConfig(WorkloadConfig):
    """Every request starts with the same long system prompt of about this many tokens."""

    name: str = "shared_prefix"
    system_prompt_tokens: int = 1000

    def __post_init__(self) -> None:
        _check(
            self.system_prompt_tokens >= 1,
            "workload.system_prompt_tokens",
            self.system_prompt_tokens,
            "an integer >= 1",
        )


@dataclass
class MultiSampleWorkloadConfig(WorkloadConfig):
    """num_samples reasoning paths per question (sampled), each ending in 'Answer: ...'."""

    name: str = "multi_sample"


@dataclass
class MultiTurnWorkloadConfig(WorkloadConfig):
    """The questions about one image become one conversation of at most `turns` turns."""

    name: str = "multi_turn"
    turns: int = 3

    def __post_init__(self) -> None:
        _check(self.turns >= 1, "workload.turns", self.turns, "an integer >= 1")


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
    workload: Any = field(default_factory=WorkloadConfig)
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

    # Serving flags; an engine that cannot honour a value raises a ConfigError.
    prefix_caching: bool = False
    continuous_batching: bool = False
    kv_cache: str = "dynamic"

    # Measurement: warm-up batches are never counted; batch efficiency is calibrated on the
    # first `calibration_samples` samples.
    warmup_batches: int = 1
    calibration_samples: int = 16

    # Peak-memory budget in GiB for `hydra/sweeper=vram_budget` (its constraint reads it); on CPU
    # it bounds the peak RSS, as peak_mem_gb does. Unused by a trial itself.
    budget_gb: float | None = None

    def __post_init__(self) -> None:
        _check(self.beam_num >= 1, "beam_num", self.beam_num, "an integer >= 1")
        if self.budget_gb is not None:
            _check(self.budget_gb > 0, "budget_gb", self.budget_gb, "a number of GiB > 0")
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
        if self.workload.name == "multi_sample":
            _check(
                self.num_samples > 1,
                "num_samples",
                self.num_samples,
                "an integer >= 2 with workload=multi_sample (with temperature > 0)",
            )
        if self.workload.name == "shared_prefix":
            _check(
                self.system_prompt is None,
                "system_prompt",
                self.system_prompt,
                "null with workload=shared_prefix (it writes its own, of "
                "workload.system_prompt_tokens tokens)",
            )


def asset_path(name: str) -> str:
    """Absolute path of a file or folder shipped in the package's `assets/` (e.g. a model)."""
    from importlib.resources import files

    return str(files("sweeper") / "assets" / name)


def register_configs() -> None:
    """Register the schemas that conf/ YAML files extend.

    A group option extends its schema with `defaults: [/schema_<group>_<name>@_here_, _self_]`;
    schemas live outside the groups so that `--help` lists only real options.
    """
    from omegaconf import OmegaConf

    # `${sweeper_asset:tiny_vlm}` in conf/ resolves to the checkpoint shipped with the package.
    OmegaConf.register_new_resolver("sweeper_asset", asset_path, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    # The Optuna sweeper plugin, registered here too: Hydra's plugin scan cannot list the
    # hydra_plugins namespace of an editable install (pip install -e).
    from hydra_plugins.sweeper_optuna.config import register_plugin

    register_plugin()
    cs.store(name="schema_engine_hf", node=HFEngineConfig)
    cs.store(name="schema_engine_vllm", node=VLLMEngineConfig)
    cs.store(name="schema_model_model", node=ModelConfig)
    cs.store(name="schema_workload_single", node=WorkloadConfig)
    cs.store(name="schema_workload_shared_prefix", node=SharedPrefixWorkloadConfig)
    cs.store(name="schema_workload_multi_sample", node=MultiSampleWorkloadConfig)
    cs.store(name="schema_workload_multi_turn", node=MultiTurnWorkloadConfig)
    cs.store(name="schema_dataset_easy_vqa", node=EasyVQAConfig)
    cs.store(name="schema_dataset_okvqa", node=OKVQAConfig)
    cs.store(name="schema_dataset_okvqa_hf", node=OKVQAHFConfig)
