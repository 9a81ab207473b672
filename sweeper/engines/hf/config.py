"""engine=hf's config, and what it refuses before anything loads."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sweeper.config import ConfigError, KVCache, check
from sweeper.engines.config import EngineConfig
from sweeper.engines.hf import accel
from sweeper.models.info import ModelInfo


class Attention(StrEnum):
    sdpa = "sdpa"
    # sdpa with the few KV heads shared inside the kernel instead of copied once per query head
    # (sweeper/engines/hf/accel/attention.py)
    sdpa_gqa = "sdpa_gqa"
    eager = "eager"


class DecodeLoop(StrEnum):
    generate = "generate"  # transformers' model.generate
    # sweeper's own loop (sweeper/engines/hf/accel/graphed.py): the prompt once, then one
    # compiled decoding step of fixed shapes replayed per token, without generate's Python work.
    graphed = "graphed"


def quanto_installed() -> bool:
    """Whether kv_cache=quantized has its backend (transformers' QuantizedCache uses quanto)."""
    return importlib.util.find_spec("optimum") is not None and (
        importlib.util.find_spec("optimum.quanto") is not None
    )


@dataclass
class HFEngineConfig(EngineConfig):
    """HF transformers: static, left-padded batches through model.generate (or sweeper's graphed
    loop), or transformers' continuous batching. Serving flags apply per call."""

    name: str = "hf"
    _target_: str = "sweeper.engines.hf.engine.HFEngine"
    attn_implementation: Attention = Attention.sdpa
    # torch.compile the decoding step (kv_cache=static only). Part of the engine's cache key, so
    # the compiled graphs live with the loaded model and are reused by later trials.
    compile: bool = False
    # KV tokens the prefix cache keeps (prefix_caching=true); least recently used go first.
    prefix_cache_tokens: int = 65536
    # generate | graphed; graphed needs kv_cache=static and compile=true; greedy or sampling,
    # no beam search, prefix caching or continuous batching.
    decode_loop: DecodeLoop = DecodeLoop.generate
    # Qwen2.5-VL decoder layers: q/k/v and gate/up projections each as one linear, as vLLM does
    # (sweeper/engines/hf/accel/fused.py). Part of the engine's cache key.
    fuse_projections: bool = False

    def __post_init__(self) -> None:
        check(
            self.compile or self.decode_loop != DecodeLoop.graphed,
            "engine.compile",
            self.compile,
            "true with engine.decode_loop=graphed (the step it replays is the compiled one)",
        )
        check(
            self.prefix_cache_tokens >= 1,
            "engine.prefix_cache_tokens",
            self.prefix_cache_tokens,
            "an integer >= 1",
        )

    def check(self, trial: Any, model: ModelInfo) -> None:
        """The serving flags' combinations this engine cannot run, and the acceleration the
        model's architecture was not checked with."""
        from sweeper.engines.toolkit.devices import resolve_device

        kv_cache, continuous = trial.kv_cache, trial.continuous_batching
        images = trial.workload.images and model.takes_images
        refusals = [
            (
                kv_cache == KVCache.quantized and not quanto_installed(),
                "kv_cache",
                kv_cache,
                "dynamic, static, offloaded, off with engine=hf; quantized needs the "
                "optimum-quanto package (pip install optimum-quanto)",
            ),
            (
                kv_cache == KVCache.offloaded and resolve_device(self.device) == "cpu",
                "kv_cache",
                kv_cache,
                "dynamic, static, quantized, off on a CPU (offloaded keeps a GPU's KV cache in "
                "CPU memory)",
            ),
            (
                self.compile and kv_cache != KVCache.static,
                "engine.compile",
                self.compile,
                "false unless kv_cache=static (torch.compile needs the static cache's shapes)",
            ),
            (
                trial.prefix_caching
                and not continuous
                and kv_cache not in (KVCache.dynamic, KVCache.static, KVCache.offloaded),
                "kv_cache",
                kv_cache,
                "dynamic, static or offloaded with prefix_caching=true (the engine fills the "
                "batch's cache with stored KV, then reads the answered requests' KV back)",
            ),
            (
                continuous and images,
                "continuous_batching",
                continuous,
                "false with images: transformers' continuous batching takes token ids only and "
                "would answer without the image (workload.images=false sends text-only prompts)",
            ),
            (
                continuous and trial.beam_num > 1,
                "beam_num",
                trial.beam_num,
                "1 with continuous_batching=true (transformers' has no beam search)",
            ),
            (
                continuous and kv_cache != KVCache.dynamic,
                "kv_cache",
                kv_cache,
                "dynamic with continuous_batching=true (it runs on its own paged cache)",
            ),
            (
                continuous and self.attn_implementation == Attention.sdpa_gqa,
                "engine.attn_implementation",
                self.attn_implementation,
                "sdpa or eager with continuous_batching=true (it swaps in its own paged attention)",
            ),
        ]
        if self.decode_loop == DecodeLoop.graphed:
            refusals = [*self._graphed_refusals(trial), *refusals]
        for refused, key, value, allowed in refusals:
            if refused:
                raise ConfigError(key, value, allowed)
        self._check_accelerations(trial, model)

    def open_load_refusal(self, trial: Any) -> str | None:
        if not trial.continuous_batching:
            return (
                f"offline with engine=hf and continuous_batching=false; load={trial.load.name} "
                "needs continuous_batching=true (requests join transformers' running batch)"
            )
        return None

    def _graphed_refusals(self, trial: Any) -> list[tuple[bool, str, Any, str]]:
        return [
            (
                trial.kv_cache != KVCache.static,
                "kv_cache",
                trial.kv_cache,
                "static with engine.decode_loop=graphed (its compiled step runs on the static "
                "cache)",
            ),
            (
                trial.beam_num > 1,
                "beam_num",
                trial.beam_num,
                "1 with engine.decode_loop=graphed (greedy or sampling, no beam search)",
            ),
            (
                trial.prefix_caching,
                "prefix_caching",
                trial.prefix_caching,
                "false with engine.decode_loop=graphed",
            ),
            (
                trial.continuous_batching,
                "continuous_batching",
                trial.continuous_batching,
                "false with engine.decode_loop=graphed (it decodes static batches)",
            ),
        ]

    def _check_accelerations(self, trial: Any, model: ModelInfo) -> None:
        wanted = [
            (self.decode_loop == DecodeLoop.graphed, accel.GRAPHED, "engine.decode_loop"),
            (self.fuse_projections, accel.FUSED, "engine.fuse_projections"),
            (
                self.attn_implementation == Attention.sdpa_gqa,
                accel.SDPA_GQA,
                "engine.attn_implementation",
            ),
            (
                trial.prefix_caching and not trial.continuous_batching,
                accel.PREFIX_CACHING,
                "prefix_caching",
            ),
        ]
        for on, checked, key in wanted:
            if on and (why := checked.refusal(model.model_type)):
                value = checked.setting.split("=", 1)[1]
                raise ConfigError(key, value, f"its default here: {why}")
