"""CLIP ViT image encoder and text encoder with OpenAI's parameter names.

The modules here are laid out so that `CLIP(...).state_dict()` has exactly the keys and shapes of OpenAI's
released checkpoints (`visual.conv1.weight`, `visual.transformer.resblocks.0.attn.in_proj_weight`,
`token_embedding.weight`, `text_projection`, `logit_scale`, ...). That lets the official weights load with a
plain `load_state_dict` and keeps every tensor findable by its familiar name.

Differences from OpenAI's code, all numerically neutral in fp32:
- attention is written out (one MatMul for q/k/v, Softmax, MatMul) instead of `nn.MultiheadAttention`, which
  exports to ONNX as a large, layout-shuffling subgraph; the weights keep the `in_proj_*`/`out_proj` names;
- everything is batch-first ([B, L, C]);
- each block also offers the "self-only" value path (`forward_self_only`) used by MaskCLIP/TCL for dense
  features, so no attention mask has to be swapped in at forward time;
- the vision positional embedding can be resized (bicubic) to any patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224  # the resolution the positional embedding was learned for
    embed_dim: int = 512

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in fp32 and casts back.

    CLIP does the same so that a half-precision model keeps its normalisation statistics accurate; an
    exported fp16 graph then still carries fp32 LayerNorms.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with (not interchangeable with nn.GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention, batch-first, with `nn.MultiheadAttention`'s parameter names.

    `in_proj_weight` stacks the q, k and v projections ([3C, C]); `out_proj` is a Linear.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.width = width
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C]; attn_mask is additive, [L, L] (0 keeps, -inf drops)."""
        B, L, C = x.shape
        head_dim = C // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3C]
        # [B, L, 3, heads, head_dim] -> 3 x [B, heads, L, head_dim]
        q, k, v = qkv.reshape(B, L, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # Scale q before the product, as nn.MultiheadAttention does (keeps fp16 logits in range).
        q = q * (head_dim**-0.5)
        logits = q @ k.transpose(-2, -1)  # [B, heads, L, L]
        if attn_mask is not None:
            logits = logits + attn_mask.to(logits.dtype)
        attn = logits.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, L, C)
        return self.out_proj(out)

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """What attention gives when every token may attend only to itself.

        Softmax over a single entry is 1, so the output is out_proj(v_proj(x)): only the v slice of the input
        projection matters and q/k are never computed. This is MaskCLIP's dense-feature trick.
        """
        C = self.width
        v = F.linear(x, self.in_proj_weight[2 * C :], self.in_proj_bias[2 * C :])
        return self.out_proj(v)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x

    def forward_self_only(self, x: torch.Tensor) -> torch.Tensor:
        """The block with a self-only (identity) attention mask, written as the explicit value path.

        Residuals and MLP are kept, so the block acts token by token with no spatial mixing.
        """
        x = x + self.attn.value_path(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.heads = heads
        # A ModuleList names its children "0", "1", ... exactly like OpenAI's nn.Sequential.
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def init_transformer_(transformer: Transformer) -> None:
    """CLIP's initialisation of a transformer stack (std scaled by width and depth)."""
    width, layers = transformer.width, transformer.layers
    proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def resize_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int], rule: str = "size") -> torch.Tensor:
    """Resize a ViT positional table [1 + g*g, C] to a new patch grid (h, w).

    The CLS row is kept; the g x g grid part is resized bicubically with align_corners=False. Two rules exist in
    the field and they give different tables whenever the grid changes:
    - "size" (TCL's): interpolate to the output size (h, w), i.e. sample at the size ratio h / g;
    - "scale" (the training-free heads' official code: NACLIP, SCLIP, ClearCLIP, PEARL all take DINO's
      `interpolate_pos_encoding`): interpolate with the scale factor (h + 0.1) / g used as given
      (`recompute_scale_factor=False`), which samples at a slightly different ratio for the same output size.
    The table is returned unchanged when the grid already matches.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n = pos_embed.shape[0] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"positional embedding has {n} grid rows, not a square")
    if (h, w) == (g, g):
        return pos_embed
    cls, grid = pos_embed[:1], pos_embed[1:]
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # [1, C, g, g]
    if rule == "size":
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    elif rule == "scale":
        scale = ((h + 0.1) / g, (w + 0.1) / g)
        grid = F.interpolate(
            grid, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False
        )
    else:
        raise ValueError(f"unknown position-embedding resize rule {rule!r}; known: size, scale")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)
    return torch.cat([cls, grid], dim=0)


class VisionTrunk(nn.Module):
    """Patchify + CLS + positional embedding + ln_pre + transformer: the ViT without its output head.

    TCL keeps CLIP's `ln_post`/`proj` in a separate module (see `LNProj`), so the trunk is its own class;
    `VisionTransformer` adds the head back for plain CLIP.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = cfg.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid**2 + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        init_transformer_(self.transformer)

    def resized_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        return resize_pos_embed(self.positional_embedding, grid_hw)

    def embed(self, pixels: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [B, 3, H, W] (H, W multiples of the patch) -> ln_pre'd tokens [B, 1 + h*w, C]."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [B, C, h, w]
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        cls = self.class_embedding.to(x.dtype).reshape(1, 1, C).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)
        if pos_embed is None:
            pos_embed = self.resized_pos_embed((h, w))
        x = x + pos_embed.to(x.dtype)
        return self.ln_pre(x)


class LNProj(nn.Module):
    """CLIP's image head: LayerNorm then a bias-free projection matrix, applied per token or per pixel."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.proj = nn.Parameter((width**-0.5) * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] or [B, C, H, W] (channels first when 4-D)."""
        if x.ndim == 4:
            y = self.ln(x.permute(0, 2, 3, 1)) @ self.proj.to(x.dtype)
            return y.permute(0, 3, 1, 2)
        return self.ln(x) @ self.proj.to(x.dtype)


class VisionTransformer(VisionTrunk):
    """OpenAI's `visual` module: the trunk plus `ln_post` and `proj` (global CLS embedding)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter((cfg.width**-0.5) * torch.randn(cfg.width, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed(pixels))
        return self.ln_post(x[:, 0]) @ self.proj


class TextTransformer(nn.Module):
    """CLIP's text encoder. Its parameters sit at the top level, as in OpenAI's CLIP class."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))

        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_transformer_(self.transformer)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, L] int64 (L = context_length) -> [T, embed_dim], not normalised.

        The feature is read at the EOT token, found as the argmax of the ids (EOT 49407 is the largest id).
        """
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)
        # Causal mask: token i sees tokens <= i. Built here rather than stored, so no buffer appears in the
        # state dict (OpenAI's has none) or in a TorchScript archive.
        L = tokens.shape[-1]
        causal = torch.full((L, L), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        x = self.transformer(x, causal)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection.to(x.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


class CLIP(TextTransformer):
    """The full CLIP model: `visual.*`, the text encoder at the top level, and `logit_scale`."""

    def __init__(self, vision: VisionConfig, text: TextConfig, seed: int | None = None):
        # CLIP's random init; with a seed it is reproducible and leaves the global RNG untouched.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            super().__init__(text)
            self.visual = VisionTransformer(vision)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()
        return logits, logits.t()
