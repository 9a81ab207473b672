"""continuous_batching=true on engine=hf: transformers' `ContinuousBatchingManager` (paged
attention, requests join and leave the running batch step by step). It takes token ids only - no
pixel values - so the engine's config refuses it with images."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from sweeper.engines.base import OnDone
from sweeper.engines.hf.generation import generate_kwargs
from sweeper.requests import DecodingParams, ServingParams

PAGE_TOKENS = 16  # small pages: prefix sharing in continuous batching matches whole pages
_PREFIX_MATCH = re.compile(r"Found a prefix match of (\d+) tokens for request (\S+)")


@contextmanager
def _prefix_hits() -> Iterator[dict[str, int]]:
    """Prompt tokens each request reused from shared pages, as its cache reports them (a debug
    log line is the only place transformers 5.19 tells it)."""
    hits: dict[str, int] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = _PREFIX_MATCH.search(record.getMessage())
            if found:
                hits[found.group(2)] = int(found.group(1))

    from transformers.generation.continuous_batching import cache

    logger = cache.logger  # the logger the paged cache reports its prefix matches to
    handlers, level = logger.handlers, logger.level
    # Only ours while the block runs: the hits are counted, not printed.
    logger.handlers, logger.level = [Collect()], logging.DEBUG
    try:
        yield hits
    finally:
        logger.handlers, logger.level = handlers, level


@dataclass
class Answer:
    """One request's sequences (token ids), the clock after each of their tokens, when it was
    created and when the engine took it in, and the prompt tokens it reused."""

    sequences: list[list[int]]
    times: list[list[float]]
    created: float
    started: float
    cached_prompt_tokens: int


class ContinuousBatching:
    """A running manager, kept across calls: stopping one waits ~0.5 s for its loop thread,
    which every measured run would count."""

    def __init__(self, model: PreTrainedModel, pad_id: int, eos_ids: set[int]):
        self.model, self.pad_id, self.eos_ids = model, pad_id, eos_ids
        self._running: tuple[Any, Any] | None = None  # (its sizes and kwargs, the manager)

    def _manager(self, prompt_len: int, decoding: DecodingParams, serving: ServingParams) -> Any:
        """A manager for at most `serving.batch_size` requests (of `num_samples` sequences each)
        at a time, with a paged cache that holds them. Prompt lengths are rounded up to a power
        of two so that similar calls share it."""
        prompt_len = 1 << (prompt_len - 1).bit_length()
        pages = math.ceil((prompt_len + decoding.max_new_tokens) / PAGE_TOKENS)
        n, batch_size = decoding.num_samples, serving.batch_size
        # Sized explicitly: left to infer them, transformers sizes the cache from free memory,
        # which on a CPU means most of the RAM and a minute of allocation.
        config = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS,
            num_blocks=pages * batch_size * n + pages,
            max_batch_tokens=prompt_len * batch_size,
            max_requests_per_batch=batch_size * n,
            allow_block_sharing=serving.prefix_caching,
            seed=decoding.seed,
        )
        kwargs = generate_kwargs(decoding, self.pad_id)
        key = (repr(config), sorted(kwargs.items()))
        if self._running is not None and self._running[0] == key:
            return self._running[1]
        self.stop()
        manager = self.model.init_continuous_batching(
            generation_config=GenerationConfig(**kwargs, eos_token_id=sorted(self.eos_ids)),
            continuous_batching_config=config,
        )
        # Started from a daemon thread, so that its loop thread is a daemon too (threads inherit
        # it): a manager still kept when the process ends must not hold the interpreter open.
        starter = threading.Thread(target=manager.start, daemon=True)
        starter.start()
        starter.join()
        self._running = (key, manager)
        return manager

    def stop(self) -> None:
        """Stop the kept manager, which also gives the model back the attention implementation
        that continuous batching swaps for its paged one while it runs."""
        if self._running is not None:
            manager = self._running[1]
            self._running = None
            manager.destroy()  # stops (and joins) its loop thread first

    def answer(
        self,
        prompts: list[list[int]],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None,
    ) -> list[Answer]:
        """Submit every prompt at once, at most `serving.batch_size` running at a time; each
        request's answer once all its sequences are done."""
        manager = self._manager(max(len(p) for p in prompts), decoding, serving)
        n = decoding.num_samples
        results: dict[str, Any] = {}
        with _prefix_hits() as hits:
            ids = manager.add_requests(
                prompts, max_new_tokens=decoding.max_new_tokens, record_timestamps=True
            )
            parents = dict.fromkeys(ids, 0)
            while len(results) < len(ids) * n:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("continuous batching stopped before every answer")
                    continue
                if not result.is_finished():
                    continue
                if result.error is not None:
                    raise RuntimeError(f"continuous batching: {result.error}")
                results[result.request_id] = result
                parent = result.request_id.split("__child#")[0]
                parents[parent] += 1
                if parents[parent] == n and on_done is not None:
                    on_done(1)
        answers = []
        for request_id in ids:
            outputs = [results[request_id]] + [
                results[f"{request_id}__child#{i}"] for i in range(n - 1)
            ]
            answers.append(
                Answer(
                    sequences=[o.generated_tokens for o in outputs],
                    times=[o.timestamps for o in outputs],
                    created=outputs[0].created_time,
                    started=min(o.lifespan[0] for o in outputs),
                    cached_prompt_tokens=hits.get(request_id, 0),
                )
            )
        return answers
