"""The interface every engine implements: generic requests in, completions with per-request
timing out; and the clock that synchronises the device before it is read."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from sweeper.requests import Completion, DecodingParams, Request, ServingParams

if TYPE_CHECKING:
    from sweeper.engines.toolkit.chat import ChatPrompts

OnDone = Callable[[int], None]  # told how many more requests have been answered


def batches(requests: Iterable[Request], size: int) -> Iterator[list[Request]]:
    """Consecutive lists of `size` requests (the last may be shorter), pulled lazily."""
    iterator = iter(requests)
    while batch := list(islice(iterator, size)):
        yield batch


class Engine(ABC):
    """Loads a model once (its config's `_target_` names the class); answers requests.

    Engines are built by `EngineCache` as `cls(engine_cfg, chat, **load_options)`, where `chat`
    is the model's `ChatPrompts` (sweeper/engines/toolkit/chat.py) and `load_options` what
    `engine_cfg.load_options(trial)` says the engine fixes at load.
    """

    device: str
    chat: ChatPrompts  # how requests' chats become prompt text and token ids

    def tags(self) -> dict[str, str]:
        """Facts about the loaded engine worth recording on every trial's run."""
        return {}

    def artifacts(self) -> dict[str, Path]:
        """Files worth keeping with every trial's run, by the name to keep them under (e.g. a
        server's log)."""
        return {}

    @contextmanager
    def own_metrics(self) -> Iterator[dict[str, float]]:
        """Metrics the engine measures itself over the block, filled in when it exits (e.g. the
        difference of its own cumulative counters); logged beside the trial's metrics."""
        yield {}

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued device work, so that a clock read after it means what it says."""

    def now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    @abstractmethod
    def generate(
        self, requests: list[Request], decoding: DecodingParams, serving: ServingParams
    ) -> list[Completion]:
        """Answer one static batch, submitted to the engine together."""

    def run(
        self,
        requests: Iterable[Request],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None = None,
    ) -> list[Completion]:
        """Answer every request: under continuous batching as the engine schedules them, else in
        static batches of `serving.batch_size`, each started when the previous one is done."""
        if serving.continuous_batching:
            return self.run_continuous(requests, decoding, serving, on_done)
        completions: list[Completion] = []
        for batch in batches(requests, serving.batch_size):
            completions.extend(self.generate(batch, decoding, serving))
            if on_done is not None:
                on_done(len(batch))
        return completions

    def run_continuous(
        self,
        requests: Iterable[Request],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None,
    ) -> list[Completion]:
        """Every request submitted as it comes, at most `serving.batch_size` running at once."""
        raise NotImplementedError(f"{type(self).__name__} has no continuous batching")

    def prepare(self, request: Request, decoding: DecodingParams) -> Request:
        """Do now what the engine's client does to a request before it sends it, and return the
        request to `submit`: the open loads call it ahead of the request's send time, in a thread,
        as `vllm bench serve` makes its requests before its clock starts; the time it takes is
        the request's own (in its `preprocess_s`, not its `ttft_s`). An engine whose
        preprocessing is the served engine's own work (rendering, image processing) has nothing
        to do here: that work is in TTFT, as a server's is."""
        return request

    def submit(
        self, request: Request, decoding: DecodingParams, serving: ServingParams
    ) -> Future[Completion]:
        """Hand one request to the running engine now, from any thread; the future completes
        with its answer (or its error). What the open loads (concurrency, rate) drive: the
        request's clock starts at this call, and its `itl_s` are the gaps between the chunks
        streamed back. An engine that can take requests only in its own batches does not
        implement it, and its config refuses those loads."""
        raise NotImplementedError(f"{type(self).__name__} cannot take requests as they come")

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the model's tokenizer (workload=shared_prefix sizes its system
        prompt with it)."""
        return self.chat.count_tokens(text)

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes, so that a measured phase does not reuse the KV of the
        same prompts sent by an earlier phase (warm-up, calibration). No cache: nothing to do."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Free the model and its memory before another engine loads."""
