"""vLLM's two frontends behind one `run`: the offline `LLM` (rendering serially in this thread,
then `wait_for_completion`) and `AsyncLLM` (what `vllm serve` runs) driven from an asyncio event
loop in a thread of its own. Each takes requests as an iterator yields them and returns every
output in submission order. A static batch (`together`) is rendered first and handed to the
engine core at once, so that the engine starts on the whole batch, as engine=hf's batch does;
otherwise each request is handed over as soon as it is rendered. Handing a batch over takes a
while (its images are serialised to the engine core), and the core would start on the first
request meanwhile (seen here: 25 ms ahead of the eighth): scheduling is paused while a batch is
handed over (`sleep(level=0)`, then `wake_up(tags=["scheduling"])`, vLLM's documented way to
queue requests before any is scheduled; a vLLM without it is handed the batch unpaused, and the
`vllm_batch_handover` tag says so). A request vLLM refuses raises `Refused`, and whatever fails,
no request of the run is left in the engine.

Both render with vLLM's renderer (`render_cmpl` / `render_cmpl_async`, which stamp
arrival_time on entry: `vllm serve`'s path) and hand the result to the engine
(`LLMEngine.add_request` / `AsyncLLM.add_request`), so both send the same tokens."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Coroutine, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sweeper.requests import Request

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.config import VllmConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector

_T = TypeVar("_T")


@dataclass
class Submission:
    """A request as vLLM gets it: its prompt (token ids, images), and its clock marks."""

    request: Request
    prompt: dict[str, Any]
    submitted: float  # wall clock, as vLLM's arrival_time: the static batch's start, or its own
    started: float  # perf_counter when sweeper took it up (its chat template call)
    preprocess_s: float = 0.0

    def handed_over(self) -> None:
        """vLLM has rendered the request and handed it to the engine core."""
        self.preprocess_s = self.request.prepare_s + time.perf_counter() - self.started


def handed_over_together(batch: list[Submission]) -> None:
    """The batch was handed to the engine core at once: each request's preprocessing is the
    batch's, from its first request's start (as engine=hf's processor call on the batch)."""
    batch_s = time.perf_counter() - batch[0].started
    for submission in batch:
        submission.preprocess_s = submission.request.prepare_s + batch_s


class Refused(Exception):
    """vLLM refused a request's input (e.g. a prompt longer than max_model_len)."""

    def __init__(self, request: Submission, error: VLLMValidationError):
        super().__init__(str(error))
        self.request, self.error = request, error


# Pausing, for vLLM's sleep: let requests already running finish first (there are none between
# static batches).
_PAUSE_MODE = "wait"
PAUSED = "scheduling paused while the batch is handed over"
UNPAUSED = "handed over unpaused: this vLLM cannot pause scheduling (sleep level 0)"


class VLLMFrontend(ABC):
    """What differs between vLLM's two frontends: building, submitting, caches, shutdown."""

    vllm_config: VllmConfig
    batch_handover: str = PAUSED  # how a static batch reaches the engine core

    @abstractmethod
    def run(
        self, requests: Iterable[Submission], params: SamplingParams, together: bool
    ) -> list[tuple[Submission, RequestOutput]]:
        """Submit the requests as `requests` yields them (`together`: all at once, once every
        one is rendered) and wait until all are done; the outputs in submission order. A request
        vLLM refuses raises `Refused`; whatever fails, no request of the run is left in the
        engine."""

    @abstractmethod
    def reset_caches(self) -> None:
        """Forget cached prefixes and processed images."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine core (the caller then waits for its processes) and drop vLLM's object:
        its memory is freed even where this frontend lives on (a traceback kept by a failed
        optional import during start-up holds the frames of the stack, start-up's included)."""


class OfflineFrontend(VLLMFrontend):
    """The offline `vllm.LLM`: each request rendered serially in this thread."""

    def __init__(self, engine_args: dict[str, Any]):
        from vllm import LLM

        self.llm: LLM = LLM(**engine_args)
        self.vllm_config = self.llm.llm_engine.vllm_config
        # The tokenization LLM.generate uses, so both frontends send the same tokens.
        self._tokenize = self.llm.renderer.default_cmpl_tok_params

    def _render(self, request: Submission) -> Any:
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        prompt = parse_model_prompt(self.llm.model_config, request.prompt)
        try:
            (engine_input,) = self.llm.renderer.render_cmpl([prompt], self._tokenize)
        except VLLMValidationError as error:
            raise Refused(request, error) from error
        return engine_input

    def _add(self, engine_input: Any, params: SamplingParams) -> None:
        # Ids from the LLM's own counter: wait_for_completion sorts its outputs by them.
        request_id = str(next(self.llm.request_counter))
        self.llm.llm_engine.add_request(request_id, engine_input, params)

    @contextmanager
    def _scheduling_paused(self) -> Iterator[None]:
        engine = self.llm.llm_engine
        if self.batch_handover == PAUSED:
            try:
                engine.sleep(level=0, mode=_PAUSE_MODE)
            except (TypeError, ValueError, NotImplementedError):
                self.batch_handover = UNPAUSED
        try:
            yield
        finally:
            if self.batch_handover == PAUSED:
                engine.wake_up(tags=["scheduling"])

    def run(
        self, requests: Iterable[Submission], params: SamplingParams, together: bool
    ) -> list[tuple[Submission, RequestOutput]]:
        submitted: list[Submission] = []
        rendered: list[Any] = []
        try:
            for request in requests:  # the samples iterator may raise too (a broken image)
                engine_input = self._render(request)
                if together:
                    rendered.append(engine_input)
                else:
                    self._add(engine_input, params)
                    request.handed_over()
                submitted.append(request)
            if rendered:
                with self._scheduling_paused():
                    for engine_input in rendered:
                        self._add(engine_input, params)
                handed_over_together(submitted)
        except Exception:
            # Finish what was handed over, so that the engine is clean for the next trial.
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


class AsyncFrontend(VLLMFrontend):
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
        self, requests: Iterable[Submission], params: SamplingParams, together: bool
    ) -> list[tuple[Submission, RequestOutput]]:
        # None ends the run; an exception (from the samples iterator) fails it.
        submissions: asyncio.Queue[Submission | Exception | None] = asyncio.Queue()
        run = self._run(submissions, params, together)
        outputs = asyncio.run_coroutine_threadsafe(run, self._loop)

        def submit(entry: Submission | Exception | None) -> None:
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
        self,
        submissions: asyncio.Queue[Submission | Exception | None],
        params: SamplingParams,
        together: bool,
    ) -> list[tuple[Submission, RequestOutput]]:
        submitted: list[tuple[Submission, str, asyncio.Task[RequestOutput]]] = []
        batch: list[tuple[Submission, str, Awaitable[Any]]] = []  # together: rendering
        try:
            async with asyncio.TaskGroup() as tasks:
                while (entry := await submissions.get()) is not None:
                    if isinstance(entry, Exception):
                        raise entry
                    request_id = str(next(self._request_ids))
                    if self._renderer_ready:
                        rendering: Awaitable[Any] = tasks.create_task(self._render(entry))
                    else:
                        # vLLM loads its HF processor at a renderer's first call and caches
                        # it. In 0.26 that load is slow, and slower with more renderer threads:
                        # transformers deep-copies its kwargs, the pooled tokenizer among them,
                        # and each copy of the pool rebuilds renderer_num_workers + 1 tokenizer
                        # copies (minutes at 12 threads on an H100 host). Concurrent first calls
                        # would each pay it, so the engine's first request is rendered alone.
                        rendering = asyncio.get_running_loop().create_future()
                        rendering.set_result(await self._render(entry))
                        self._renderer_ready = True
                    if together:
                        batch.append((entry, request_id, rendering))
                    else:
                        answer = self._answer(entry, rendering, params, request_id)
                        submitted.append((entry, request_id, tasks.create_task(answer)))
                # A static batch: every request rendered, then all handed over at once.
                rendered = [(entry, request_id, await r) for entry, request_id, r in batch]
                if rendered:
                    paused = await self._pause_scheduling()
                    try:
                        for entry, request_id, engine_input in rendered:
                            collector = await self._add(entry, engine_input, params, request_id)
                            task = tasks.create_task(collector.get())
                            submitted.append((entry, request_id, task))
                    finally:
                        if paused:
                            await self.llm.wake_up(tags=["scheduling"])
                    handed_over_together([entry for entry, _, _ in batch])
        except Exception:
            # The TaskGroup has cancelled the run's other tasks, but their requests run on in
            # the engine (only AsyncLLM.generate aborts on cancellation): abort every request of
            # the run by id (finished or unknown ones are ignored).
            if not self.llm.errored:
                await self.llm.abort([request_id for _, request_id, _ in submitted])
            raise
        return [(request, task.result()) for request, _, task in submitted]

    async def _pause_scheduling(self) -> bool:
        """Pause the engine core's scheduling if this vLLM can; whether it did."""
        if self.batch_handover == PAUSED:
            try:
                await self.llm.sleep(level=0, mode=_PAUSE_MODE)
                return True
            except (TypeError, ValueError, NotImplementedError):
                self.batch_handover = UNPAUSED
        return False

    async def _render(self, request: Submission) -> Any:
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        prompt = parse_model_prompt(self.llm.model_config, request.prompt)
        try:
            # Rendered here, not inside add_request: given a raw prompt, vLLM 0.26 renders it
            # on the event loop itself (serially) and 0.32 on its renderer pool, each stamping
            # arrival_time at another point; render_cmpl_async is `vllm serve`'s path in both
            # and stamps arrival_time on entry, as the offline LLM's render_cmpl does.
            (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt], self._tokenize)
        except VLLMValidationError as error:
            raise Refused(request, error) from error
        return engine_input

    async def _add(
        self, request: Submission, engine_input: Any, params: SamplingParams, request_id: str
    ) -> RequestOutputCollector:
        from vllm.exceptions import VLLMValidationError

        try:
            return await self.llm.add_request(request_id, engine_input, params)
        except VLLMValidationError as error:
            raise Refused(request, error) from error

    def stream(
        self, request: Submission, params: SamplingParams
    ) -> Future[tuple[RequestOutput, list[float]]]:
        """Hand one request over now (its outputs streamed, `params` cumulative); a future of its
        final output and the perf_counter time each output chunk arrived in this process."""
        return asyncio.run_coroutine_threadsafe(self._stream(request, params), self._loop)

    async def _stream(
        self, request: Submission, params: SamplingParams
    ) -> tuple[RequestOutput, list[float]]:
        request_id = str(next(self._request_ids))
        collector = await self._add(request, await self._render(request), params, request_id)
        request.handed_over()
        arrivals: list[float] = []
        try:
            while True:
                output = await collector.get()
                arrivals.append(time.perf_counter())
                if output.finished:
                    return output, arrivals
        except BaseException:
            if not self.llm.errored:
                await self.llm.abort([request_id])
            raise

    async def _answer(
        self,
        request: Submission,
        rendering: Awaitable[Any],
        params: SamplingParams,
        request_id: str,
    ) -> RequestOutput:
        """A request handed over as soon as it is rendered; its one final output."""
        collector = await self._add(request, await rendering, params, request_id)
        request.handed_over()
        return await collector.get()  # FINAL_ONLY: one output, once the request is done

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


# engine.frontend -> the class.
FRONTENDS: dict[str, type[VLLMFrontend]] = {"llm": OfflineFrontend, "async": AsyncFrontend}
