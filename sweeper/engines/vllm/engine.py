"""vLLM engine: vLLM's offline `LLM` or its `AsyncLLM` behind the `Engine` interface, reporting
the metrics of `sweeper/metrics/performance.py` with the same meaning as `engine=hf`.

Requests. Each request's chat is rendered and tokenized by `ChatPrompts`
(sweeper/engines/toolkit/chat.py), as engine=hf's is, and goes to vLLM as token ids plus its
images (none for a text request): vLLM's renderer expands the image placeholders with its own
processor and hands the request to the engine core (a child process). So both engines send the
same prompt tokens. Two frontends (`engine.frontend`, sweeper/engines/vllm/frontends.py):
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
  the previous batch has finished (how `vllm bench latency` emulates a static server), rendered
  and then handed to the engine core at once with its scheduling paused, so that the engine runs
  the batch as one, as engine=hf does. The scheduler's `max_num_seqs` (`engine.max_num_seqs`)
  must hold a whole batch.
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
  the hand-over to the event loop), and in a static batch it adds the batch's rendering (as HF's
  TTFT includes its processor call on the whole batch).
- `queue_s` = scheduled_ts - queued_ts: from the engine core receiving the request to its first
  scheduling.
- `prefill_s` = first_token_ts - scheduled_ts: vLLM's own prefill interval, from the request's
  first scheduling to its first token (chunked prefill and the other requests of the same steps
  included, as in HF's batched prefill).
- `tpot_s` = (last_token_ts - first_token_ts) / (tokens - 1), `latency_s` = ttft_s +
  (last_token_ts - first_token_ts). With num_samples > 1 the stats are those vLLM keeps for the
  request (one of its sequences).
- `preprocess_s` = image decode + the time from sweeper taking the request up (chat template,
  tokens) until vLLM has handed it to the engine core (rendering with the HF processor, input
  processing, hand-off; async: the hand-over to the event loop and the wait for a renderer
  thread too). In a static batch, the batch's: from its first request taken up until the whole
  batch is handed over, as HF's processor call on the batch.
- `output_tokens`: the generated token ids of every sequence; vLLM stops at EOS and keeps it,
  as counted for HF.
- cached prompt tokens: `RequestOutput.num_cached_tokens`, the prompt tokens served from the
  prefix cache; `prefix_cache_hit_rate` = cached / prompt tokens over the measured run.

Cross-checks logged beside them (`own_metrics`), from vLLM's Prometheus metrics differenced over
the measured run (`vllm.v1.metrics.reader.get_metrics_snapshot`, what `LLM.get_metrics()`
returns; `AsyncLLM` registers the same Prometheus logger when log stats are on):
`vllm_ttft_s`, the mean of vLLM's time_to_first_token histogram (sum / count), and
`vllm_prefix_cache_hit_rate`, prefix_cache_hits / prefix_cache_queries (both count tokens).

Beam search: sweeper/engines/vllm/beam.py.

Memory: vLLM pre-allocates at start-up (on a GPU `gpu_memory_utilization` of the card for
weights, activations and KV cache; on CPU a KV cache of `kv_cache_space_gb` GiB of RAM); the run
records it in the `vllm_memory` tag. Peak memory is read over the process tree, which holds the
engine core and its worker.

Lifecycle: the engine cache reuses a loaded engine across trials with the same engine-level
config (the frontend and renderer_num_workers included); `close` shuts the engine core down (async:
`AsyncLLM.shutdown`, then its event loop stops) and waits until its processes have exited, so
their memory is free before the next engine loads.

vLLM is imported only when an engine is built: without it, the config's `check` refuses
`engine=vllm` in one line with the install command.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from sweeper.config import ConfigError
from sweeper.engines.base import Engine, OnDone
from sweeper.engines.toolkit import processes
from sweeper.engines.toolkit.chat import ChatPrompts
from sweeper.engines.toolkit.devices import resolve_dtype
from sweeper.engines.toolkit.prometheus import totals, vllm_own_metrics
from sweeper.engines.toolkit.timing import Marks, request_timing
from sweeper.engines.vllm.beam import beam_search
from sweeper.engines.vllm.config import VLLMEngineConfig
from sweeper.engines.vllm.frontends import (
    FRONTENDS,
    AsyncFrontend,
    OfflineFrontend,
    Refused,
    Submission,
)
from sweeper.models import has_weights
from sweeper.requests import Completion, DecodingParams, Request, ServingParams

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.sampling_params import RequestOutputKind

GIB = 1024**3
# On CPU vLLM reads gpu_memory_utilization as a share of all RAM and fails to start when other
# processes hold it; a fixed KV cache starts anywhere.
CPU_KV_CACHE_GB = 1.0
# Engine keys passed to vLLM only when set, so that vLLM's own defaults (which vary by release)
# apply otherwise.
SET_ONLY_KEYS = (
    "mm_processor_cache_gb",
    "mm_processor_cache_type",
    "mm_tensor_ipc",
    "async_scheduling",
    "renderer_num_workers",
    "kv_cache_dtype",
    "quantization",
)


def _plain(value: Any) -> Any:
    """A config value as vLLM takes it (Enums as their strings)."""
    return str(value) if isinstance(value, str) else value


class VLLMEngine(Engine):
    def __init__(
        self,
        engine_cfg: VLLMEngineConfig,
        chat: ChatPrompts,
        *,
        prefix_caching: bool,
        max_num_seqs: int,
    ):
        # Quiet by default, as the CLI keeps other libraries (VLLM_LOGGING_LEVEL=INFO shows all);
        # read when vLLM is first imported, and inherited by its engine processes.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm.platforms import current_platform

        self.device = current_platform.device_type  # the config's check matched engine.device
        self.chat = chat
        self.frontend_name = str(engine_cfg.frontend)
        kv_cache_gb = engine_cfg.kv_cache_space_gb
        if kv_cache_gb is None and self.device == "cpu":
            kv_cache_gb = CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            where = "RAM" if self.device == "cpu" else "device memory"
            self.memory_note = f"pre-allocates a {kv_cache_gb:g} GiB KV cache in {where}"
        else:
            self.memory_note = (
                f"pre-allocates {engine_cfg.gpu_memory_utilization:.0%} of the GPU at start-up "
                "(weights, activations, KV cache)"
            )
        path = chat.info.path
        # An architecture-only folder has no weights to read: vLLM initialises them at random.
        self.load_format = str(engine_cfg.load_format)
        if self.load_format == "auto" and not has_weights(path):
            self.load_format = "dummy"
        if engine_cfg.mm_tensor_ipc == "torch_shm":  # vLLM refuses it with forked workers
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        started_before = processes.child_pids()
        # The same engine arguments for both frontends (LLM(...) and AsyncEngineArgs(...)).
        engine_args = {
            "model": path,
            "dtype": resolve_dtype(engine_cfg.dtype, self.device),
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
            # Per-request RequestStateStats and the Prometheus metrics need it.
            "disable_log_stats": False,
            **{
                key: _plain(getattr(engine_cfg, key))
                for key in SET_ONLY_KEYS
                if getattr(engine_cfg, key) is not None
            },
        }
        if speculative := engine_cfg.speculative_config():
            engine_args["speculative_config"] = speculative
        if chat.info.takes_images:  # a workload sends at most one image per request
            engine_args["limit_mm_per_prompt"] = {"image": 1, "video": 0}
        self.frontend = FRONTENDS[self.frontend_name](engine_args)
        self.max_model_len = self.frontend.vllm_config.model_config.max_model_len
        # The engine core and its workers: they hold the model, and close waits for them.
        self.processes = processes.started_since(started_before)
        # At exit multiprocessing joins its children, and the engine core would wait for a
        # shutdown nobody sends while the engine is still cached: close it first (atexit runs the
        # last registered first, and vLLM has imported multiprocessing by now).
        atexit.register(self.close)
        # vLLM's start-up swallows a KeyboardInterrupt (Ctrl-C, SIGTERM) while it waits for its
        # engine core, and then starts anyway: the interrupted trial must not go on.
        if processes.interrupted():
            self.close()
            raise KeyboardInterrupt

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
            "vllm_quantization": str(config.model_config.quantization),
            "vllm_speculative_config": str(config.speculative_config),
            "vllm_batch_handover": self.frontend.batch_handover,
        }

    @staticmethod
    def _counters() -> dict[str, float]:
        from vllm.v1.metrics.reader import Counter, Histogram, get_metrics_snapshot

        samples: list[tuple[str, float]] = []
        for metric in get_metrics_snapshot():  # one entry per label set (engine index)
            if isinstance(metric, Histogram):
                samples += [
                    (f"{metric.name}_sum", metric.sum),
                    (f"{metric.name}_count", metric.count),
                ]
            elif isinstance(metric, Counter):
                samples.append((metric.name, metric.value))
        return totals(samples)

    @contextmanager
    def own_metrics(self) -> Iterator[dict[str, float]]:
        metrics: dict[str, float] = {}
        before = self._counters()
        yield metrics
        metrics.update(vllm_own_metrics(before, self._counters()))

    @staticmethod
    def _sampling_params(
        decoding: DecodingParams, output_kind: RequestOutputKind | None = None
    ) -> SamplingParams:
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
            # Only the final output per request (the offline LLM sets it itself), unless streamed.
            output_kind=output_kind or RequestOutputKind.FINAL_ONLY,
        )

    def reset_prefix_cache(self) -> None:
        # The processed-image caches too: a measured phase would otherwise skip the processor for
        # the images an earlier phase sent, which engine=hf never does.
        self.frontend.reset_caches()

    def _prompt(self, request: Request) -> dict[str, Any]:
        """Token ids (image placeholders not expanded: vLLM's processor does it) and images."""
        prompt: dict[str, Any] = {
            "prompt_token_ids": self.chat.token_ids(self.chat.text(request.messages))
        }
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images}
        return prompt

    def _too_long(self, error: Exception, request: str) -> Exception:
        """vLLM's refusal of a prompt longer than max_model_len, as a one-line config error."""
        if getattr(error, "parameter", None) != "input_tokens":
            return error
        return ConfigError(
            "engine.max_model_len",
            self.max_model_len,
            f"at least the prompt length: {request} has {error.value}+ prompt tokens, images "
            "included (raise it, or shorten the system prompt)",
        )

    def _submissions(
        self, requests: Iterable[Request], batch_submitted: float | None
    ) -> Iterator[Submission]:
        for request in requests:
            submitted = time.time() if batch_submitted is None else batch_submitted
            started = time.perf_counter()
            yield Submission(request, self._prompt(request), submitted, started)

    def _generate(
        self, requests: Iterable[Request], decoding: DecodingParams, batch_submitted: float | None
    ) -> list[Completion]:
        """Submit every request, wait until all are done; `batch_submitted` is the submission
        time of a static batch (None: each request is submitted on its own)."""
        submissions = self._submissions(requests, batch_submitted)
        together = batch_submitted is not None
        try:
            done = self.frontend.run(submissions, self._sampling_params(decoding), together)
        except Refused as refused:
            raise self._too_long(refused.error, f"request {refused.request.request.id}") from None
        return [self._completion(submission, output) for submission, output in done]

    def _completion(self, submission: Submission, output: RequestOutput) -> Completion:
        stats = output.metrics
        # arrival_time and first_token_latency are this process's wall clock, as `submitted`;
        # the token timestamps are the engine core's monotonic clock: only their difference.
        first_token = stats.arrival_time + stats.first_token_latency
        marks = Marks(
            submitted=submission.submitted,
            first_token=first_token,
            last_token=first_token + (stats.last_token_ts - stats.first_token_ts),
            tokens=stats.num_generation_tokens,
        )
        return completion_of(submission, output, marks)

    def submit(
        self, request: Request, decoding: DecodingParams, serving: ServingParams
    ) -> Future[Completion]:
        """One request now, through AsyncLLM (the config refuses the offline frontend for open
        loads); its outputs streamed, so that TTFT, ITL and E2EL are the times this process saw
        its chunks, as vLLM's bench serve times a server's."""
        from vllm.sampling_params import RequestOutputKind

        assert isinstance(self.frontend, AsyncFrontend)
        (submission,) = self._submissions([request], None)
        params = self._sampling_params(decoding, RequestOutputKind.CUMULATIVE)
        done: Future[Completion] = Future()

        def finish(streamed: Future[tuple[RequestOutput, list[float]]]) -> None:
            try:
                output, arrivals = streamed.result()
                done.set_result(self._streamed(submission, output, arrivals))
            except BaseException as error:  # a refused prompt, an aborted request
                refused = error.error if isinstance(error, Refused) else error
                done.set_exception(self._too_long(refused, f"request {request.id}"))

        self.frontend.stream(submission, params).add_done_callback(finish)
        return done

    def _streamed(
        self, submission: Submission, output: RequestOutput, arrivals: list[float]
    ) -> Completion:
        """A streamed request's completion, its times on this process's clock."""
        longest = max(len(sequence.token_ids) for sequence in output.outputs)
        marks = Marks(submission.started, arrivals[0], arrivals[-1], longest)
        completion = completion_of(submission, output, marks)
        completion.timing.itl_s = [b - a for a, b in itertools.pairwise(arrivals)]
        return completion

    def generate(
        self, requests: list[Request], decoding: DecodingParams, serving: ServingParams
    ) -> list[Completion]:
        if decoding.beam_num == 1:
            return self._generate(requests, decoding, time.time())
        # The config refuses beam search with the async frontend.
        assert isinstance(self.frontend, OfflineFrontend)
        batch = list(self._submissions(requests, time.time()))
        from vllm.exceptions import VLLMValidationError

        try:
            return beam_search(self.frontend.llm, batch, decoding, self.chat.decode)
        except VLLMValidationError as error:
            raise self._too_long(error, "a request of the batch") from None

    def run_continuous(
        self,
        requests: Iterable[Request],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None,
    ) -> list[Completion]:
        """Every request at once (batch_size is the scheduler's max_num_seqs, fixed at load);
        batch_size 1 (the calibration's reference) runs one request at a time."""
        if serving.batch_size == 1:
            return super().run(requests, decoding, replace(serving, continuous_batching=False))
        completions = self._generate(requests, decoding, None)
        if on_done is not None:
            on_done(len(completions))
        return completions

    def close(self) -> None:
        atexit.unregister(self.close)
        self.frontend.shutdown()
        del self.frontend
        gc.collect()
        processes.wait_or_kill(self.processes)
        if self.device == "cuda":
            torch.cuda.empty_cache()


def completion_of(submission: Submission, output: RequestOutput, marks: Marks) -> Completion:
    """A finished request's completion: its marks, vLLM's own queue and prefill times, and its
    token counts (every sequence's)."""
    stats = output.metrics
    token_ids = [list(sequence.token_ids) for sequence in output.outputs]
    timing = request_timing(
        marks,
        preprocess_s=submission.preprocess_s,
        queue_s=stats.scheduled_ts - stats.queued_ts,
        prefill_s=stats.first_token_ts - stats.scheduled_ts,
        prompt_tokens=len(output.prompt_token_ids),
        output_tokens=sum(len(ids) for ids in token_ids),
        cached_prompt_tokens=output.num_cached_tokens or 0,
    )
    texts = [sequence.text for sequence in output.outputs]
    return Completion(submission.request.id, texts, token_ids, timing)
