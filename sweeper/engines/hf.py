"""HF transformers engine: `model.generate` on static, left-padded batches."""

from __future__ import annotations

import gc
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from sweeper.data.base import LoadedSample
from sweeper.engines.base import Completion, DecodingParams, Engine
from sweeper.metrics.performance import RequestTiming, tpot
from sweeper.prompt import vqa_messages

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


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


class HFEngine(Engine):
    name = "hf"

    def __init__(self, engine_cfg: Any, model_path: str):
        self.device = resolve_device(engine_cfg.device)
        dtype = resolve_dtype(engine_cfg.dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=dtype, attn_implementation=engine_cfg.attn_implementation
        ).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.processor.tokenizer.pad_token_id

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _generate_kwargs(self, decoding: DecodingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "num_beams": decoding.beam_num,
            "num_return_sequences": decoding.num_samples,
            "do_sample": not decoding.greedy,
            "pad_token_id": self.pad_id,
        }
        if decoding.greedy:
            # Unset the sampling knobs a checkpoint's generation_config may carry.
            kwargs.update(temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(
                temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p
            )
        return kwargs

    def _output_length(self, tokens: list[int]) -> int:
        """Generated tokens up to and including the first EOS; padding after it is not output."""
        for index, token in enumerate(tokens):
            if token in self.eos_ids:
                return index + 1
        return len(tokens)

    @torch.inference_mode()
    def generate_batch(
        self, batch: list[LoadedSample], decoding: DecodingParams
    ) -> list[Completion]:
        submitted = self.now()
        texts = [
            self.processor.apply_chat_template(
                vqa_messages(item.sample.question), add_generation_prompt=True
            )
            for item in batch
        ]
        inputs = self.processor(
            text=texts, images=[item.image for item in batch], padding=True, return_tensors="pt"
        ).to(self.device)
        ready = self.now()

        prefill_clock, token_clock = _PrefillClock(self), _TokenClock(self)
        output = self.model.generate(
            **inputs,
            **self._generate_kwargs(decoding),
            logits_processor=LogitsProcessorList([prefill_clock]),
            stopping_criteria=StoppingCriteriaList([token_clock]),
        )
        prompt_len = inputs["input_ids"].shape[1]
        generated = output[:, prompt_len:].tolist()
        steps = token_clock.step_times
        prefill_s = prefill_clock.prefill_done - ready
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()

        completions = []
        n = decoding.num_samples
        for row, item in enumerate(batch):
            sequences = generated[row * n : (row + 1) * n]
            lengths = [self._output_length(seq) for seq in sequences]
            longest = max(lengths)
            texts_out = self.processor.tokenizer.batch_decode(
                [seq[:length] for seq, length in zip(sequences, lengths, strict=True)],
                skip_special_tokens=True,
            )
            timing = RequestTiming(
                preprocess_s=item.decode_s + (ready - submitted),
                prefill_s=prefill_s,
                ttft_s=steps[0] - submitted,
                latency_s=steps[longest - 1] - submitted,
                tpot_s=tpot(steps[0], steps[longest - 1], longest),
                prompt_tokens=int(prompt_tokens[row]),
                output_tokens=sum(lengths),
            )
            completions.append(Completion(item.sample.question_id, texts_out, timing))
        return completions

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
