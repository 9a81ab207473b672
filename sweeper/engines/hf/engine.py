"""HF transformers engine: `model.generate` on static, left-padded batches, or transformers' own
continuous batching; the serving flags apply per call, so trials that differ only in them (and in
decoding) share the loaded model. Any model transformers generates with: the class comes from
the model's config (`ModelInfo.auto_class`), the prompt from `ChatPrompts`.

- `kv_cache`: `dynamic` (DynamicCache), `static` (StaticCache; with `engine.compile` the decoding
  step is torch.compile'd - the compiled graphs live on the model and are reused by every later
  trial of this engine), `offloaded` (DynamicCache that keeps layers on the CPU between uses),
  `quantized` (QuantizedCache, 4-bit, optimum-quanto backend), `off` (`use_cache=False`: every
  step re-runs the whole sequence).
- `continuous_batching`: sweeper/engines/hf/continuous.py (text prompts only).
- `prefix_caching`, `engine.decode_loop=graphed`, `engine.fuse_projections`,
  `engine.attn_implementation=sdpa_gqa`: sweeper/engines/hf/accel/, each on the architectures it
  declares (the config refuses the others before anything loads).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import torch
from transformers import (
    AutoConfig,
    CompileConfig,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from sweeper.engines.base import Engine, OnDone
from sweeper.engines.hf.accel.attention import register_sdpa_gqa
from sweeper.engines.hf.accel.fused import fuse_projections
from sweeper.engines.hf.accel.graphed import DecodeRun, GraphedDecoder
from sweeper.engines.hf.accel.prefix import PrefixCaching
from sweeper.engines.hf.config import Attention, DecodeLoop, HFEngineConfig
from sweeper.engines.hf.continuous import Answer, ContinuousBatching
from sweeper.engines.hf.generation import (
    PrefillClock,
    TokenClock,
    cache_kwargs,
    generate_kwargs,
    generation_config,
    static_cache_length,
)
from sweeper.engines.toolkit.chat import ChatPrompts
from sweeper.engines.toolkit.devices import resolve_device, resolve_dtype
from sweeper.engines.toolkit.timing import Marks, output_length, request_timing
from sweeper.models import has_weights
from sweeper.requests import Completion, DecodingParams, Request, ServingParams

# Processor outputs that are not model inputs (PaliGemma's processor adds training labels).
_NOT_INPUTS = ("labels",)


class HFEngine(Engine):
    def __init__(self, engine_cfg: HFEngineConfig, chat: ChatPrompts):
        self.device = resolve_device(engine_cfg.device)
        self.chat = chat
        info = chat.info
        dtype = resolve_dtype(engine_cfg.dtype, self.device)
        attention = str(engine_cfg.attn_implementation)
        if engine_cfg.attn_implementation == Attention.sdpa_gqa:
            register_sdpa_gqa()
        if has_weights(info.path):
            self.model = info.auto_class.from_pretrained(
                info.path, dtype=dtype, attn_implementation=attention
            ).to(self.device)
        else:  # an architecture-only folder: random weights, initialised on the device itself
            config = AutoConfig.from_pretrained(info.path)
            with torch.device(self.device):
                self.model = info.auto_class.from_config(
                    config, dtype=dtype, attn_implementation=attention
                )
            # from_config derives one from the model config; the folder's own (EOS list) wins.
            self.model.generation_config = GenerationConfig.from_pretrained(info.path)
        self.model.eval()
        if engine_cfg.fuse_projections:  # before compilation: the compiled step is the fused one
            fuse_projections(self.model)
        eos = self.model.generation_config.eos_token_id
        eos = chat.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = chat.pad_token_id
        self.prefix_cache_tokens = engine_cfg.prefix_cache_tokens
        self._prefix: PrefixCaching | None = None  # built by the first prefix-caching call
        self.continuous = ContinuousBatching(self.model, self.pad_id, self.eos_ids)
        self.compile_config: CompileConfig | None = None
        if engine_cfg.compile:
            # One config object for the engine's life: `get_compiled_call` recompiles whenever
            # the config differs from the last one, and reuses the compiled call otherwise.
            # CUDA graphs ("reduce-overhead") are what removes the launch overhead on a GPU.
            mode = "reduce-overhead" if self.device.startswith("cuda") else "default"
            self.compile_config = CompileConfig(mode=mode)
            self.compile_config._compile_all_devices = True  # transformers compiles on GPU only
        self.graphed: GraphedDecoder | None = None
        if engine_cfg.decode_loop == DecodeLoop.graphed:  # the config requires engine.compile
            self.graphed = GraphedDecoder(self.model, self.compile_config.mode, self.now)

    def tags(self) -> dict[str, str]:
        return {"hf_model_class": type(self.model).__name__}

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    @property
    def prefix(self) -> PrefixCaching:
        if self._prefix is None:
            self._prefix = PrefixCaching(
                self.model, self.pad_id, self.eos_ids, self.prefix_cache_tokens
            )
        return self._prefix

    def reset_prefix_cache(self) -> None:
        if self._prefix is not None:
            self._prefix.clear()
        self.continuous.stop()  # its shared pages are a prefix cache too

    def _completion(
        self,
        request: Request,
        sequences: list[list[int]],
        times: list[list[float]],
        submitted: float,
        **timing: Any,
    ) -> Completion:
        """A request's completion from its sequences and the clock read after each token of
        each (`times[i][j]`: token j of sequence i exists); `timing`: the rest of its
        RequestTiming."""
        lengths = [output_length(sequence, self.eos_ids) for sequence in sequences]
        longest = max(range(len(sequences)), key=lengths.__getitem__)
        kept = [sequence[:length] for sequence, length in zip(sequences, lengths, strict=True)]
        marks = Marks(
            submitted=submitted,
            first_token=min(t[0] for t in times),
            last_token=times[longest][lengths[longest] - 1],
            tokens=lengths[longest],
            longest_first_token=times[longest][0],
        )
        return Completion(
            request.id,
            self.chat.decode(kept),
            kept,
            request_timing(marks, output_tokens=sum(lengths), **timing),
        )

    @torch.inference_mode()
    def generate(
        self, requests: list[Request], decoding: DecodingParams, serving: ServingParams
    ) -> list[Completion]:
        self.continuous.stop()  # gives generate back the model's own attention
        submitted = self.now()
        inputs = self._inputs(requests)
        ready = self.now()
        images = [image for request in requests for image in request.images]
        run, cached = self._decode(inputs, images, decoding, serving)
        prefill_s = run.prefill_done - ready
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()

        completions = []
        n = decoding.num_samples
        for row, request in enumerate(requests):
            completion = self._completion(
                request,
                run.tokens[row * n : (row + 1) * n],
                [run.step_times] * n,
                submitted,
                preprocess_s=request.prepare_s + (ready - submitted),
                prefill_s=prefill_s,
                prompt_tokens=int(prompt_tokens[row]),
                cached_prompt_tokens=cached[row],
            )
            completions.append(completion)
        return completions

    def _inputs(self, requests: list[Request]) -> Any:
        """The batch's prompts as left-padded tensors on the device: the processor's (images as
        one list per prompt) or, for a text-only model, the tokenizer's."""
        texts = [self.chat.text(request.messages) for request in requests]
        special = self.chat.add_special_tokens(texts[0])
        common = {"padding": True, "return_tensors": "pt", "add_special_tokens": special}
        if self.chat.processor is None:
            return self.chat.tokenizer(texts, **common).to(self.device)
        images = [request.images for request in requests]
        inputs = self.chat.processor(text=texts, images=images if any(images) else None, **common)
        for key in _NOT_INPUTS:
            inputs.pop(key, None)
        # Pixel values in the model's dtype (not every model casts them itself).
        return inputs.to(self.device, dtype=self.model.dtype)

    def _decode(
        self, inputs: Any, images: list, decoding: DecodingParams, serving: ServingParams
    ) -> tuple[DecodeRun, list[int]]:
        """The batch's new tokens and clock readings, by `engine.decode_loop`; each request's
        reused prompt tokens."""
        length = inputs["input_ids"].shape[1] + decoding.max_new_tokens
        rows = inputs["input_ids"].shape[0]
        if self.graphed is None:
            return self._generate(inputs, images, decoding, serving, length)
        config = generation_config(self.model.generation_config, decoding, self.pad_id)
        run = self.graphed.decode(inputs, config, static_cache_length(length), decoding.seed)
        return run, [0] * rows

    def _generate(
        self,
        inputs: Any,
        images: list,
        decoding: DecodingParams,
        serving: ServingParams,
        length: int,
    ) -> tuple[DecodeRun, list[int]]:
        """`model.generate` (on the cached prefixes with prefix caching), timed by its clocks;
        each request's reused prompt tokens. `length`: prompt + new tokens."""
        prefill_clock, token_clock = PrefillClock(self.now), TokenClock(self.now)
        kwargs = {
            **generate_kwargs(decoding, self.pad_id),
            "logits_processor": LogitsProcessorList([prefill_clock]),
            "stopping_criteria": StoppingCriteriaList([token_clock]),
        }
        if serving.prefix_caching:
            kwargs.update(cache_kwargs(serving.kv_cache, self.compile_config, own_cache=True))
            output, prompt_len, cached = self.prefix.generate(
                inputs, images, decoding, serving.kv_cache, kwargs
            )
        else:
            kwargs.update(cache_kwargs(serving.kv_cache, self.compile_config, length=length))
            output = self.model.generate(**inputs, **kwargs)
            prompt_len, cached = inputs["input_ids"].shape[1], [0] * inputs["input_ids"].shape[0]
        tokens = output[:, prompt_len:].tolist()
        return DecodeRun(tokens, prefill_clock.prefill_done, token_clock.step_times), cached

    def submit(
        self, request: Request, decoding: DecodingParams, serving: ServingParams
    ) -> Future[Completion]:
        """One request into transformers' running continuous batch (the config refuses open
        loads without continuous_batching=true); its times from the manager's token stamps."""
        submitted = time.perf_counter()
        prompt = self.chat.token_ids(self.chat.text(request.messages))
        preprocess_s = request.prepare_s + time.perf_counter() - submitted
        done: Future[Completion] = Future()

        def finish(answered: Future[Answer]) -> None:
            try:
                answer = answered.result()
                completion = self._continuous_completion(
                    request, answer, prompt, submitted, preprocess_s
                )
                done.set_result(completion)
            except BaseException as error:
                done.set_exception(error)

        self.continuous.submit(prompt, decoding, serving).add_done_callback(finish)
        return done

    def _continuous_completion(
        self,
        request: Request,
        answer: Answer,
        prompt: list[int],
        submitted: float,
        preprocess_s: float,
    ) -> Completion:
        completion = self._completion(
            request,
            answer.sequences,
            answer.times,
            submitted,
            preprocess_s=preprocess_s,
            queue_s=answer.started - answer.created,
            # Prefill: from the step that took the request in to its first token.
            prefill_s=min(t[0] for t in answer.times) - answer.started,
            prompt_tokens=len(prompt),
            cached_prompt_tokens=answer.cached_prompt_tokens,
        )
        first = answer.times[0]
        completion.timing.itl_s = [b - a for a, b in zip(first, first[1:], strict=False)]
        return completion

    @torch.inference_mode()
    def run_continuous(
        self,
        requests: Iterable[Request],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None,
    ) -> list[Completion]:
        """Every request submitted at once to transformers' continuous batching, at most
        `batch_size` running at a time; each is answered as soon as it is done."""
        requests = list(requests)
        if not requests:
            return []
        submitted = self.now()
        prompts, preprocess = [], []
        for request in requests:
            start = time.perf_counter()
            prompts.append(self.chat.token_ids(self.chat.text(request.messages)))
            preprocess.append(request.prepare_s + time.perf_counter() - start)
        answers = self.continuous.answer(prompts, decoding, serving, on_done)
        completions = [
            self._continuous_completion(request, answer, prompt, submitted, prep)
            for request, answer, prompt, prep in zip(
                requests, answers, prompts, preprocess, strict=True
            )
        ]
        for completion in completions:  # returned whole, as offline runs are everywhere
            completion.timing.itl_s = []
        return completions

    def close(self) -> None:
        self.continuous.stop()
        self.graphed = None  # its buffers and compiled step hold the model
        self._prefix = None
        self.continuous = None
        del self.model
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
