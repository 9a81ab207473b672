"""`model.generate`'s arguments for a trial's decoding and KV-cache mode, and the clocks that
time it from inside (read after a device sync, so each reading means what it says)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, StoppingCriteria

from sweeper.requests import DecodingParams


def static_cache_length(tokens: int) -> int:
    """A static cache for `tokens` (prompt + new tokens), sized to a power of two: prompts of
    varying length then share one cache shape, and a compiled decoding step is not recompiled
    for every new length."""
    return 1 << (tokens - 1).bit_length()


class PrefillClock(LogitsProcessor):
    """Reads the clock when the first generated token's logits exist (end of prefill)."""

    def __init__(self, now: Callable[[], float]):
        self.now = now
        self.prefill_done: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if self.prefill_done is None:
            self.prefill_done = self.now()
        return scores


class TokenClock(StoppingCriteria):
    """Reads the clock after every decoding step, once the new tokens exist; never stops."""

    def __init__(self, now: Callable[[], float]):
        self.now = now
        self.step_times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
        self.step_times.append(self.now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_kwargs(decoding: DecodingParams, pad_id: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": decoding.max_new_tokens,
        "num_beams": decoding.beam_num,
        "num_return_sequences": decoding.num_samples,
        "do_sample": not decoding.greedy,
        "pad_token_id": pad_id,
    }
    if decoding.ignore_eos:  # EOS is masked until max_new_tokens: a fixed output length
        kwargs["min_new_tokens"] = decoding.max_new_tokens
    if decoding.greedy:
        # Unset the sampling knobs a checkpoint's generation_config may carry.
        kwargs.update(temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
    return kwargs


def generation_config(
    base: GenerationConfig, decoding: DecodingParams, pad_id: int
) -> GenerationConfig:
    """What `generate` decodes with: the checkpoint's generation_config under the trial's
    arguments."""
    config = copy.deepcopy(base)
    config.update(**generate_kwargs(decoding, pad_id))
    return config


def cache_kwargs(
    kv_cache: str,
    compile_config: CompileConfig | None,
    own_cache: bool = False,
    length: int | None = None,
) -> dict[str, Any]:
    """`generate` arguments for the cache mode; `own_cache`: the caller passes the cache (prefix
    caching), so only how to run it is said, not which to make; `length`: the tokens the cache
    must hold (prompt + new tokens)."""
    if kv_cache == "off":
        return {"use_cache": False}
    kwargs: dict[str, Any] = {}
    if kv_cache == "static":
        # Without a compile config transformers would compile a static cache's step on a GPU on
        # its own: engine.compile=false means no compilation anywhere.
        compiled = compile_config is not None
        kwargs = {"compile_config": compile_config} if compiled else {"disable_compile": True}
    if kv_cache != "dynamic" and not own_cache:
        kwargs["cache_implementation"] = kv_cache
    if kv_cache == "static" and not own_cache and length is not None:
        kwargs["max_cache_len"] = static_cache_length(length)
    if kv_cache == "quantized" and not own_cache:
        kwargs["cache_config"] = {"backend": "quanto", "nbits": 4}
    return kwargs
