"""A small Vision Transformer for 28x28 and 32x32 images (not built for bound propagation)."""

from __future__ import annotations

import torch
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models._factory import register_model
from robustkd.models.layers import Residual

DOSOVITSKIY_2021 = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words (arXiv:2010.11929), small-image variant"


class SelfAttention(nn.Module):
    """Multi-head self-attention over a (batch, tokens, dim) sequence."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: its fused kernels have no double backward,
        # which KDIGA (and any input-gradient penalty) needs; with a few dozen tokens the fusion saves little.
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = weights @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class VisionTransformer(nn.Module):
    """Patch embedding, a class token, learned positions, pre-norm blocks, and a linear head on the token."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        input_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"vit input_size {input_size} is not a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ConfigError(f"vit dim {dim} is not divisible by heads {heads}")
        tokens = (input_size // patch_size) ** 2
        hidden = int(dim * mlp_ratio)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    Residual(nn.Sequential(nn.LayerNorm(dim), SelfAttention(dim, heads))),
                    Residual(
                        nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                    ),
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small truncated-normal weights, as ViTs are usually initialised; PyTorch's fan-in default is
        # tuned for conv nets.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model(boundable=False, input_sizes=(28, 32), reference=DOSOVITSKIY_2021)
def vit_tiny(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    *,
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """ViT for small images: 4x4 patches, dim 192, depth 6, 3 heads, MLP ratio 4."""
    return VisionTransformer(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
    )
