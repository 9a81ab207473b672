"""engine=openai: an OpenAI-compatible server driven over HTTP, streamed chat completions.

The server is one already running (`engine.base_url`: sweeper only measures) or one sweeper
starts (`engine.server=vllm|sglang`, sweeper/engines/openai/server.py) on a free port of
`engine.host`, serving the trial's model with `engine.server_args` as its flags; the engine
cache restarts it exactly when a flag changes (the engine config, or the load options: prefix
caching, and under continuous batching max_num_seqs = batch_size x num_samples), and reuses it
otherwise.

Requests (sweeper/engines/openai/client.py): each one a streamed `POST /v1/chat/completions`;
the server renders the chat with the model's template and processes the images itself.
- `generate`: a static batch, every request's body made first (the batch's preprocessing, as
  engine=vllm renders a whole batch before handing it over: in each one's preprocess_s), then
  all sent at once; the clock of each starts as they are sent.
- `run` under continuous batching: every request sent as it comes, the server schedules them
  (at most its max_num_seqs at once); batch_size 1 (the calibration's reference) sends one at a
  time.
- `prepare`: a request's body made (images encoded as data URLs, JSON): the open loads call it
  ahead of the request's send time, as `vllm bench serve` makes its requests before it starts.
- `submit`: one request, from any thread, its clock started once its body is made: TTFT runs
  from the POST, as bench's does, and the encoding is in `preprocess_s`.

Measured on the client: ttft_s, latency_s, tpot_s, itl_s, preprocess_s (image decode + the
request's encoding), and the server's `usage` counts (prompt, output, cached prompt tokens).
`prefill_s` and `queue_s` are nan per request: a client cannot see them. From a vLLM server's
own `/metrics`, differenced over the measured run (`own_metrics`): the means of its per-request
prefill and queue histograms stand in for them, beside `vllm_ttft_s`, the prefix-cache hit rate
and its token counters. The histograms count every request the server finished meanwhile, other
clients' too.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, as_completed
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from sweeper.engines.base import Engine, OnDone
from sweeper.engines.openai.client import EncodedRequest, Sent, StreamingClient, chat_body
from sweeper.engines.openai.config import OpenAIEngineConfig, Server, root_url
from sweeper.engines.openai.server import (
    ServerSpec,
    StartedServer,
    auth_headers,
    probe,
    server_defaults,
)
from sweeper.engines.toolkit.chat import ChatPrompts
from sweeper.engines.toolkit.devices import resolve_device, resolve_dtype
from sweeper.engines.toolkit.prometheus import (
    FINISHED_REQUESTS,
    scrape,
    vllm_own_metrics,
    vllm_server_means,
)
from sweeper.requests import Completion, DecodingParams, Request, ServingParams

# How long own_metrics waits for the server's counters to count the run's last requests: vLLM
# records a request's stats just after it has sent its last chunk.
_METRICS_SETTLE_S = 10.0


class OpenAIEngine(Engine):
    def __init__(
        self,
        engine_cfg: OpenAIEngineConfig,
        chat: ChatPrompts,
        *,
        prefix_caching: bool | None = None,
        max_num_seqs: int | None = None,
    ):
        self.chat = chat
        self.server: StartedServer | None = None
        self.client: StreamingClient | None = None
        self.kind = "external" if engine_cfg.server is None else str(engine_cfg.server)
        if engine_cfg.server is None:
            # sweeper's own process tree: the client (the trial's memory tracker covers it).
            self.device = "cpu"
            self.memory_note = "not measured: a running server (peak_mem_gb is sweeper's own)"
            root = root_url(engine_cfg.base_url)
        else:
            self.device = resolve_device("auto")  # the server runs on this machine
            self.memory_note = "the server's process tree: a child of sweeper, in peak_mem_gb"
            self.server = self._start(engine_cfg, prefix_caching, max_num_seqs)
            root = self.server.url
        # Closed at exit if still cached, so that no server outlives sweeper (Ctrl-C, SIGTERM).
        atexit.register(self.close)
        try:
            found = probe(root, engine_cfg.api_key_env)
            if not (engine_cfg.served_model_name or found.models):
                raise RuntimeError(f"{root}/v1/models lists no model to send requests to")
            self.model = engine_cfg.served_model_name or found.models[0]
            self.version = found.version
            self.vllm = found.vllm
            self.client = StreamingClient(
                root,
                auth_headers(engine_cfg.api_key_env),
                engine_cfg.max_connections,
                engine_cfg.request_timeout_s,
            )
        except BaseException:
            self.close()
            raise
        self.root = root
        self._resets = self._cache_endpoints()
        self.cache_reset = (
            f"POST {', '.join(self._resets)} before each measured run"
            if self._resets
            else "not reset: no cache endpoint known for this server"
        )

    def _cache_endpoints(self) -> list[str]:
        """Where the server's caches are reset: a vLLM's prefix and processed-image caches
        (dev mode), SGLang's radix cache (its documented /flush_cache; not run here, where
        SGLang cannot be installed beside vLLM)."""
        if self.vllm:
            return ["/reset_prefix_cache", "/reset_mm_cache"]
        return ["/flush_cache"] if self.kind == Server.sglang else []

    def _start(
        self, cfg: OpenAIEngineConfig, prefix_caching: bool | None, max_num_seqs: int | None
    ) -> StartedServer:
        server = Server(cfg.server)
        info = self.chat.info
        template = None
        if self.chat.template_source in ("model.chat_template", "adapter"):
            # The checkpoint does not hold the template sweeper renders with: the server gets it.
            template = Path(tempfile.mkdtemp(prefix="sweeper-template-")) / "chat_template.jinja"
            template.write_text(self.chat.template)
        spec = ServerSpec(
            server=server,
            model_path=info.path,
            served_model_name=cfg.served_model_name or Path(info.path).name,
            host=cfg.host,
            dtype=str(resolve_dtype(cfg.dtype, self.device)).removeprefix("torch."),
            seed=cfg.seed,
            prefix_caching=bool(prefix_caching),
            max_num_seqs=max_num_seqs,
            args={
                **server_defaults(server, self.device, info.takes_images, info.path),
                **cfg.server_args,
            },
            chat_template=template,
            api_key_env=cfg.api_key_env,
        )
        try:
            return StartedServer(spec, cfg.startup_timeout_s)
        except BaseException:
            self._remove_template(spec)
            raise

    @staticmethod
    def _remove_template(spec: ServerSpec) -> None:
        if spec.chat_template is not None:
            shutil.rmtree(spec.chat_template.parent, ignore_errors=True)

    def synchronize(self) -> None:
        """Nothing to wait for: a chunk's time is when it arrived here."""

    def tags(self) -> dict[str, str]:
        tags = {
            "openai_base_url": self.root,  # the config refuses credentials in it
            "openai_server": self.kind,
            "openai_server_version": self.version or "unknown (no /version)",
            "openai_model": self.model,
            "openai_memory": self.memory_note,
            "openai_token_ids": (
                "returned by the server (vLLM's return_token_ids)"
                if self.vllm
                else "not returned: token_ids are empty (the server is not a vLLM)"
            ),
            "openai_cache_reset": self.cache_reset,
            "openai_server_metrics": (
                "vLLM /metrics: prefill_s and queue_s are its histograms' means"
                if self.vllm
                else "none: prefill_s, queue_s and context_load_s not measured"
            ),
        }
        if self.server is not None:
            tags["openai_server_command"] = " ".join(self.server.command[1:])
            tags["openai_server_log"] = str(self.server.log)
        return tags

    def artifacts(self) -> dict[str, Path]:
        return {} if self.server is None else {"server.log": self.server.log}

    def _scrape(self) -> dict[str, float]:
        assert self.client is not None
        answer = self.client.call(self.client.get("/metrics"))
        answer.raise_for_status()
        return scrape(answer.text)[0]

    @contextmanager
    def own_metrics(self) -> Iterator[dict[str, float]]:
        metrics: dict[str, float] = {}
        if not self.vllm:
            yield metrics
            return
        assert self.client is not None
        before, answered = self._scrape(), self.client.answered
        yield metrics
        deadline = time.monotonic() + _METRICS_SETTLE_S
        while True:
            after = self._scrape()
            finished = after.get(FINISHED_REQUESTS, 0) - before.get(FINISHED_REQUESTS, 0)
            if finished >= self.client.answered - answered or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        metrics.update(vllm_own_metrics(before, after))
        metrics.update(vllm_server_means(before, after))

    def reset_prefix_cache(self) -> None:
        """A vLLM's caches (prefixes, processed images) through its dev-mode endpoints, as
        engine=vllm resets both (sweeper's own server runs in dev mode); a running server
        without them keeps its caches warm, which the `openai_cache_reset` tag says."""
        assert self.client is not None
        for path in list(self._resets):
            answer = self.client.call(self.client.post(path))
            if answer.status == 404:
                self._resets.remove(path)
                self.cache_reset = (
                    f"not reset: {self.root}{path} not found (a vLLM has it in dev mode: "
                    "VLLM_SERVER_DEV_MODE=1)"
                )
            else:
                answer.raise_for_status()

    def prepare(self, request: Request, decoding: DecodingParams) -> EncodedRequest:
        """The request with its JSON body made: images encoded (43 ms for a 640x640 image on the
        2-core box), which must not hold up a schedule's send times."""
        if isinstance(request, EncodedRequest) and request.decoding == decoding:
            return request
        start = time.perf_counter()
        body = json.dumps(chat_body(request, decoding, self.model, vllm_extras=self.vllm))
        return EncodedRequest(
            request.id,
            request.messages,
            request.images,
            request.prepare_s,
            body=body.encode(),
            decoding=decoding,
            encode_s=time.perf_counter() - start,
        )

    def submit(
        self, request: Request, decoding: DecodingParams, serving: ServingParams
    ) -> Future[Completion]:
        """The request sent now, its clock started once its body is made (ahead, by the open
        loads): TTFT runs from the POST, as bench's does."""
        assert self.client is not None
        encoded = self.prepare(request, decoding)
        preprocess_s = encoded.prepare_s + encoded.encode_s
        sent = Sent(encoded, encoded.body, time.perf_counter(), preprocess_s)
        return self.client.start(self.client.answer(sent))

    def generate(
        self, requests: list[Request], decoding: DecodingParams, serving: ServingParams
    ) -> list[Completion]:
        assert self.client is not None
        start = time.perf_counter()
        encoded = [self.prepare(request, decoding) for request in requests]
        sent = time.perf_counter()
        # Every request waited for the whole batch's bodies (its preprocess_s); their clocks
        # start as they are sent together, as under the open loads, where bodies are made ahead.
        batch = [Sent(e, e.body, sent, e.prepare_s + sent - start) for e in encoded]
        return self.client.call(self.client.answer_together(batch))

    def run_continuous(
        self,
        requests: Iterable[Request],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None,
    ) -> list[Completion]:
        if serving.batch_size == 1:
            return super().run(requests, decoding, replace(serving, continuous_batching=False))
        futures: list[Future[Completion]] = []
        try:
            for request in requests:  # sent as they come; the server schedules them
                futures.append(self.submit(request, decoding, serving))
            for future in as_completed(futures):
                future.result()  # the first failure ends the run
                if on_done is not None:
                    on_done(1)
        except BaseException:
            for future in futures:  # their streams closed: the server aborts them
                future.cancel()
            raise
        return [future.result() for future in futures]

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None and not self.server.stopped:
            self.server.stop()
            self._remove_template(self.server.spec)
