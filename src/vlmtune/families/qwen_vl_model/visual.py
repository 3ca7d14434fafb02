"""Qwen-VL's vision side (`transformer.visual`): an OpenCLIP ViT-bigG/14 (48 pre-norm blocks, 1664 wide, GELU MLP)
at a fixed 448 px, then a one-layer cross-attention resampler whose 256 learned queries read the 1024 patch
features, a LayerNorm and a square projection into the language model's width.

Parameter names are the checkpoint's: `conv1`, `positional_embedding` (256 x width: 16 x 16 grid, bicubically
resized to the patch grid), `ln_pre`, `transformer.resblocks.N.{ln_1, attn.in_proj, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}`, `attn_pool.{query, pos_embed, kv_proj, ln_q, ln_kv, attn}` (attn: torch's
MultiheadAttention, `in_proj_weight` / `in_proj_bias` / `out_proj`), `ln_post`, `proj` (a bare matrix).
Layout detail that matters for loading: a block's `attn.in_proj` output is per head [q | k | v] (head-major), unlike
torch's MultiheadAttention ([all q | all k | all v]), which the resampler uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.families.qwen_vl_model.configuration import QwenVLConfig

POSITION_GRID = 16
"""The ViT's learned position table is 16 x 16 (256 rows) whatever the image size."""
LAYER_NORM_EPS = 1e-6


def resize_positions(table: torch.Tensor, count: int) -> torch.Tensor:
    """A (side^2, dim) position table resized bicubically to (count, dim), count a square; as is when equal."""
    side, target = int(math.isqrt(table.shape[0])), int(math.isqrt(count))
    if side == target:
        return table
    grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine table (side^2, dim), rows in raster order: the first half of each row encodes
    the column index, the second half the row index (MAE's meshgrid puts the width coordinate first)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class VisionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionBlocks(nn.Module):
    """`transformer.visual.transformer`: holds the block list under the checkpoint's name `resblocks`."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(width, heads, mlp_width) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class Resampler(nn.Module):
    """`attn_pool`: `queries` learned queries (plus a fixed 2-D sine-cosine position each) attend once to the
    patch features (projected to the output width, plus the same table resized to the patch grid)."""

    def __init__(self, queries: int, dim: int, kv_dim: int):
        super().__init__()
        self.grid = int(math.isqrt(queries))
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, self.grid).to(torch.get_default_dtype()), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the table is fixed, as in the original; detached so that it stays so when PEFT's modules_to_save (which
        # turns on grad for every parameter of the copy it trains) holds the resampler
        table = self.pos_embed.detach()
        keys_pos = resize_positions(table, x.shape[1])
        x = self.ln_kv(self.kv_proj(x))
        query = (self.ln_q(self.query) + table).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(query, x + keys_pos, x, need_weights=False)[0]


class VisionTransformer(nn.Module):
    """`transformer.visual`: pixel_values (images, 3, side, side) -> (images, queries, output_dim)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        v = config.visual
        width, patch = int(v["width"]), int(v["patch_size"])
        self.image_size = int(v["image_size"])
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(POSITION_GRID ** 2, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = VisionBlocks(width, int(v["layers"]), int(v["heads"]), config.vision_mlp_width)
        self.attn_pool = Resampler(config.queries, int(v["output_dim"]), width)
        self.ln_post = nn.LayerNorm(int(v["output_dim"]), eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.zeros(int(v["output_dim"]), int(v["output_dim"])))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        x = self.attn_pool(self.transformer(x))
        return self.ln_post(x) @ self.proj
