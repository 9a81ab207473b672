"""Prefix caching for the HF engine: the KV of earlier prompts, reused by later requests.

How a prefix is found (as vLLM's automatic prefix caching does it): a prompt is cut into blocks
of `BLOCK` tokens, each named by a hash chained over the blocks before it, its token ids and the
content of any image whose tokens it holds (image placeholder tokens are the same for every
image, so the ids alone would match two different pictures). A request reuses the longest run of
leading blocks some stored entry has. The store keeps:
- the text all requests of a batch start with, before any image (the system prompt), computed
  once before the batch that first needs it, so every request of that batch already reuses it;
- every answered request: its prompt and generated tokens (the next turn of a conversation
  starts with all of them).

Why the documented `DynamicCache` + `copy.deepcopy` pattern fails on Qwen2.5-VL, and what this
module does instead (`BatchLayout`):
- M-RoPE: positions after an image are not token indices (an image of N tokens advances them by
  about sqrt(N)), and `generate` with a non-empty cache takes them from `rope_deltas` of the
  *last* call, or recomputes them from `image_grid_thw` for images it is no longer given. The
  layout computes the 3D positions of every row over its whole sequence itself
  (`get_rope_index`) and passes them to `generate`, which then only slices and extends them.
- Shapes: a batch needs one cache row per request, of one length. Rows are laid out
  `[cached prefix | holes | uncached rest]` (padding in the middle, masked out), and the
  batch's cache is built from the stored entries with zeros in the holes.
- Images: pixel values are passed only for images in the uncached rest; an image is never split
  (a match that ends inside an image's tokens is cut back to before the image).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image

BLOCK = 16  # tokens per block, vLLM's default: prefixes are matched in whole blocks


def image_digest(image: Image.Image) -> str:
    """The image's identity for block hashes: a digest of its pixels and size."""
    return hashlib.blake2b(image.tobytes() + repr(image.size).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ImageSpan:
    start: int  # index of the first placeholder token
    end: int  # one past the last
    digest: str
    patches: int  # rows of pixel_values it owns


def image_spans(
    tokens: list[int], image_token_id: int, images: Iterator[tuple[str, int]]
) -> list[ImageSpan]:
    """The runs of image placeholder tokens, in order, each taking the next of `images`
    (digest, pixel-value rows)."""
    spans: list[ImageSpan] = []
    index = 0
    while index < len(tokens):
        if tokens[index] != image_token_id:
            index += 1
            continue
        start = index
        while index < len(tokens) and tokens[index] == image_token_id:
            index += 1
        digest, patches = next(images)
        spans.append(ImageSpan(start, index, digest, patches))
    return spans


def block_hashes(tokens: list[int], spans: list[ImageSpan]) -> list[int]:
    """One hash per whole block of `tokens`, each chained over the blocks before it."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        end = start + BLOCK
        images = tuple(s.digest for s in spans if s.start < end and s.end > start)
        previous = hash((previous, tuple(tokens[start:end]), images))
        hashes.append(previous)
    return hashes


@dataclass
class Entry:
    """The KV of `tokens` (one sequence), per layer `[1, kv_heads, len(tokens), head_dim]`."""

    tokens: list[int]
    hashes: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class PrefixStore:
    """Stored entries, least recently used evicted first beyond `capacity_tokens`."""

    capacity_tokens: int
    _entries: OrderedDict[int, Entry] = field(default_factory=OrderedDict)
    _by_hash: dict[int, int] = field(default_factory=dict)  # block hash -> entry id
    _tokens: int = 0
    _next_id: int = 0

    def clear(self) -> None:
        self._entries.clear()
        self._by_hash.clear()
        self._tokens = 0

    def match(self, hashes: list[int]) -> tuple[Entry | None, int]:
        """The entry holding the longest run of these leading blocks, and that run in tokens."""
        entry_id, blocks = None, 0
        for block, value in enumerate(hashes):
            found = self._by_hash.get(value)
            if found is None:
                break
            entry_id, blocks = found, block + 1
        if entry_id is None:
            return None, 0
        self._entries.move_to_end(entry_id)
        return self._entries[entry_id], blocks * BLOCK

    def add(self, entry: Entry) -> None:
        if not entry.hashes or len(entry.tokens) > self.capacity_tokens:
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = entry
        self._tokens += len(entry.tokens)
        for value in entry.hashes:
            self._by_hash[value] = entry_id
        while self._tokens > self.capacity_tokens:
            old_id, old = self._entries.popitem(last=False)
            self._tokens -= len(old.tokens)
            for value in old.hashes:
                if self._by_hash.get(value) == old_id:
                    del self._by_hash[value]


@dataclass
class Row:
    """One request of a batch: its unpadded prompt, its images, and what of it is cached."""

    tokens: list[int]
    mm_types: list[int]
    spans: list[ImageSpan]
    hashes: list[int]
    entry: Entry | None = None
    cached: int = 0  # leading tokens whose KV comes from `entry`
    paid: bool = False  # its shared prefix was computed for it in this batch (not a reuse)

    def usable(self, matched: int) -> int:
        """`matched` cut back so that an image is never split and one token is left to run."""
        cut = min(matched, len(self.tokens) - 1)
        for span in self.spans:
            if span.start < cut < span.end:
                cut = span.start
        return cut


def shared_prefix(rows: list[Row]) -> int:
    """Whole blocks of text that every row of the batch starts with, before any image: the part
    worth computing once before the batch (a lone row shares nothing with anyone yet)."""
    if len(rows) < 2:
        return 0
    limit = min(row.usable(len(row.tokens)) for row in rows)
    limit = min([limit] + [span.start for row in rows for span in row.spans])
    first = rows[0].tokens
    length = 0
    while length < limit and all(row.tokens[length] == first[length] for row in rows):
        length += 1
    return length // BLOCK * BLOCK


@dataclass
class BatchLayout:
    """Rows laid out `[cached | holes | rest]`; tensors are `[rows, cached_len + rest_len]`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # [4, rows, len]: text positions, then M-RoPE (t, h, w)
    cached_len: int

    @classmethod
    def build(cls, rows: list[Row], pad_id: int, model, image_grid_thw, device) -> BatchLayout:
        cached_len = max(row.cached for row in rows)
        rest_len = max(len(row.tokens) - row.cached for row in rows)
        ids, mask, types = [], [], []
        for row in rows:
            rest = len(row.tokens) - row.cached
            holes = cached_len - row.cached + rest_len - rest
            ids.append(row.tokens[: row.cached] + [pad_id] * holes + row.tokens[row.cached :])
            mask.append([1] * row.cached + [0] * holes + [1] * rest)
            types.append(row.mm_types[: row.cached] + [0] * holes + row.mm_types[row.cached :])
        input_ids = torch.tensor(ids, device=device)
        attention_mask = torch.tensor(mask, device=device)
        mm_types = torch.tensor(types, device=device)
        position_ids = generation_position_ids(
            model, input_ids, attention_mask, mm_types, image_grid_thw
        )
        return cls(input_ids, attention_mask, position_ids, cached_len)


def generation_position_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
) -> torch.Tensor:
    """A batch's positions as Qwen2.5-VL's `generate` builds them (transformers 5.17 and 5.19
    alike), padding (mask 0) skipped: `[4, rows, len]`, the text positions, then M-RoPE's
    (t, h, w)."""
    text = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if image_grid_thw is None:
        vision = text[None].expand(3, -1, -1)
    else:
        vision, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
    return torch.cat([text[None], vision], dim=0)


def batch_cache(rows: list[Row], cached_len: int) -> tuple[list, list]:
    """Per layer, the batch's keys and values of the cached columns (zeros in the holes)."""
    template = next(row.entry for row in rows if row.entry is not None)
    keys, values = [], []
    for layer in range(len(template.keys)):
        heads, _, dim = template.keys[layer].shape[1:]
        like = template.keys[layer]
        layer_keys = like.new_zeros(len(rows), heads, cached_len, dim)
        layer_values = like.new_zeros(len(rows), heads, cached_len, dim)
        for index, row in enumerate(rows):
            if row.cached:
                layer_keys[index, :, : row.cached] = row.entry.keys[layer][0, :, : row.cached]
                layer_values[index, :, : row.cached] = row.entry.values[layer][0, :, : row.cached]
        keys.append(layer_keys)
        values.append(layer_values)
    return keys, values
