"""HF transformers engine: `model.generate` on static, left-padded batches, or transformers' own
continuous batching; the serving flags apply per call, so trials that differ only in them (and in
decoding) share the loaded model.

- `kv_cache`: `dynamic` (DynamicCache), `static` (StaticCache; with `engine.compile` the decoding
  step is torch.compile'd - the compiled graphs live on the model and are reused by every later
  trial of this engine), `offloaded` (DynamicCache that keeps layers on the CPU between uses),
  `quantized` (QuantizedCache, 4-bit, optimum-quanto backend), `off` (`use_cache=False`: every
  step re-runs the whole sequence).
- `prefix_caching`: see sweeper/engines/hf_prefix.py.
- `continuous_batching`: `ContinuousBatchingManager` (paged attention, requests join and leave
  the running batch step by step). It takes token ids only - no pixel values, no M-RoPE
  positions - so with images it would answer without seeing them: it is refused unless
  `workload.images=false`.
- `engine.decode_loop`: `generate` (transformers' loop) or `graphed` (sweeper/engines/
  hf_graphed.py: the prompt once, then one compiled step of fixed shapes replayed per token,
  without `generate`'s Python work per token; greedy answers are `generate`'s token for token).
  `graphed` needs kv_cache=static and engine.compile=true; it decodes greedily or by sampling,
  one or num_samples sequences per request, without beam search, prefix caching or continuous
  batching.
- `engine.fuse_projections`: sweeper/engines/hf_fused.py (Qwen2.5-VL's q/k/v and gate/up
  projections each as one linear); it changes the model, so it works with either decode loop.
- `engine.attn_implementation=sdpa_gqa`: sweeper/engines/hf_attention.py (SDPA sharing the KV
  heads inside the kernel, not copying them per query head); any decode loop.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Cache,
    CompileConfig,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from sweeper.config import KV_CACHE_MODES, ConfigError
from sweeper.data.base import LoadedSample
from sweeper.engines.base import Completion, DecodingParams, Engine
from sweeper.engines.hf_attention import SDPA_GQA, register_sdpa_gqa
from sweeper.engines.hf_fused import fuse_projections
from sweeper.engines.hf_graphed import DecodeRun, GraphedDecoder
from sweeper.engines.hf_prefix import (
    BatchLayout,
    Entry,
    PrefixStore,
    Row,
    batch_cache,
    block_hashes,
    image_digest,
    image_spans,
    shared_prefix,
)
from sweeper.metrics.performance import RequestTiming, tpot
from sweeper.models import has_weights
from sweeper.workloads import has_image, request_messages

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CB_PAGE_TOKENS = 16  # small pages: prefix sharing in continuous batching matches whole pages
_CB_PREFIX_MATCH = re.compile(r"Found a prefix match of (\d+) tokens for request (\S+)")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def static_cache_length(tokens: int) -> int:
    """A static cache for `tokens` (prompt + new tokens), sized to a power of two: prompts of
    varying length then share one cache shape, and a compiled decoding step is not recompiled
    for every new length."""
    return 1 << (tokens - 1).bit_length()


def quanto_installed() -> bool:
    """Whether kv_cache=quantized has its backend (transformers' QuantizedCache uses quanto)."""
    return importlib.util.find_spec("optimum") is not None and (
        importlib.util.find_spec("optimum.quanto") is not None
    )


class _PrefillClock(LogitsProcessor):
    """Reads the clock when the first generated token's logits exist (end of prefill)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.prefill_done: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if self.prefill_done is None:
            self.prefill_done = self.engine.now()
        return scores


class _TokenClock(StoppingCriteria):
    """Reads the clock after every decoding step, once the new tokens exist; never stops."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.step_times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
        self.step_times.append(self.engine.now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def _continuous_prefix_hits() -> Iterator[dict[str, int]]:
    """Prompt tokens each request of continuous batching reused from shared pages, as its cache
    reports them (a debug log line is the only place transformers 5.19 tells it)."""
    hits: dict[str, int] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = _CB_PREFIX_MATCH.search(record.getMessage())
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


class HFEngine(Engine):
    name = "hf"
    supported_flags: ClassVar[dict[str, tuple]] = {
        "prefix_caching": (False, True),
        "continuous_batching": (False, True),
        "kv_cache": KV_CACHE_MODES,
    }

    @classmethod
    def check_supported(cls, trial: Any) -> None:
        """The flags' values, then the combinations this engine cannot run (before loading)."""
        super().check_supported(trial)
        kv_cache, images = trial.kv_cache, trial.workload.images
        refusals = [
            (
                kv_cache == "quantized" and not quanto_installed(),
                "kv_cache",
                kv_cache,
                "dynamic, static, offloaded, off with engine=hf; quantized needs the "
                "optimum-quanto package (pip install optimum-quanto)",
            ),
            (
                kv_cache == "offloaded" and resolve_device(trial.engine.device) == "cpu",
                "kv_cache",
                kv_cache,
                "dynamic, static, quantized, off on a CPU (offloaded keeps a GPU's KV cache in "
                "CPU memory)",
            ),
            (
                trial.engine.compile and kv_cache != "static",
                "engine.compile",
                trial.engine.compile,
                "false unless kv_cache=static (torch.compile needs the static cache's shapes)",
            ),
            (
                trial.prefix_caching
                and not trial.continuous_batching
                and kv_cache not in ("dynamic", "static", "offloaded"),
                "kv_cache",
                kv_cache,
                "dynamic, static or offloaded with prefix_caching=true (the engine fills the "
                "batch's cache with stored KV, then reads the answered requests' KV back)",
            ),
            (
                trial.continuous_batching and images,
                "continuous_batching",
                trial.continuous_batching,
                "false with images: transformers' continuous batching takes token ids only and "
                "would answer without the image (workload.images=false sends text-only prompts)",
            ),
            (
                trial.continuous_batching and trial.beam_num > 1,
                "beam_num",
                trial.beam_num,
                "1 with continuous_batching=true (transformers' has no beam search)",
            ),
            (
                trial.continuous_batching and kv_cache != "dynamic",
                "kv_cache",
                kv_cache,
                "dynamic with continuous_batching=true (it runs on its own paged cache)",
            ),
            (
                trial.continuous_batching and trial.engine.attn_implementation == SDPA_GQA,
                "engine.attn_implementation",
                trial.engine.attn_implementation,
                "sdpa or eager with continuous_batching=true (it swaps in its own paged attention)",
            ),
        ]
        if trial.engine.decode_loop == "graphed":
            refusals = [
                (
                    kv_cache != "static",
                    "kv_cache",
                    kv_cache,
                    "static with engine.decode_loop=graphed (its compiled step runs on the "
                    "static cache)",
                ),
                (
                    trial.beam_num > 1,
                    "beam_num",
                    trial.beam_num,
                    "1 with engine.decode_loop=graphed (greedy or sampling, no beam search)",
                ),
                (
                    trial.prefix_caching,
                    "prefix_caching",
                    trial.prefix_caching,
                    "false with engine.decode_loop=graphed",
                ),
                (
                    trial.continuous_batching,
                    "continuous_batching",
                    trial.continuous_batching,
                    "false with engine.decode_loop=graphed (it decodes static batches)",
                ),
                *refusals,
            ]
        for refused, key, value, allowed in refusals:
            if refused:
                raise ConfigError(key, value, allowed)

    def __init__(self, engine_cfg: Any, model_path: str):
        self.device = resolve_device(engine_cfg.device)
        dtype = resolve_dtype(engine_cfg.dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        attention = engine_cfg.attn_implementation
        if attention == SDPA_GQA:
            register_sdpa_gqa()
        if has_weights(model_path):
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=dtype, attn_implementation=attention
            ).to(self.device)
        else:  # an architecture-only folder: random weights, initialised on the device itself
            config = AutoConfig.from_pretrained(model_path)
            with torch.device(self.device):
                self.model = AutoModelForImageTextToText.from_config(
                    config, dtype=dtype, attn_implementation=attention
                )
            # from_config derives one from the model config; the folder's own (EOS list) wins.
            self.model.generation_config = GenerationConfig.from_pretrained(model_path)
        self.model.eval()
        if engine_cfg.fuse_projections:  # before compilation: the compiled step is the fused one
            fuse_projections(self.model)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.image_token_id = self.model.config.image_token_id
        self.text_config = self.model.config.get_text_config(decoder=True)
        self.prefix_store = PrefixStore(engine_cfg.prefix_cache_tokens)
        self._continuous: tuple[Any, Any] | None = None  # (its sizes, the running manager)
        self.compile_config: CompileConfig | None = None
        if engine_cfg.compile:
            # One config object for the engine's life: `get_compiled_call` recompiles whenever
            # the config differs from the last one, and reuses the compiled call otherwise.
            # CUDA graphs ("reduce-overhead") are what removes the launch overhead on a GPU.
            mode = "reduce-overhead" if self.device.startswith("cuda") else "default"
            self.compile_config = CompileConfig(mode=mode)
            self.compile_config._compile_all_devices = True  # transformers compiles on GPU only
        self.graphed: GraphedDecoder | None = None
        if engine_cfg.decode_loop == "graphed":  # engine.compile=true: the config checks it
            self.graphed = GraphedDecoder(self.model, self.compile_config.mode, self.now)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reset_prefix_cache(self) -> None:
        self.prefix_store.clear()
        self._stop_continuous()  # its shared pages are a prefix cache too

    def _cache_kwargs(
        self, kv_cache: str, own_cache: bool = False, length: int | None = None
    ) -> dict[str, Any]:
        """`generate` arguments for the cache mode; `own_cache`: the caller passes the cache
        (prefix caching), so only how to run it is said, not which to make; `length`: the
        tokens the cache must hold (prompt + new tokens)."""
        if kv_cache == "off":
            return {"use_cache": False}
        kwargs: dict[str, Any] = {}
        if kv_cache == "static":
            # Without a compile config transformers would compile a static cache's step on a GPU
            # on its own: engine.compile=false means no compilation anywhere.
            compiled = self.compile_config is not None
            kwargs = (
                {"compile_config": self.compile_config} if compiled else {"disable_compile": True}
            )
        if kv_cache != "dynamic" and not own_cache:
            kwargs["cache_implementation"] = kv_cache
        if kv_cache == "static" and not own_cache and length is not None:
            kwargs["max_cache_len"] = static_cache_length(length)
        if kv_cache == "quantized" and not own_cache:
            kwargs["cache_config"] = {"backend": "quanto", "nbits": 4}
        return kwargs

    def _generate_kwargs(self, decoding: DecodingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "num_beams": decoding.beam_num,
            "num_return_sequences": decoding.num_samples,
            "do_sample": not decoding.greedy,
            "pad_token_id": self.pad_id,
        }
        if decoding.ignore_eos:  # EOS is masked until max_new_tokens: a fixed output length
            kwargs["min_new_tokens"] = decoding.max_new_tokens
        if decoding.greedy:
            # Unset the sampling knobs a checkpoint's generation_config may carry.
            kwargs.update(temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(
                temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p
            )
        return kwargs

    def _generation_config(self, decoding: DecodingParams) -> GenerationConfig:
        """What `generate` decodes with: the checkpoint's generation_config under the trial's
        arguments."""
        config = copy.deepcopy(self.model.generation_config)
        config.update(**self._generate_kwargs(decoding))
        return config

    def _output_length(self, tokens: list[int]) -> int:
        """Generated tokens up to and including the first EOS; padding after it is not output."""
        for index, token in enumerate(tokens):
            if token in self.eos_ids:
                return index + 1
        return len(tokens)

    def _completion(
        self,
        item: LoadedSample,
        sequences: list[list[int]],
        times: list[list[float]],
        submitted: float,
        **timing: Any,
    ) -> Completion:
        """A request's completion from its sequences and the clock read after each token of
        each (`times[i][j]`: token j of sequence i exists); `timing`: the rest of its
        RequestTiming."""
        lengths = [self._output_length(seq) for seq in sequences]
        longest = max(range(len(sequences)), key=lambda i: lengths[i])
        first = min(t[0] for t in times)
        last = times[longest][lengths[longest] - 1]
        texts = self.processor.tokenizer.batch_decode(
            [seq[:length] for seq, length in zip(sequences, lengths, strict=True)],
            skip_special_tokens=True,
        )
        request = RequestTiming(
            ttft_s=first - submitted,
            latency_s=last - submitted,
            tpot_s=tpot(times[longest][0], last, lengths[longest]),
            output_tokens=sum(lengths),
            **timing,
        )
        return Completion(item.sample.question_id, texts, request)

    @torch.inference_mode()
    def generate_batch(
        self, batch: list[LoadedSample], decoding: DecodingParams
    ) -> list[Completion]:
        submitted = self.now()
        inputs, images = self._inputs(batch, decoding)
        ready = self.now()
        run, cached = self._decode(inputs, images, decoding)
        prefill_s = run.prefill_done - ready
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()

        completions = []
        n = decoding.num_samples
        for row, item in enumerate(batch):
            completion = self._completion(
                item,
                run.tokens[row * n : (row + 1) * n],
                [run.step_times] * n,
                submitted,
                preprocess_s=item.decode_s + (ready - submitted),
                prefill_s=prefill_s,
                prompt_tokens=int(prompt_tokens[row]),
                cached_prompt_tokens=cached[row],
            )
            completions.append(completion)
        return completions

    def _inputs(self, batch: list[LoadedSample], decoding: DecodingParams) -> tuple[Any, list]:
        """The batch's prompts as the processor's left-padded tensors on the device, and its
        images."""
        chats = [request_messages(item, decoding) for item in batch]
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        images = [item.image for item, chat in zip(batch, chats, strict=True) if has_image(chat)]
        inputs = self.processor(
            text=texts, images=images or None, padding=True, return_tensors="pt"
        ).to(self.device)
        return inputs, images

    def _decode(
        self, inputs: Any, images: list, decoding: DecodingParams
    ) -> tuple[DecodeRun, list[int]]:
        """The batch's new tokens and clock readings, by `engine.decode_loop`; each request's
        reused prompt tokens."""
        length = inputs["input_ids"].shape[1] + decoding.max_new_tokens
        if self.graphed is None:
            return self._generate(inputs, images, decoding, length)
        config = self._generation_config(decoding)
        run = self.graphed.decode(inputs, config, static_cache_length(length), decoding.seed)
        return run, [0] * inputs["input_ids"].shape[0]

    def _generate(
        self, inputs: Any, images: list, decoding: DecodingParams, length: int
    ) -> tuple[DecodeRun, list[int]]:
        """`model.generate` (on the cached prefixes with prefix caching), timed by its clocks;
        each request's reused prompt tokens. `length`: prompt + new tokens."""
        prefill_clock, token_clock = _PrefillClock(self), _TokenClock(self)
        clocks = {
            "logits_processor": LogitsProcessorList([prefill_clock]),
            "stopping_criteria": StoppingCriteriaList([token_clock]),
        }
        if decoding.prefix_caching:
            output, prompt_len, cached = self._generate_cached(inputs, images, decoding, clocks)
        else:
            output = self.model.generate(
                **inputs,
                **self._generate_kwargs(decoding),
                **self._cache_kwargs(decoding.kv_cache, length=length),
                **clocks,
            )
            prompt_len, cached = inputs["input_ids"].shape[1], [0] * inputs["input_ids"].shape[0]
        tokens = output[:, prompt_len:].tolist()
        return DecodeRun(tokens, prefill_clock.prefill_done, token_clock.step_times), cached

    # ---- prefix caching -------------------------------------------------------------------

    def _rows(self, inputs: Any, images: list) -> list[Row]:
        """Each request's unpadded prompt, with its images' token spans, and its best match."""
        patches = (
            inputs["image_grid_thw"].prod(dim=1).tolist() if "image_grid_thw" in inputs else []
        )
        pictures = iter(zip([image_digest(image) for image in images], patches, strict=True))
        rows = []
        for ids, mask, types in zip(
            inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], strict=True
        ):
            keep = mask.bool()
            tokens = ids[keep].tolist()
            spans = image_spans(tokens, self.image_token_id, pictures)
            row = Row(tokens, types[keep].tolist(), spans, block_hashes(tokens, spans))
            row.entry, matched = self.prefix_store.match(row.hashes)
            row.cached = row.usable(matched)
            rows.append(row)
        return rows

    def _prefill_text(self, tokens: list[int]) -> Entry:
        """The KV of a text-only prefix (before any image, so plain 1-D positions)."""
        cache = DynamicCache(config=self.text_config)
        ids = torch.tensor([tokens], device=self.device)
        positions = torch.arange(len(tokens), device=self.device)[None]
        self.model(input_ids=ids, position_ids=positions, past_key_values=cache, logits_to_keep=1)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return Entry(tokens, block_hashes(tokens, []), keys, values)

    def _share_prefix(self, rows: list[Row]) -> None:
        """Compute once the text prefix every row starts with, if the store lacks it."""
        length = shared_prefix(rows)
        short = [row for row in rows if row.cached < length]
        if not short:
            return
        entry = self._prefill_text(rows[0].tokens[:length])
        self.prefix_store.add(entry)
        short[0].paid = True  # computed for it; the rest of the batch reuses it
        for row in short:
            row.entry, row.cached = entry, length

    def _vision_inputs(self, inputs: Any, rows: list[Row]) -> dict[str, Any]:
        """Pixel values (and grids) of the images whose tokens are not in the cache."""
        if "pixel_values" not in inputs:
            return {}
        spans = [s for row in rows for s in row.spans]
        wanted = [s.start >= row.cached for row in rows for s in row.spans]
        if not any(wanted):
            return {}
        pixels = torch.split(inputs["pixel_values"], [s.patches for s in spans])
        keep = [index for index, flag in enumerate(wanted) if flag]
        return {
            "pixel_values": torch.cat([pixels[i] for i in keep]),
            "image_grid_thw": inputs["image_grid_thw"][keep],
        }

    def _generate_cached(
        self, inputs: Any, images: list, decoding: DecodingParams, clocks: dict[str, Any]
    ) -> tuple[torch.Tensor, int, list[int]]:
        """`generate` on top of the cached prefixes; returns the sequences, the prompt width and
        each request's reused prompt tokens. Stores every answered request's KV."""
        rows = self._rows(inputs, images)
        self._share_prefix(rows)
        layout = BatchLayout.build(
            rows, self.pad_id, self.model, inputs.get("image_grid_thw"), self.device
        )
        width, cached_len = layout.input_ids.shape[1], layout.cached_len
        cache = DynamicCache(config=self.text_config)
        if cached_len:
            keys, values = batch_cache(rows, cached_len)
            cache = DynamicCache(zip(keys, values, strict=True), config=self.text_config)
        vision = self._vision_inputs(inputs, rows)
        # Several sequences per request (samples, beams): the prompt is run once per request,
        # up to its last token, and its KV copied to each sequence; generate runs the last one.
        expand = max(decoding.beam_num, decoding.num_samples)
        if expand > 1:
            if width - 1 > cached_len:
                self.model(
                    input_ids=layout.input_ids[:, cached_len:-1],
                    attention_mask=layout.attention_mask[:, :-1],
                    position_ids=layout.position_ids[..., cached_len:-1],
                    past_key_values=cache,
                    logits_to_keep=1,
                    **vision,
                )
                vision = {}
            cache.batch_repeat_interleave(expand)
        output = self.model.generate(
            input_ids=layout.input_ids,
            attention_mask=layout.attention_mask,
            position_ids=layout.position_ids,
            past_key_values=self._as_kind(cache, decoding, width),
            return_dict_in_generate=True,
            **vision,
            **self._generate_kwargs(decoding),
            **self._cache_kwargs(decoding.kv_cache, own_cache=True),
            **clocks,
        )
        if decoding.beam_num == 1:  # beam search reorders the cache rows: nothing to keep
            self._store_answered(rows, layout, output, expand)
        return output.sequences, width, [0 if row.paid else row.cached for row in rows]

    def _as_kind(self, cache: DynamicCache, decoding: DecodingParams, width: int) -> Cache:
        """The batch's filled DynamicCache as the kind `kv_cache` asks for."""
        if decoding.kv_cache == "dynamic":
            return cache
        filled = cache.layers[0].is_initialized
        data = [(layer.keys, layer.values) for layer in cache.layers] if filled else None
        if decoding.kv_cache == "offloaded":
            return DynamicCache(data, config=self.text_config, offloading=True)
        static = StaticCache(self.text_config, max_cache_len=width + decoding.max_new_tokens)
        for layer, (keys, values) in zip(static.layers, data or [], strict=False):
            layer.update(keys, values)
        return static

    def _take(self, states: torch.Tensor, row: int, columns: torch.Tensor) -> torch.Tensor:
        """A copy of one row's states at `columns`, on the engine's device (an offloaded
        cache may have left the layer in CPU memory)."""
        return states[row : row + 1, :, columns.to(states.device)].to(self.device)

    def _store_answered(self, rows: list[Row], layout: BatchLayout, output: Any, expand: int):
        """Keep each request's prompt and answer KV (its first sequence): a conversation's next
        turn starts with exactly these tokens."""
        width = layout.input_ids.shape[1]
        steps = output.sequences.shape[1] - width
        layers = output.past_key_values.layers
        for index, row in enumerate(rows):
            sequence = index * expand
            generated = output.sequences[sequence, width:].tolist()
            fed = min(self._output_length(generated), steps - 1)  # the last one never ran
            columns = torch.cat(
                [
                    layout.attention_mask[index].nonzero().squeeze(1),
                    torch.arange(width, width + fed, device=self.device),
                ]
            )
            tokens = row.tokens + generated[:fed]
            keys = [self._take(layer.keys, sequence, columns) for layer in layers]
            values = [self._take(layer.values, sequence, columns) for layer in layers]
            self.prefix_store.add(Entry(tokens, block_hashes(tokens, row.spans), keys, values))

    # ---- continuous batching --------------------------------------------------------------

    def run(
        self,
        samples: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        if not decoding.continuous_batching:
            self._stop_continuous()  # gives generate back the model's own attention
            return super().run(samples, decoding, batch_size, on_batch)
        return self._run_continuous(list(samples), decoding, batch_size, on_batch)

    def _continuous_manager(self, prompt_len: int, decoding: DecodingParams, batch_size: int):
        """A running manager for at most `batch_size` requests (of `num_samples` sequences each)
        at a time, with a paged cache that holds them. Kept across calls: stopping one waits
        ~0.5 s for its loop thread, which every measured run would count. Prompt lengths are
        rounded up to a power of two so that similar calls share it."""
        prompt_len = 1 << (prompt_len - 1).bit_length()
        pages = math.ceil((prompt_len + decoding.max_new_tokens) / _CB_PAGE_TOKENS)
        n = decoding.num_samples
        # Sized explicitly: left to infer them, transformers sizes the cache from free memory,
        # which on a CPU means most of the RAM and a minute of allocation.
        config = ContinuousBatchingConfig(
            page_size=_CB_PAGE_TOKENS,
            num_blocks=pages * batch_size * n + pages,
            max_batch_tokens=prompt_len * batch_size,
            max_requests_per_batch=batch_size * n,
            allow_block_sharing=decoding.prefix_caching,
            seed=decoding.seed,
        )
        kwargs = self._generate_kwargs(decoding)
        key = (repr(config), sorted(kwargs.items()))
        if self._continuous is not None and self._continuous[0] == key:
            return self._continuous[1]
        self._stop_continuous()
        manager = self.model.init_continuous_batching(
            generation_config=GenerationConfig(**kwargs, eos_token_id=sorted(self.eos_ids)),
            continuous_batching_config=config,
        )
        # Started from a daemon thread, so that its loop thread is a daemon too (threads inherit
        # it): a manager still kept when the process ends must not hold the interpreter open.
        starter = threading.Thread(target=manager.start, daemon=True)
        starter.start()
        starter.join()
        self._continuous = (key, manager)
        return manager

    def _stop_continuous(self) -> None:
        """Stop the kept manager, which also gives the model back the attention implementation
        that continuous batching swaps for its paged one while it runs."""
        if self._continuous is not None:
            manager = self._continuous[1]
            self._continuous = None
            manager.destroy()  # stops (and joins) its loop thread first

    def _continuous_answers(
        self,
        manager: Any,
        prompts: list[list[int]],
        decoding: DecodingParams,
        on_batch: Callable[[int], None] | None,
    ) -> tuple[list[str], dict[str, Any], dict[str, int]]:
        """Submit every prompt at once and wait for all their sequences: the request ids, the
        finished outputs by id (children `<id>__child#<i>`), and the reused prompt tokens."""
        n = decoding.num_samples
        results: dict[str, Any] = {}
        with _continuous_prefix_hits() as hits:
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
                if parents[parent] == n and on_batch is not None:
                    on_batch(1)
        return ids, results, hits

    @torch.inference_mode()
    def _run_continuous(
        self,
        items: list[LoadedSample],
        decoding: DecodingParams,
        batch_size: int,
        on_batch: Callable[[int], None] | None,
    ) -> list[Completion]:
        """All requests submitted at once to transformers' continuous batching, at most
        `batch_size` of them running at a time; each is answered as soon as it is done."""
        if not items:
            return []
        submitted = self.now()
        prompts, preprocess = [], []
        for item in items:
            start = time.perf_counter()
            text = self.processor.apply_chat_template(
                request_messages(item, decoding), add_generation_prompt=True
            )
            prompts.append(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            preprocess.append(item.decode_s + time.perf_counter() - start)
        n = decoding.num_samples
        manager = self._continuous_manager(max(len(p) for p in prompts), decoding, batch_size)
        ids, results, hits = self._continuous_answers(manager, prompts, decoding, on_batch)

        completions = []
        for item, request_id, prompt, prep in zip(items, ids, prompts, preprocess, strict=True):
            outputs = [results[request_id]] + [
                results[f"{request_id}__child#{i}"] for i in range(n - 1)
            ]
            # Prefill: from the step that took the request in to its first token.
            started = min(o.lifespan[0] for o in outputs)
            first = min(o.timestamps[0] for o in outputs)
            completion = self._completion(
                item,
                [o.generated_tokens for o in outputs],
                [o.timestamps for o in outputs],
                submitted,
                preprocess_s=prep,
                prefill_s=first - started,
                prompt_tokens=len(prompt),
                cached_prompt_tokens=hits.get(request_id, 0),
            )
            completions.append(completion)
        return completions

    def close(self) -> None:
        self._stop_continuous()
        self.graphed = None  # its buffers and compiled step hold the model
        del self.model
        self.prefix_store.clear()
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
