"""`engine.decode_loop=graphed`: engine=hf's own decoding loop, one compiled step replayed per
token in place of `model.generate`'s loop.

Why: with a static cache and `engine.compile`, `generate`'s forward is compiled, but every token
still pays `generate`'s Python around it - logits processors, stopping criteria, the growing
attention mask and model kwargs, Qwen2.5-VL's input preparation. Qwen2.5-VL-7B at batch 1 on an
H100 decodes 100 tok/s that way, where reading its weights once per token allows ~212. Here the
prompt runs once, eagerly, as in `generate`; then each token is one call of a compiled step of
fixed shapes that reads and writes only buffers kept for its shape (with CUDA graphs,
`mode="reduce-overhead"`, a replay with nothing to copy in or out).

The loop is pipelined, so that the GPU never waits for the host's work between steps (dynamo's
guards, the CUDA-graph tree's bookkeeping): the host launches step i+1, then waits for step i's
end (a CUDA event recorded after it) and reads the clock - "sync, then read the clock" for token
i as `generate`'s clock reads it, on the token's event instead of the whole device, so TTFT, TPOT
and prefill_s mean what they mean with `generate`. Whether any sequence runs on is copied with
each step into one of two pinned host flags, read after that wait; so the stop is seen one step
late, and the step launched in vain is dropped (tokens and time): the tokens and times are those
of a loop that syncs every token. prefill_done and the first token's time are read after a
device sync, as before. On the CPU (no events, synchronous) the same loop runs, its waits empty.

It decodes as `generate` does, so that greedy answers are token for token `generate`'s:
- positions: the prompt's, laid out as `generate` lays them out (`generation_position_ids`:
  `[4, rows, len]`, text positions then M-RoPE's t, h, w, in transformers 5.17 and 5.19 alike);
  each step's are the last ones + 1 on all four rows, as `generate` extends them;
- attention: a (rows, cache length) mask fixed for the whole call, the prompt's padding then
  ones: the causal mask already hides the cache slots not written yet;
- the choice: the logits processors `generate` builds from the same GenerationConfig - the
  repetition penalty, EOS masked while fewer than `min_new_tokens` tokens exist (ignore_eos),
  and, sampling, temperature, top-k and top-p - then argmax, or a draw. A generation_config
  that asks `generate` for any other processor is refused;
- a sequence ends at its EOS and emits padding after it; the loop ends when all have ended or
  at max_new_tokens.
Sampling draws from a generator seeded with the trial's seed at each call (like vLLM's
per-request seed), not from the global RNG `generate` draws from: sampled answers follow the same
distribution as `generate`'s, not the same draws. With num_samples > 1 the prompt runs once per
request and its KV is copied to each of its sequences.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel, StaticCache

from sweeper.config import ConfigError
from sweeper.engines.hf.accel.prefix_store import generation_position_ids

# GenerationConfig fields that make `generate` add a logits processor the step does not
# implement, and the values that leave it out.
_NOT_IMPLEMENTED = {
    "guidance_scale": (None, 1.0),
    "sequence_bias": (None,),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "top_h": (None,),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
}


@dataclass
class DecodeRun:
    """A batch's new tokens (sequences x steps, padding after a sequence's EOS, as in
    `generate`'s output), the clock when the first token's logits existed, and after each step."""

    tokens: list[list[int]]
    prefill_done: float
    step_times: list[float]


@dataclass
class _Buffers:
    """What the compiled step reads and writes, for one (rows, cache length). The same tensors
    at every call, so that the CUDA graphs recorded on their addresses stay valid."""

    cache: StaticCache
    attention_mask: torch.Tensor  # (rows, cache_len)
    positions: torch.Tensor  # (4, rows, 1): the positions of the token fed next
    tokens: torch.Tensor  # (rows, 1): the token fed next, the last one chosen
    generated: torch.Tensor  # (rows, cache_len): the tokens chosen so far, from column 0
    produced: torch.Tensor  # (): how many
    seen: torch.Tensor  # (rows, vocab) bool: in the prompt or generated (repetition penalty)
    running: torch.Tensor  # (rows,) bool: no EOS yet
    any_running: torch.Tensor  # ()
    running_host: torch.Tensor  # (2,) pinned: any_running after steps of even / odd index
    noise: torch.Tensor  # (rows, vocab): Exp(1) draws, the sampling's randomness
    is_eos: torch.Tensor  # (vocab,) bool
    # The call's settings, as tensors: another value recompiles nothing.
    pad: torch.Tensor
    min_new_tokens: torch.Tensor
    penalty: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor  # 0: off
    top_p: torch.Tensor


def _refuse_unimplemented(config: GenerationConfig) -> None:
    for name, neutral in _NOT_IMPLEMENTED.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise ConfigError(
                "engine.decode_loop",
                "graphed",
                f"generate with this model: its generation_config sets {name}={value!r}, "
                "which the graphed step does not implement",
            )


class GraphedDecoder:
    """Prefill, then the compiled step until every sequence has ended. Compiled once per shape
    and decoding mode (greedy, sampling), kept for the engine's life."""

    def __init__(self, model: PreTrainedModel, compile_mode: str, clock: Callable[[], float]):
        self.model = model
        self.clock = clock  # Engine.now: synchronises the device, then reads the clock
        self.device = model.device
        self.text_config = model.config.get_text_config(decoder=True)
        self.vocab = model.get_output_embeddings().out_features
        self.generator = torch.Generator(self.device)
        self.kept: dict[tuple[int, int], _Buffers] = {}
        # dynamic=False: one graph per shape, never a symbolic one; a sweep's shapes are few
        # (batch_size, 1 for calibration, a last smaller batch) and each is kept.
        self.compiled_step = torch.compile(
            self._step, mode=compile_mode, fullgraph=True, dynamic=False
        )

    @torch.inference_mode()
    def decode(
        self,
        inputs: Mapping[str, torch.Tensor],
        config: GenerationConfig,
        cache_len: int,
        seed: int,
    ) -> DecodeRun:
        """The processor's left-padded batch, decoded as `generate(**inputs)` would with
        `config`, on a static cache of `cache_len` tokens."""
        _refuse_unimplemented(config)
        greedy = not config.do_sample
        copies = config.num_return_sequences
        positions = generation_position_ids(
            self.model,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("mm_token_type_ids"),
            inputs.get("image_grid_thw"),
        )
        buffers = self._buffers(inputs["input_ids"].shape[0] * copies, cache_len)
        self._start(buffers, config, inputs, positions, copies)
        self.generator.manual_seed(seed)
        logits = self._prefill(buffers.cache, inputs, positions, copies)
        prefill_done = self.clock()
        self._draw(buffers, greedy)
        self._advance(buffers, logits, greedy)
        step_times = self._steps(buffers, greedy, config.max_new_tokens)
        # Queued after every launched step (the stream's order): waits for them, a dropped one too.
        tokens = buffers.generated[:, : len(step_times)].tolist()
        return DecodeRun(tokens, prefill_done, step_times)

    def _steps(self, buffers: _Buffers, greedy: bool, max_new_tokens: int) -> list[float]:
        """The clock after each token, the first one chosen already: step i+1 is launched before
        step i is waited for; a step launched after the one that ended every sequence is dropped.
        Token i's flag is in host slot i % 2, so step i+1's copy never overwrites it."""
        self._mark(buffers, 0)
        step_times = [self.clock()]  # the first token: a device sync, as at prefill_done
        if max_new_tokens == 1 or not buffers.running_host[0].item():
            return step_times
        marker = self._launch(buffers, greedy, 1)
        while True:
            index = len(step_times)  # the token whose step `marker` ends
            last = index + 1 == max_new_tokens
            ahead = None if last else self._launch(buffers, greedy, (index + 1) % 2)
            step_times.append(self._wait(marker))
            if last or not buffers.running_host[index % 2].item():
                return step_times  # a step launched ahead was in vain: not counted
            marker = ahead

    def _launch(self, buffers: _Buffers, greedy: bool, slot: int) -> torch.cuda.Event | None:
        """Queue one step (the next token), and its marker."""
        self._draw(buffers, greedy)
        torch.compiler.cudagraph_mark_step_begin()  # the last replay's buffers are consumed
        self.compiled_step(buffers, greedy)
        return self._mark(buffers, slot)

    def _mark(self, buffers: _Buffers, slot: int) -> torch.cuda.Event | None:
        """After a step: whether any sequence runs on, copied into host slot `slot` without a
        sync, and the marker of the step's end (None on the CPU, where work is done when queued)."""
        buffers.running_host[slot].copy_(buffers.any_running, non_blocking=True)
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _wait(self, marker: torch.cuda.Event | None) -> float:
        """The clock once the marked step (and its flag's copy) is done: on the GPU, its event's
        sync then `time.perf_counter`, the clock `Engine.now` reads after a device sync."""
        if marker is None:
            return self.clock()
        marker.synchronize()
        return time.perf_counter()

    def _buffers(self, rows: int, cache_len: int) -> _Buffers:
        key = (rows, cache_len)
        if key in self.kept:
            return self.kept[key]
        host_flags = torch.ones(2, dtype=torch.bool)
        if self.device.type == "cuda":
            host_flags = host_flags.pin_memory()
        with torch.device(self.device):
            buffers = _Buffers(
                cache=StaticCache(config=self.text_config, max_cache_len=cache_len),
                attention_mask=torch.ones(rows, cache_len, dtype=torch.long),
                positions=torch.zeros(4, rows, 1, dtype=torch.long),
                tokens=torch.zeros(rows, 1, dtype=torch.long),
                generated=torch.zeros(rows, cache_len, dtype=torch.long),
                produced=torch.zeros((), dtype=torch.long),
                seen=torch.zeros(rows, self.vocab, dtype=torch.bool),
                running=torch.ones(rows, dtype=torch.bool),
                any_running=torch.ones((), dtype=torch.bool),
                running_host=host_flags,
                noise=torch.ones(rows, self.vocab),
                is_eos=torch.zeros(self.vocab, dtype=torch.bool),
                pad=torch.zeros((), dtype=torch.long),
                min_new_tokens=torch.zeros((), dtype=torch.long),
                penalty=torch.ones(()),
                temperature=torch.ones(()),
                top_k=torch.zeros((), dtype=torch.long),
                top_p=torch.ones(()),
            )
        for tensor in vars(buffers).values():
            if isinstance(tensor, torch.Tensor) and tensor.device == self.device:
                # Fixed addresses: CUDA graphs read and write them in place, never copy them.
                torch._dynamo.mark_static_address(tensor, guard=False)
        self.kept[key] = buffers
        return buffers

    def _start(
        self,
        buffers: _Buffers,
        config: GenerationConfig,
        inputs: Mapping[str, torch.Tensor],
        positions: torch.Tensor,
        copies: int,
    ) -> None:
        """Fill the buffers for this call: `copies` sequences per prompt."""
        prompt = inputs["input_ids"].repeat_interleave(copies, dim=0)
        buffers.cache.reset()
        buffers.attention_mask.fill_(1)
        buffers.attention_mask[:, : prompt.shape[1]] = inputs["attention_mask"].repeat_interleave(
            copies, dim=0
        )
        buffers.positions.copy_(positions[..., -1:].repeat_interleave(copies, dim=1) + 1)
        buffers.produced.zero_()
        # As `generate`'s repetition penalty sees its input_ids: the padded prompt, then each token.
        buffers.seen.zero_().scatter_(1, prompt, True)
        buffers.running.fill_(True)
        eos = config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=self.device)
        buffers.is_eos.zero_()[eos_ids] = True
        buffers.pad.fill_(config.pad_token_id)
        buffers.min_new_tokens.fill_(config.min_new_tokens or 0)
        buffers.penalty.fill_(config.repetition_penalty or 1.0)
        buffers.temperature.fill_(config.temperature or 1.0)
        buffers.top_k.fill_(config.top_k or 0)
        buffers.top_p.fill_(config.top_p or 1.0)

    def _prefill(
        self,
        cache: StaticCache,
        inputs: Mapping[str, torch.Tensor],
        positions: torch.Tensor,
        copies: int,
    ) -> torch.Tensor:
        """The prompt's forward pass (images included), eager, as `generate`'s; the logits of
        each sequence's first token."""
        # One copy per prompt: into the static cache as `generate` fills it; several: once into
        # a cache of its own, whose KV is then copied to every sequence.
        prompt_cache = cache if copies == 1 else DynamicCache(config=self.text_config)
        logits = self.model(
            **inputs,
            position_ids=positions,
            past_key_values=prompt_cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if copies > 1:
            for layer, filled in zip(cache.layers, prompt_cache.layers, strict=True):
                layer.update(
                    filled.keys.repeat_interleave(copies, dim=0),
                    filled.values.repeat_interleave(copies, dim=0),
                )
            logits = logits.repeat_interleave(copies, dim=0)
        return logits

    def _step(self, buffers: _Buffers, greedy: bool) -> None:
        """One decoding step, the one that is compiled: feed the last tokens, choose the next."""
        logits = self.model(
            input_ids=buffers.tokens,
            attention_mask=buffers.attention_mask,
            position_ids=buffers.positions,
            past_key_values=buffers.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        buffers.positions.add_(1)
        self._advance(buffers, logits, greedy)

    def _advance(self, buffers: _Buffers, logits: torch.Tensor, greedy: bool) -> None:
        """Choose each sequence's next token from its logits and record it."""
        chosen = self._choose(buffers, logits, greedy)
        chosen = torch.where(buffers.running, chosen, buffers.pad)  # ended: padding, as generate
        buffers.generated.index_copy_(1, buffers.produced.view(1), chosen[:, None])
        buffers.tokens.copy_(chosen[:, None])
        buffers.seen.scatter_(1, chosen[:, None], True)
        buffers.running.logical_and_(~buffers.is_eos[chosen])
        buffers.any_running.copy_(buffers.running.any())
        buffers.produced.add_(1)

    def _choose(self, buffers: _Buffers, logits: torch.Tensor, greedy: bool) -> torch.Tensor:
        """`generate`'s logits processors, in its order, then its choice."""
        scores = logits.float()
        penalized = torch.where(scores < 0, scores * buffers.penalty, scores / buffers.penalty)
        scores = torch.where(buffers.seen, penalized, scores)
        eos_masked = buffers.is_eos & (buffers.produced < buffers.min_new_tokens)
        scores = scores.masked_fill(eos_masked, -math.inf)
        if greedy:
            return scores.argmax(dim=-1)
        # Sampling, on the scores sorted once: top-k keeps those >= the k-th (ties kept, as
        # HF's), top-p the fewest most likely whose probability reaches top_p.
        ranked, order = (scores / buffers.temperature).sort(dim=-1, descending=True)
        k = torch.where(buffers.top_k > 0, buffers.top_k.clamp(max=self.vocab), self.vocab)
        kth = ranked.gather(-1, (k - 1).expand(ranked.shape[0], 1))
        probs = ranked.masked_fill(ranked < kth, -math.inf).softmax(dim=-1)
        beyond_top_p = (probs.cumsum(dim=-1) - probs >= buffers.top_p) & (buffers.top_p < 1)
        # A draw from the kept probabilities (renormalising would not change it): the argmax of
        # probability / Exp(1) noise.
        noise = buffers.noise.clamp_min(torch.finfo(torch.float32).tiny)
        pick = (probs.masked_fill(beyond_top_p, 0) / noise).argmax(dim=-1, keepdim=True)
        return order.gather(-1, pick).squeeze(-1)

    def _draw(self, buffers: _Buffers, greedy: bool) -> None:
        if not greedy:
            buffers.noise.exponential_(generator=self.generator)
