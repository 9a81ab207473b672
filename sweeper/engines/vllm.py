"""vLLM engine: offline `vllm.LLM` behind the `Engine` interface, reporting the metrics of
`sweeper/metrics/performance.py` with the same meaning as `engine=hf`.

Requests. Each request's chat (the workload's, `sweeper/workloads.py`) is rendered with the
model's processor chat template, as `engine=hf` does, so both engines send the same prompt
tokens; the text and the image (when the chat holds one) go to `LLM.enqueue`, inside which vLLM
renders the request (its HF processor call), processes its inputs and hands it to the engine core
(a child process). `LLM.wait_for_completion` runs the engine until every submitted request is
done.

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
the engine runs with `disable_log_stats=False`). Its `arrival_time` and `first_token_latency` are
wall clock (`time.time()`) read in this process (vLLM's frontend); `scheduled_ts`,
`first_token_ts` and `last_token_ts` are the engine core's `time.monotonic()`, read in another
process. Only differences within one clock are taken:
- `ttft_s` = (arrival_time - submission) + first_token_latency. Submission is the start of the
  request's static batch, or the request itself under continuous batching; arrival is when vLLM
  began rendering the request; first_token_latency runs from arrival until the first token is
  back in this process. So under continuous batching `ttft_s` is vLLM's own TTFT, and in a static
  batch it adds the time the request waited while the requests before it were rendered (as HF's
  TTFT includes its processor call on the whole batch).
- `prefill_s` = first_token_ts - scheduled_ts: vLLM's own prefill interval, from the request's
  first scheduling to its first token (chunked prefill and the other requests of the same steps
  included, as in HF's batched prefill).
- `tpot_s` = (last_token_ts - first_token_ts) / (tokens - 1), `latency_s` = ttft_s +
  (last_token_ts - first_token_ts). With num_samples > 1 the stats are those vLLM keeps for the
  request (one of its sequences).
- `preprocess_s` = image decode + the request's own `enqueue` call (chat template, vLLM's
  renderer with the HF processor, input processing, hand-off to the engine core).
- `output_tokens`: the generated token ids of every sequence; vLLM stops at EOS and keeps it,
  as counted for HF.
- cached prompt tokens: `RequestOutput.num_cached_tokens`, the prompt tokens served from the
  prefix cache; `prefix_cache_hit_rate` = cached / prompt tokens over the measured run.

Cross-checks logged beside them (`own_metrics`), from vLLM's Prometheus metrics
(`LLM.get_metrics()`) differenced over the measured run: `vllm_ttft_s`, the mean of vLLM's
time_to_first_token histogram (sum / count), and `vllm_prefix_cache_hit_rate`,
prefix_cache_hits / prefix_cache_queries (both count tokens).

Beam search (beam_num > 1) uses `LLM.beam_search`, which runs outside the scheduler: one
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
config; `close` shuts the engine core down and waits until its processes have exited, so their
memory is free before the next engine loads.

vLLM is imported only when an engine is built: without it, `check_supported` refuses
`engine=vllm` in one line with the install command.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

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


# Engine keys passed to LLM(...) only when set, so that vLLM's own defaults (which vary by
# release) apply otherwise.
FRONTEND_KEYS = (
    "mm_processor_cache_gb",
    "mm_processor_cache_type",
    "mm_tensor_ipc",
    "async_scheduling",
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
class _Submitted:
    item: LoadedSample
    submitted: float  # wall clock, as vLLM's arrival_time
    preprocess_s: float


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
        from vllm import LLM
        from vllm.platforms import current_platform

        platform = current_platform.device_type
        if engine_cfg.device not in ("auto", platform):
            raise ConfigError(
                "engine.device",
                engine_cfg.device,
                f"auto or {platform}: the installed vLLM runs on {platform}",
            )
        self.device = platform
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
        self.llm = LLM(
            model=model_path,
            dtype=resolve_dtype(engine_cfg.dtype, platform),
            seed=engine_cfg.seed,
            gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_cache_gb is None else int(kv_cache_gb * GIB),
            max_model_len=engine_cfg.max_model_len,
            enforce_eager=engine_cfg.enforce_eager,
            tensor_parallel_size=engine_cfg.tensor_parallel_size,
            load_format=self.load_format,
            max_num_batched_tokens=engine_cfg.max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=prefix_caching,
            limit_mm_per_prompt={"image": 1, "video": 0},
            disable_log_stats=False,  # per-request RequestStateStats and get_metrics() need it
            **_set_only(engine_cfg, FRONTEND_KEYS),
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
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

        cache = self.llm.llm_engine.vllm_config.cache_config
        return {
            "vllm_version": vllm.__version__,
            "vllm_load_format": self.load_format,
            "vllm_memory": self.memory_note,
            "vllm_kv_cache_tokens": str((cache.num_gpu_blocks or 0) * cache.block_size),
        }

    def _counters(self) -> dict[str, float]:
        totals = {"ttft_sum": 0.0, "ttft_count": 0.0, "queries": 0.0, "hits": 0.0}
        for metric in self.llm.get_metrics():  # one entry per label set (engine index)
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

        return SamplingParams(
            n=decoding.num_samples,
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            top_k=decoding.top_k,
            top_p=decoding.top_p,
            seed=decoding.seed,
            ignore_eos=decoding.ignore_eos,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reset_prefix_cache(self) -> None:
        # The processed-image caches too: a measured phase would otherwise skip the processor for
        # the images an earlier phase sent, which engine=hf never does.
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()

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

    def _generate(
        self,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_submitted: float | None,
    ) -> list[Completion]:
        """Submit every item, run the engine until all are done; `batch_submitted` is the
        submission time of a static batch (None: each request is submitted on its own)."""
        from vllm.exceptions import VLLMValidationError

        params = self._sampling_params(decoding)
        submitted: list[_Submitted] = []
        question = ""
        try:
            for item in items:  # a workload's iterator may raise too (a broken image)
                question = f"question {item.sample.question_id}"
                submit = time.time() if batch_submitted is None else batch_submitted
                start = time.perf_counter()
                self.llm.enqueue(self._prompt(item, decoding), params, use_tqdm=False)
                preprocess_s = item.decode_s + time.perf_counter() - start
                submitted.append(_Submitted(item, submit, preprocess_s))
        except Exception as error:
            # Finish what was submitted, so that the engine is clean for the next trial.
            self.llm.wait_for_completion(use_tqdm=False)
            if isinstance(error, VLLMValidationError):
                raise self._too_long(error, question) from None
            raise
        # In submission order: vLLM returns outputs sorted by its request counter.
        outputs = self.llm.wait_for_completion(use_tqdm=False)
        return [
            self._completion(request, output)
            for request, output in zip(submitted, outputs, strict=True)
        ]

    def _completion(self, request: _Submitted, output: RequestOutput) -> Completion:
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

        params = BeamSearchParams(beam_width=decoding.beam_num, max_tokens=decoding.max_new_tokens)
        submitted = time.time()
        prompts = [self._prompt(item, decoding) for item in batch]
        try:
            with _RoundClock(self.llm) as rounds:
                results = self.llm.beam_search(prompts, params)
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
        # LLM has no shutdown of its own; its engine-core client stops the engine processes.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        _, alive = psutil.wait_procs(self.processes, timeout=30)
        for process in alive:  # ours, and still holding the memory the next engine needs
            process.kill()
        if self.device == "cuda":
            torch.cuda.empty_cache()
