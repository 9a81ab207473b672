"""prefix_caching=true on engine=hf's static batches: `generate` on top of the KV of earlier
prompts (the store and the batch layout: prefix_store.py; why it is laid out by hand: M-RoPE).
Checked on the architectures `accel.PREFIX_CACHING` names."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, StaticCache

from sweeper.engines.hf.accel.prefix_store import (
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
from sweeper.engines.toolkit.timing import output_length
from sweeper.requests import DecodingParams


class PrefixCaching:
    """The engine's prefix store, and `generate` on the stored prefixes of a batch."""

    def __init__(
        self, model: PreTrainedModel, pad_id: int, eos_ids: set[int], capacity_tokens: int
    ):
        self.model = model
        self.device = model.device
        self.text_config = model.config.get_text_config(decoder=True)
        self.image_token_id = model.config.image_token_id
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.store = PrefixStore(capacity_tokens)

    def clear(self) -> None:
        self.store.clear()

    def generate(
        self,
        inputs: Any,
        images: list,
        decoding: DecodingParams,
        kv_cache: str,
        generate_kwargs: dict[str, Any],
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
        expand = decoding.width
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
            past_key_values=self._as_kind(cache, kv_cache, width + decoding.max_new_tokens),
            return_dict_in_generate=True,
            **vision,
            **generate_kwargs,
        )
        if decoding.beam_num == 1:  # beam search reorders the cache rows: nothing to keep
            self._store_answered(rows, layout, output, expand)
        return output.sequences, width, [0 if row.paid else row.cached for row in rows]

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
            row.entry, matched = self.store.match(row.hashes)
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
        self.store.add(entry)
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

    def _as_kind(self, cache: DynamicCache, kv_cache: str, length: int) -> Cache:
        """The batch's filled DynamicCache as the kind `kv_cache` asks for; `length`: the tokens
        a static cache must hold."""
        if kv_cache == "dynamic":
            return cache
        filled = cache.layers[0].is_initialized
        data = [(layer.keys, layer.values) for layer in cache.layers] if filled else None
        if kv_cache == "offloaded":
            return DynamicCache(data, config=self.text_config, offloading=True)
        static = StaticCache(self.text_config, max_cache_len=length)
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
            fed = min(output_length(generated, self.eos_ids), steps - 1)  # the last never ran
            columns = torch.cat(
                [
                    layout.attention_mask[index].nonzero().squeeze(1),
                    torch.arange(width, width + fed, device=self.device),
                ]
            )
            tokens = row.tokens + generated[:fed]
            keys = [self._take(layer.keys, sequence, columns) for layer in layers]
            values = [self._take(layer.values, sequence, columns) for layer in layers]
            self.store.add(Entry(tokens, block_hashes(tokens, row.spans), keys, values))
