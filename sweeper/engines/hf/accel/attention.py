"""engine.attn_implementation=sdpa_gqa: transformers' SDPA attention, except that a layer's few
KV heads are shared by their query heads inside the kernel (SDPA's `enable_gqa`) instead of
being copied out to one per query head first (`repeat_kv`).

transformers 5.19 (`use_gqa_in_sdpa`) passes `enable_gqa` on CUDA only when there is no
attention mask, and a padded batch or a static cache always brings one, so every decode step of
Qwen2.5-VL-7B (28 query heads on 4 KV heads) first copies each layer's keys and values 7 times.
On an H100, run eagerly, the 28 layers' attention over a 1,024-slot cache took 0.951 ms per token
with the copies and 0.357 ms with `enable_gqa` (experiments/okvqa_replica/results/
decode_fusion.json); in the compiled decode step, attention's kernels take ~0.42 ms in all, the
most this can save there (not measured yet). The masks are transformers' SDPA masks, so the
attention is the same; tests/test_hf_attention.py checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

SDPA_GQA = "sdpa_gqa"


def sdpa_gqa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; (batch, tokens, heads, head_dim) out."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' sdpa: a mask, when there is one, already holds causality; and one query
    # token attends to every key it is given.
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register_sdpa_gqa() -> None:
    """Make `attn_implementation="sdpa_gqa"` loadable; registering again changes nothing."""
    AttentionInterface.register(SDPA_GQA, sdpa_gqa_attention_forward)
    AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)
