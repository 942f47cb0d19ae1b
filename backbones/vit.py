"""Vision Transformers for faces as in insightface arcface_torch: vit_t, vit_s, vit_b, vit_l.

Patch size 9 (a 112 px face gives 12×12 = 144 patches; an input of side S gives (S // 9)²),
learned position embeddings, pre-norm blocks with ReLU6 MLPs (ratio 4) and no qkv bias, random
token masking while training (masked tokens are filled with a learned ``mask_token`` after the
final LayerNorm), and a ``feature`` head over all tokens: Linear(L·D → D) → BN → Linear(D → d) → BN.
Parameter names follow insightface ``backbones/vit.py``. ``width`` scales the token dimension
(``dim·width/64``; 64 = published).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbones.iresnet import check_images, check_input_size, check_width
from utils.errors import UserError

PATCH_SIZE = 9

# name: (token dim at width 64, depth, heads, drop-path rate, mask ratio, gradient checkpointing)
VIT_VARIANTS = {
    "vit_t": (256, 12, 8, 0.1, 0.1, False),
    "vit_s": (512, 12, 8, 0.1, 0.1, False),
    "vit_b": (512, 24, 8, 0.1, 0.1, True),
    "vit_l": (768, 24, 8, 0.05, 0.05, True),
}


def _no_autocast(device_type):
    """Autocast switched off (a no-op context on devices without autocast, such as ``meta``)."""
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class DropPath(nn.Module):
    """Stochastic depth: while training, zero a sample's residual branch with probability ``p``."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep) / keep


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(q·kᵀ/√h)·v product is computed in fp32."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float()
        with _no_autocast(x.device.type):
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim, num_heads, drop_path=0.0, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches (a remainder at the right/bottom border is dropped)."""

    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT face backbone mapping (B, 3, S, S) to (B, ``num_features``)."""

    def __init__(self, num_features=512, embed_dim=256, depth=12, num_heads=8, drop_path_rate=0.1,
                 mask_ratio=0.1, dropout=0.0, input_size=112, patch_size=PATCH_SIZE,
                 using_checkpoint=False):
        super().__init__()
        self.input_size = check_input_size(input_size)
        if embed_dim % num_heads:
            raise UserError(f"ViT token dimension {embed_dim} is not divisible by {num_heads} heads "
                            "(choose another network width)")
        self.mask_ratio = mask_ratio
        self.using_checkpoint = using_checkpoint
        self.patch_embed = PatchEmbed(input_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _random_masking(self, x):
        """Keep a random ``1 - mask_ratio`` share of each sample's tokens; also return the unshuffle order."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, dim))
        return kept, restore

    def forward(self, x):
        check_images(x, self.input_size)
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._random_masking(x)
        for block in self.blocks:
            if self.using_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.float())
        if masking:
            fill = self.mask_token.expand(x.shape[0], restore.shape[1] - x.shape[1], -1)
            x = torch.cat([x, fill.to(x.dtype)], dim=1)
            x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        return self.feature(self.dropout(x.flatten(1)))


def vit(name, num_features=512, dropout=0.0, width=64, input_size=112):
    """The ViT variant ``name`` (one of :data:`VIT_VARIANTS`) with its token dim scaled by width/64."""
    dim, depth, heads, drop_path, mask_ratio, ckpt = VIT_VARIANTS[name]
    embed_dim = dim * check_width(width) // 64
    if embed_dim < heads:
        raise UserError(f"network width {width} is too small for {name} (token dimension {embed_dim} < {heads} heads)")
    return VisionTransformer(num_features, embed_dim, depth, heads, drop_path, mask_ratio, dropout,
                             input_size, PATCH_SIZE, ckpt)
