"""Qwen-7B's decoder blocks (`transformer.h.N`) as the checkpoint names them: RMSNorm `ln_1` / `ln_2`, attention
with one fused `c_attn` (q | k | v, with bias) and `c_proj` (no bias), and a SwiGLU MLP written as
`c_proj(w1(x) * silu(w2(x)))` (w2 is the gated branch).

Rotary positions cover the whole head (rotary_pct 1.0), halves rotated as in GPT-NeoX/Llama, computed in fp32.
Inference beyond `seq_length` (2048) tokens follows the original: dynamic NTK (the rotary base grows with the
prompt's length, padding included, kept for the tokens generated after it) and log-n scaling of the queries;
neither applies in training or within 2048 tokens. Positions are the token's index in the sequence (cache included), as the original
computes them; a `position_ids` argument is not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlmtune.families.qwen_vl_model.configuration import QwenVLConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return hidden.type_as(x) * self.weight


def ntk_alpha(length: int, seq_length: int) -> float:
    """The original's dynamic NTK factor for a prompt of `length` tokens: 1 up to `seq_length`, then 3, 7, 15..."""
    context = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context) - 1, 1))


class RotaryEmbedding(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.dim = int(config.kv_channels * config.rotary_pct)
        self.base = float(config.rotary_emb_base)
        self.alpha = 1.0
        """The NTK factor in use: set at each inference prefill, kept for the decoding steps after it."""

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (1, 1, len(positions), dim), fp32."""
        base = self.base * self.alpha ** (self.dim / (self.dim - 2))
        inv_freq = 1.0 / base ** (torch.arange(0, self.dim, 2, device=positions.device).float() / self.dim)
        freqs = torch.outer(positions.float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[None, None]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    head, rest = x[..., :rot].float(), x[..., rot:].float()
    return torch.cat((head * cos + _rotate_half(head) * sin, rest), dim=-1).type_as(x)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class QwenAttention(nn.Module):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.scaling = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.is_causal = True
        self.num_key_value_groups = 1
        projection = self.heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, logn: torch.Tensor | None = None,
                past_key_values: object = None, **kwargs: object) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        query, key, value = (t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
                             for t in self.c_attn(hidden_states).chunk(3, dim=-1))
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if logn is not None:
            query = query * logn.to(query.dtype)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention)
        out, _ = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                           dropout=self.config.attn_dropout_prob if self.training else 0.0, **kwargs)
        return self.c_proj(out.reshape(batch, length, -1))


class QwenMLP(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, config.mlp_width, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, config.mlp_width, bias=bias)
        self.c_proj = nn.Linear(config.mlp_width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QwenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QwenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QwenMLP(config)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, logn: torch.Tensor | None = None,
                past_key_values: object = None, **kwargs: object) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), position_embeddings, attention_mask,
                                                  logn, past_key_values, **kwargs)
        return hidden_states + self.mlp(self.ln_2(hidden_states))
