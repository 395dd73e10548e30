"""A small SAR -> optical encoder-decoder, shaped like TerraMind's encoder-decoder.

The encoder turns the SAR crop into patch tokens (self-attention with a fused `attn.qkv`, as
TerraMind's encoder); the decoder starts from one learned query per output patch and
attends to the SAR tokens through `cross_attn.q`, `cross_attn.kv` and `cross_attn.proj`, the
names TerraMind's decoder blocks use, so `lora.targets: "re:.*cross_attn\\.(q|kv|proj)$"`
selects the same layers here as on the real model. `head` turns decoder tokens back into
pixels and `refine` adds full-resolution detail from the SAR itself.

Built by `model.builder: sar_model:build` with `model.builder_args` (run with this folder on
PYTHONPATH). `gradient_checkpointing_enable()` recomputes the decoder blocks' activations in
the backward pass, which `model.gradient_checkpointing: true` switches on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Target tokens (queries) attend to source tokens (keys and values)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        m = context.shape[1]
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class SarToOptical(nn.Module):
    """`forward(source [N, in, H, W]) -> [N, out, H, W]` in [0, 1] (targets scaled by `range`);
    H and W multiples of `patch`. The output layers start at zero, so training starts from a
    flat mid-grey image rather than from random noise."""

    def __init__(
        self, in_bands: int, out_bands: int, dim: int, depth: int, heads: int, patch: int, size: int
    ) -> None:
        super().__init__()
        self.patch, self.out_bands = patch, out_bands
        tokens = (size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_bands, dim, patch, stride=patch)
        self.pos_embed = nn.Embedding(tokens, dim)
        self.encoder = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.queries = nn.Embedding(tokens, dim)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_bands * patch * patch)
        self.refine = nn.Conv2d(in_bands + out_bands, out_bands, 3, padding=1)
        for layer in (self.head, self.refine):  # start from a flat mid-grey image (0.5)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        self.checkpointing = True

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        n, _, h, w = source.shape
        grid_h, grid_w = h // self.patch, w // self.patch
        tokens = self.patch_embed(source).flatten(2).transpose(1, 2)
        positions = self._positions(grid_h, grid_w, source.device)
        context = tokens + self.pos_embed(positions)
        for block in self.encoder:
            context = block(context)
        x = self.queries(positions).expand(n, -1, -1)
        for block in self.decoder:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, context, use_reentrant=False)
            else:
                x = block(x, context)
        patches = self.head(self.norm(x)).view(n, grid_h, grid_w, self.out_bands, self.patch, -1)
        coarse = patches.permute(0, 3, 1, 4, 2, 5).reshape(n, self.out_bands, h, w)
        return torch.sigmoid(coarse + self.refine(torch.cat([source, coarse], dim=1)))

    def _positions(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        side = int(self.pos_embed.num_embeddings**0.5)
        if grid_h > side or grid_w > side:
            raise ValueError(f"input of {grid_h}x{grid_w} patches exceeds the {side}x{side} grid")
        rows = torch.arange(grid_h, device=device)[:, None] * side
        return (rows + torch.arange(grid_w, device=device)[None, :]).flatten()


def build(
    in_bands: int = 2,
    out_bands: int = 3,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    patch: int = 8,
    size: int = 64,
) -> SarToOptical:
    """The model for `model.builder: sar_model:build`."""
    return SarToOptical(in_bands, out_bands, dim, depth, heads, patch, size)
