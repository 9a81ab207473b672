"""continuous_batching=true on engine=hf: transformers' `ContinuousBatchingManager` (paged
attention, requests join and leave the running batch step by step). It takes token ids only - no
pixel values - so the engine's config refuses it with images."""

from __future__ import annotations

import logging
import math
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from sweeper.engines.base import OnDone
from sweeper.engines.hf.generation import generate_kwargs
from sweeper.requests import DecodingParams, ServingParams

PAGE_TOKENS = 16  # small pages: prefix sharing in continuous batching matches whole pages
_PREFIX_MATCH = re.compile(r"Found a prefix match of (\d+) tokens for request (\S+)")


class _PrefixHits(logging.Handler):
    """Prompt tokens each request reused from shared pages, as the paged cache reports them (a
    debug log line is the only place transformers 5.19 tells it), while the manager runs."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = _PREFIX_MATCH.search(record.getMessage())
        if found:
            self.hits[found.group(2)] = int(found.group(1))

    def __enter__(self) -> _PrefixHits:
        from transformers.generation.continuous_batching import cache

        self.logger = cache.logger  # the logger the paged cache reports its prefix matches to
        self.saved = self.logger.handlers, self.logger.level, self.logger.propagate
        # Only ours while the manager runs: the hits are counted, not printed.
        self.logger.handlers, self.logger.level, self.logger.propagate = (
            [self],
            logging.DEBUG,
            False,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.handlers, self.logger.level, self.logger.propagate = self.saved


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
    """A running manager, kept across calls (stopping one waits ~0.5 s for its loop thread,
    which every measured run would count), and the thread that hands each finished request to
    its future. Offline runs submit every prompt at once; open loads one at a time."""

    def __init__(self, model: PreTrainedModel, pad_id: int, eos_ids: set[int]):
        self.model, self.pad_id, self.eos_ids = model, pad_id, eos_ids
        self._running: tuple[Any, Any] | None = None  # (its sizes and kwargs, the manager)
        self._hits: _PrefixHits | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._collector: threading.Thread | None = None

    def _manager(self, prompt_len: int, decoding: DecodingParams, serving: ServingParams) -> Any:
        """A manager for at most `serving.batch_size` requests (of `num_samples` sequences each)
        at a time, with a paged cache that holds them. Prompt lengths are rounded up to a power
        of two so that similar calls share it; a running manager big enough is kept."""
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
        self._hits = _PrefixHits().__enter__()
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
        self._collector = threading.Thread(
            target=self._collect, args=(manager,), name="sweeper-hf-continuous", daemon=True
        )
        self._collector.start()
        return manager

    def stop(self) -> None:
        """Stop the kept manager, which also gives the model back the attention implementation
        that continuous batching swaps for its paged one while it runs."""
        if self._running is not None:
            manager = self._running[1]
            self._running = None
            manager.destroy()  # stops (and joins) its loop thread first
            if self._collector is not None:
                self._collector.join()
            self._fail_pending(RuntimeError("continuous batching stopped before every answer"))
        if self._hits is not None:
            self._hits.__exit__()
            self._hits = None

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for request in pending.values():
            request.future.set_exception(error)

    def _collect(self, manager: Any) -> None:
        """Hand each finished request (all its sequences) to its future, until the manager
        stops."""
        while manager.is_running():
            result = manager.get_result(timeout=0.5)
            if result is None or not result.is_finished():
                continue
            parent = result.request_id.split("__child#")[0]
            with self._lock:
                request = self._pending.get(parent)
                if request is None:
                    continue
                if result.error is not None:
                    del self._pending[parent]
            if result.error is not None:
                request.future.set_exception(RuntimeError(f"continuous batching: {result.error}"))
                continue
            request.outputs.append(result)
            if len(request.outputs) == request.sequences:
                with self._lock:
                    del self._pending[parent]
                hits = self._hits.hits if self._hits is not None else {}
                request.future.set_result(request.answer(hits.get(parent, 0)))
        self._fail_pending(RuntimeError("continuous batching stopped before every answer"))

    def submit(
        self, prompt: list[int], decoding: DecodingParams, serving: ServingParams
    ) -> Future[Answer]:
        """One prompt into the running batch now; a future of its answer. The manager is sized
        for prompts up to twice this one (open loads send prompts of one shape)."""
        manager = self._running[1] if self._running else None
        if manager is None:
            manager = self._manager(2 * len(prompt), decoding, serving)
        request = _Pending(decoding.num_samples)
        with self._lock:
            request_id = manager.add_request(
                prompt, max_new_tokens=decoding.max_new_tokens, record_timestamps=True
            )
            self._pending[request_id] = request
        return request.future

    def answer(
        self,
        prompts: list[list[int]],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None,
    ) -> list[Answer]:
        """Submit every prompt at once, at most `serving.batch_size` running at a time; each
        request's answer once all its sequences are done."""
        self._manager(max(len(p) for p in prompts), decoding, serving)
        futures = [self.submit(prompt, decoding, serving) for prompt in prompts]
        if on_done is not None:
            for future in futures:
                future.add_done_callback(lambda _: on_done(1))
        return [future.result() for future in futures]


@dataclass
class _Pending:
    """A submitted request: its sequences' results as they finish, and its future."""

    sequences: int
    outputs: list[Any] = field(default_factory=list)
    future: Future[Answer] = field(default_factory=Future)

    def answer(self, cached_prompt_tokens: int) -> Answer:
        outputs = sorted(self.outputs, key=lambda o: o.request_id)  # the parent first
        return Answer(
            sequences=[o.generated_tokens for o in outputs],
            times=[o.timestamps for o in outputs],
            created=outputs[0].created_time,
            started=min(o.lifespan[0] for o in outputs),
            cached_prompt_tokens=cached_prompt_tokens,
        )
