"""engine.fuse_projections: what vLLM's QKVParallelLinear and MergedColumnParallelLinear do, on
a loaded HF Qwen2.5-VL. In each decoder layer of the text model q_proj, k_proj and v_proj become
one linear over their concatenated weights and biases (`qkv_proj`, split after), gate_proj and
up_proj one linear (`gate_up_proj`, chunked after). At batch 1 each projection is a memory-bound
GEMV, and the small ones run far below the memory bandwidth: one larger GEMV reads the same bytes
faster. The weights are moved, not duplicated (the parts are deleted); the vision tower is left
as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from sweeper.config import ConfigError


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear whose output is the parts' outputs concatenated, on their device and dtype."""
    first = parts[0]
    grad = first.weight.requires_grad
    out_features = sum(part.out_features for part in parts)
    # On the meta device: no memory and no initialisation for weights replaced right after.
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([part.weight for part in parts]), grad)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([part.bias for part in parts]), grad)
    return fused


class FusedQKVAttention(qwen.Qwen2_5_VLAttention):
    """Qwen2_5_VLAttention with q_proj, k_proj and v_proj as one `qkv_proj`."""

    qkv_sizes: list[int]

    # HF's Qwen2_5_VLAttention.forward, copied because the three projections are three call
    # sites in it and one matmul needs one; the only change is the `qkv_proj` line. Checked
    # against transformers 5.17 and 5.19 (identical code there).
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: qwen.Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.size()

        query_states, key_states, value_states = self.qkv_proj(hidden_states).split(
            self.qkv_sizes, dim=-1
        )

        query_states = query_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        key_states = key_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        value_states = value_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = qwen.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(
                key_states, value_states, self.layer_idx
            )

        attention_interface: Callable = qwen.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, qwen.eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_ids=position_ids,  # pass positions for FA2
            **kwargs,
        )

        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class FusedGateUpMLP(qwen.Qwen2MLP):
    """Qwen2MLP with gate_proj and up_proj as one `gate_up_proj`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _fuse_attention(attention: qwen.Qwen2_5_VLAttention) -> None:
    parts = [attention.q_proj, attention.k_proj, attention.v_proj]
    attention.qkv_proj = _fused_linear(parts)
    attention.qkv_sizes = [part.out_features for part in parts]
    del attention.q_proj, attention.k_proj, attention.v_proj
    attention.__class__ = FusedQKVAttention


def _fuse_mlp(mlp: qwen.Qwen2MLP) -> None:
    mlp.gate_up_proj = _fused_linear([mlp.gate_proj, mlp.up_proj])
    del mlp.gate_proj, mlp.up_proj
    mlp.__class__ = FusedGateUpMLP


def fuse_projections(model: nn.Module) -> int:
    """Fuse the projections of every Qwen2.5-VL decoder layer of `model` in place; the number of
    layers fused. A model without such layers (another architecture) is refused."""
    # Exact classes: the vision tower's attention and MLP are other classes, and a layer fused
    # already is a subclass.
    attentions = [m for m in model.modules() if type(m) is qwen.Qwen2_5_VLAttention]
    mlps = [m for m in model.modules() if type(m) is qwen.Qwen2MLP]
    if not attentions or len(attentions) != len(mlps):
        raise ConfigError(
            "engine.fuse_projections",
            True,
            f"false for {type(model).__name__}: only Qwen2.5-VL decoder layers are fused",
        )
    for attention in attentions:
        _fuse_attention(attention)
    for mlp in mlps:
        _fuse_mlp(mlp)
    return len(attentions)
