"""The streaming chat-completions client behind engine=openai.

A request becomes one `POST /v1/chat/completions` with `stream=true`; its body (images encoded
as data URLs, JSON) is made before it is sent (`OpenAIEngine.prepare`; the open loads do it ahead
of the schedule, in threads), so that the event loop, which runs in a thread of its own and reads
every stream, only moves bytes and stamps chunks. Times are those `vllm bench serve` takes on the
client (vllm/benchmarks/lib/endpoint_request_func.py), on one clock (`time.perf_counter`), from
the request's sending, its body made (in every mode: TTFT runs from the POST, as bench's):
- a chunk counts when it carries output: a delta's text or token ids, or a finish reason; the
  opening chunk (the role, no text) does not (vLLM sends it just before the first token's);
- `ttft_s`: submission -> the first such chunk; `latency_s` (E2EL): -> the last one;
- `itl_s`: every gap between consecutive such chunks (all of the request's sequences);
- `tpot_s`: (last chunk - first chunk of the longest sequence) / (its tokens - 1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp
from PIL import Image

from sweeper.engines.toolkit.timing import Marks, request_timing
from sweeper.requests import Completion, DecodingParams, Request

_T = TypeVar("_T")
CHAT_PATH = "/v1/chat/completions"
# An idle connection is closed by the client before the server closes it: uvicorn (vLLM's,
# SGLang's server) closes one after 5 s idle (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a request
# written as it did failed with "Can not write request body" after the pause between two steps
# of a rate sweep (aiohttp keeps one 15 s).
IDLE_CONNECTION_S = 2.0


class RequestFailed(RuntimeError):
    """The server refused or broke off a request; the message says which, where and why."""


def image_url(image: Image.Image) -> str:
    """A PNG data URL: lossless, so the server decodes the pixels sweeper's other engines get.
    Compression level 1: the encoding is the client's own work (preprocess_s)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(request: Request) -> list[dict[str, Any]]:
    """The request's turns in the OpenAI format: text parts as they are, each image part as an
    `image_url` part holding the request's next image."""
    images = iter(request.images)
    messages = []
    for message in request.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image_url", "image_url": {"url": image_url(next(images))}}
                if part["type"] == "image"
                else {"type": "text", "text": part["text"]}
                for part in content
            ]
        messages.append({**message, "content": content})
    return messages


def chat_body(
    request: Request, decoding: DecodingParams, model: str, vllm_extras: bool
) -> dict[str, Any]:
    """The request's JSON body. `top_k` and `ignore_eos` are extra fields vLLM and SGLang take,
    sent only when they change something; `return_token_ids` is vLLM's (each chunk then holds
    its token ids), sent to a vLLM only. max_completion_tokens is what OpenAI's API and vLLM's
    bench send (max_tokens is deprecated in both)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": chat_messages(request),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": decoding.max_new_tokens,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p,
        "n": decoding.num_samples,
        "seed": decoding.seed,
    }
    if decoding.top_k:
        body["top_k"] = decoding.top_k
    if decoding.ignore_eos:
        body["ignore_eos"] = True
    if vllm_extras:
        body["return_token_ids"] = True
    return body


@dataclass
class EncodedRequest(Request):
    """A request with its body made for `decoding` (`OpenAIEngine.prepare`); `encode_s`: the
    time that took, beside the request's own `prepare_s` (its images' decode)."""

    body: bytes = b""
    decoding: DecodingParams | None = None
    encode_s: float = 0.0


@dataclass
class Sent:
    """A request ready to go: its body, when its clock started (perf_counter), and its
    preprocessing so far (its images' decode, then the client's encoding)."""

    request: Request
    body: bytes
    submitted: float
    preprocess_s: float


@dataclass
class Answer:
    """One streamed answer as it comes in, by sequence (choice index)."""

    texts: defaultdict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    token_ids: defaultdict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    tokens: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    first_chunk: dict[int, float] = field(default_factory=dict)
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with output
    usage: dict[str, Any] = field(default_factory=dict)

    def add(self, event: dict[str, Any], now: float) -> None:
        if event.get("usage"):
            self.usage = event["usage"]
        carried = False
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            text, ids = delta.get("content") or "", choice.get("token_ids") or []
            if not (text or ids or choice.get("finish_reason")):
                continue  # the opening chunk: the role alone
            index = choice.get("index", 0)
            self.texts[index].append(text)
            self.token_ids[index] += ids
            # Without token ids, a chunk stands for a token (vLLM streams one per chunk).
            self.tokens[index] += len(ids) if ids else int(bool(text))
            self.first_chunk.setdefault(index, now)
            carried = True
        if carried:
            self.chunks.append(now)

    def completion(self, sent: Sent) -> Completion:
        sequences = range(max(self.first_chunk) + 1)
        longest = max(sequences, key=lambda index: self.tokens[index])
        marks = Marks(
            submitted=sent.submitted,
            first_token=self.chunks[0],
            last_token=self.chunks[-1],
            tokens=self.tokens[longest],
            longest_first_token=self.first_chunk[longest],
        )
        details = self.usage.get("prompt_tokens_details") or {}
        timing = request_timing(
            marks,
            preprocess_s=sent.preprocess_s,
            # A client sees neither: nan (the trial's means skip it; a vLLM server's own
            # histograms stand in through the engine's own metrics).
            prefill_s=math.nan,
            queue_s=math.nan,
            prompt_tokens=self.usage.get("prompt_tokens", 0),
            output_tokens=self.usage.get("completion_tokens", sum(self.tokens.values())),
            cached_prompt_tokens=details.get("cached_tokens") or 0,
        )
        gaps = [later - earlier for earlier, later in itertools.pairwise(self.chunks)]
        return Completion(
            sent.request.id,
            ["".join(self.texts[index]) for index in sequences],
            [self.token_ids[index] for index in sequences],
            replace(timing, itl_s=gaps),
        )


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body, else the body's first line."""
    try:
        error = json.loads(text)
        error = error.get("error", error) if isinstance(error, dict) else error
        message = error.get("message", text) if isinstance(error, dict) else text
    except ValueError:
        message = text
    lines = str(message).strip().splitlines()
    return lines[0] if lines else "(no message)"


@dataclass
class Reply:
    """A whole (not streamed) answer: its HTTP status and body."""

    url: str
    status: int
    text: str

    def raise_for_status(self) -> None:
        if self.status != 200:
            raise RequestFailed(
                f"{self.url} answered HTTP {self.status}: {_error_message(self.text)}"
            )


class StreamingClient:
    """An `aiohttp.ClientSession` on an asyncio event loop that runs in a thread of its own:
    `start` hands it a request from any thread and returns a `concurrent.futures.Future`.
    aiohttp, as `vllm bench serve` uses: with httpx's AsyncClient the same requests streamed
    3-10x fewer tokens/s all at once and left ~0.5 s late at 14/s, at no more CPU time, on the
    2-core CPU box (experiments/serving_load/README.md, "The client's HTTP library")."""

    def __init__(self, root: str, headers: dict[str, str], max_connections: int, timeout_s: float):
        self.root = root
        self.answered = 0  # requests answered in full (read by own_metrics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sweeper-openai-client", daemon=True
        )
        self._thread.start()
        # No wait limit for a free connection: a request waiting for one waits, its clock
        # running; connecting and every read each fail after timeout_s.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._http = self.call(self._open(headers, max_connections, timeout))

    @staticmethod
    async def _open(
        headers: dict[str, str], max_connections: int, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=0, keepalive_timeout=IDLE_CONNECTION_S
        )
        return aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)

    def start(self, coroutine: Coroutine[Any, Any, _T]) -> Future[_T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the loop and wait for it; interrupted (Ctrl-C), it is cancelled."""
        future = self.start(coroutine)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def answer(self, sent: Sent) -> Completion:
        """Stream one request's answer. A failure cancels it: aiohttp closes a connection whose
        answer was not read to its end, and the server aborts the request."""
        answer = Answer()
        headers = {"Content-Type": "application/json"}
        url = f"{self.root}{CHAT_PATH}"
        try:
            async with self._http.post(url, data=sent.body, headers=headers) as r:
                if r.status != 200:
                    text = (await r.read()).decode(errors="replace")
                    raise RequestFailed(
                        f"request {sent.request.id}: {url} answered HTTP {r.status}: "
                        f"{_error_message(text)}"
                    )
                pending = b""
                async for received in r.content.iter_any():
                    # Server-sent events, one per line; a line may span reads.
                    *lines, pending = (pending + received).split(b"\n")
                    for line in lines:
                        now = time.perf_counter()
                        data = line.removeprefix(b"data:").strip()
                        if not line.startswith(b"data:") or data == b"[DONE]":
                            continue
                        event = json.loads(data)
                        if "error" in event:  # an error after the stream began (HTTP 200 sent)
                            raise RequestFailed(
                                f"request {sent.request.id}: {url} broke off the stream: "
                                f"{_error_message(data.decode(errors='replace'))}"
                            )
                        answer.add(event, now)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RequestFailed(
                f"request {sent.request.id}: {url} failed: {type(error).__name__}: {error}"
            ) from None
        if not answer.chunks:
            raise RequestFailed(f"request {sent.request.id}: {url} streamed no output")
        self.answered += 1
        return answer.completion(sent)

    async def answer_together(self, batch: list[Sent]) -> list[Completion]:
        """A static batch: every request sent at once; the first failure cancels the rest."""
        try:
            async with asyncio.TaskGroup() as tasks:
                running = [tasks.create_task(self.answer(sent)) for sent in batch]
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
        return [task.result() for task in running]

    async def get(self, path: str) -> Reply:
        return await self._whole("GET", path)

    async def post(self, path: str) -> Reply:
        return await self._whole("POST", path)

    async def _whole(self, method: str, path: str) -> Reply:
        url = f"{self.root}{path}"
        try:
            async with self._http.request(method, url) as r:
                return Reply(url, r.status, (await r.read()).decode(errors="replace"))
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RequestFailed(f"{url} failed: {type(error).__name__}: {error}") from None

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _close(self) -> None:
        left = asyncio.all_tasks() - {asyncio.current_task()}
        for task in left:  # streams still open (an interrupted run): closed, so aborted
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await self._http.close()
