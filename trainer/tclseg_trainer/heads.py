"""Training-free dense heads on the frozen CLIP ViT-B/16: the last block run with a different attention rule.

TCL's bundle already stops its image side at block 11's output tokens (`ImageTrunkGraph`: patch embed, ln_pre,
blocks 1..11 with ordinary attention). Every head here starts from those tokens and re-runs CLIP's *own* block 12
weights (no training, no new parameters) with the attention its paper proposes, then CLIP's `ln_post` and `proj`,
giving one embedding per patch in the joint image-text space. Class scores are then
`logit_scale * cos(feature, text_embedding)` followed by a softmax over the classes, as all these methods do.

Contract (what `headparity` and the exporter code against):

    dense_features(visual, head, tokens_or_image, grid=None, **options) -> [B, E, h, w], L2-normalised over E

- `visual`: OpenAI's `visual` module as `clip.py` builds it (`VisionTransformer`: `.transformer.resblocks`,
  `.ln_post`, `.proj`), or a `TCL` model (its frozen `clip_image_encoder`; `clip_proj` supplies ln_post/proj).
- `head`: one of `HEADS`.
- `tokens_or_image`: block-11 output tokens [B, 1 + h*w, width] (CLS first), or ImageNet-normalised pixels
  [B, 3, H, W] (H, W multiples of the patch), in which case the trunk is run here (positional embedding resized
  bicubically to the grid).
- `grid`: (h, w) patch grid; needed with tokens when the grid is not square (a square one is inferred), taken from
  the image otherwise.
- `options`: `gaussian_std` (NACLIP, default 5.0), `alpha_kk` and `polar_iters` (PEARL, defaults 0.08 and 5).

The heads (q, k, v are block 12's projections of ln_1(x) per attention head, d = head width, s = d^-1/2):

| head      | attention weights                                           | block output                       |
|-----------|-------------------------------------------------------------|------------------------------------|
| maskclip  | identity (each token attends to itself only)                | out_proj(v)                        |
| sclip     | softmax(s q qᵀ) + softmax(s k kᵀ)                           | x + attn, then + FFN (block kept)  |
| clearclip | softmax(s q qᵀ)                                             | out_proj(attn · v) alone           |
| naclip    | softmax(s k kᵀ + Ω), Ω = 2-D Gaussian (σ patches), 0 on CLS | out_proj(attn · v) alone           |
| pearl     | softmax(s q (k R)ᵀ + α s k̄ k̄ᵀ), R = polar factor of k̄ᵀ q̄    | out_proj(attn · v) alone           |

"Alone" means no residual and no FFN (the "reduced" last block). MaskCLIP's dense path is the value path only, as
in the MaskCLIP paper; TCL's own kp branch (`TCL.kp_features`) instead keeps block 12's residual and FFN.
PEARL's centred q̄, k̄ subtract query-norm-weighted means taken over the patch tokens (CLS excluded); the polar
factor R = M (MᵀM)^-1/2 comes from a fixed number of coupled Newton–Schulz iterations on MᵀM scaled by its
Frobenius norm, in fp32. PEARL's text-aware Laplacian post-processing is not part of this file.

Every operation is MatMul / Softmax / elementwise with fixed shapes, so `HeadGraph` exports to ONNX as is (NACLIP's
Ω is a constant of the grid, baked into the graph).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .clip import ResidualAttentionBlock, resize_pos_embed

HEADS = ("maskclip", "sclip", "clearclip", "naclip", "pearl")

# Per-method defaults from each method's official segmentor (the probabilities are softmax(logit_scale * cos) over
# the classes; a pixel whose best probability is below `prob_thresh` is background; PAMR after or not). Written into
# a bundle's [heads] table; every one is overridable at inference. Sources (repository @ the commit in
# reference/landscape.md §8): SCLIP clip_segmentor.py:20-21 (logit_scale=40, prob_thd=0.0, pamr_steps=0);
# ClearCLIP clearclip_segmentor.py:23 (logit_scale=50, prob_thd=0.0); NACLIP naclip.py:21-22 (logit_scale=40,
# prob_thd=0.0; its README's 39.4 row is without PAMR); PEARL pearl_ovss.py:22 (logit_scale=40, prob_thd=0.0).
# MaskCLIP: CLIP's own logit scale 100.
HEAD_DEFAULTS: dict[str, dict[str, float | bool]] = {
    "maskclip": {"logit_scale": 100.0, "pamr": False, "prob_thresh": 0.0},
    "sclip": {"logit_scale": 40.0, "pamr": False, "prob_thresh": 0.0},
    "clearclip": {"logit_scale": 50.0, "pamr": False, "prob_thresh": 0.0},
    "naclip": {"logit_scale": 40.0, "pamr": False, "prob_thresh": 0.0},
    "pearl": {"logit_scale": 40.0, "pamr": False, "prob_thresh": 0.0},
}

NACLIP_GAUSSIAN_STD = 5.0
PEARL_ALPHA_KK = 0.08
PEARL_POLAR_ITERS = 5


class _Parts:
    """Block 12, ln_post and proj of whichever CLIP image model was given."""

    def __init__(self, visual: nn.Module):
        if hasattr(visual, "clip_image_encoder"):  # a TCL model: the frozen CLIP branch
            trunk = visual.clip_image_encoder.clip_visual
            self.trunk = trunk
            self.ln_post = visual.clip_image_encoder.clip_proj.ln
            self.proj = visual.clip_image_encoder.clip_proj.proj
        elif hasattr(visual, "ln_post") and hasattr(visual, "proj"):
            self.trunk = visual
            self.ln_post = visual.ln_post
            self.proj = visual.proj
        else:
            raise TypeError(f"{type(visual).__name__} is neither a CLIP visual module nor a TCL model")
        self.block: ResidualAttentionBlock = self.trunk.transformer.resblocks[-1]


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
    return head


def split_qkv(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, L, C] (already ln_1'd) -> q, k, v, each [B, heads, L, d], unscaled."""
    b, n, c = x.shape
    heads = block.attn.heads
    qkv = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _mix(block: ResidualAttentionBlock, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights [B, H, L, L] applied to v [B, H, L, d], heads merged, then out_proj -> [B, L, C]."""
    b, h, n, d = v.shape
    out = (weights @ v).transpose(1, 2).reshape(b, n, h * d)
    return block.attn.out_proj(out)


def gaussian_bias(grid_hw: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's Ω [1 + h*w, 1 + h*w]: exp(-|p - p'|² / (2 std²)) between patch positions (in patches), 0 in the CLS
    row and column. The peak is 1 (not a normalised density), added to the attention logits."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    omega = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    omega[1:, 1:] = torch.exp(-dist2 / (2.0 * std * std))
    return omega.float()


def polar_factor(m: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """R ≈ m (mᵀm)^-1/2 for m [..., d, d], the orthogonal factor of m's polar decomposition.

    (mᵀm) is scaled by its Frobenius norm n (so its spectrum lies in (0, 1]) and nudged by eps·I; the coupled
    Newton–Schulz iteration Y <- Y T, Z <- T Z with T = (3I - Z Y) / 2 drives Z towards that matrix's inverse
    square root, and Z / sqrt(n) undoes the scaling. A fixed iteration count keeps it a plain graph.
    """
    d = m.shape[-1]
    # The identity as a comparison of two ranges (folded to a constant on export; torch.eye traces to EyeLike).
    idx = torch.arange(d, device=m.device)
    eye = (idx[:, None] == idx[None, :]).to(m.dtype).expand(m.shape[:-2] + (d, d))
    gram = m.transpose(-2, -1) @ m
    norm = gram.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    y = gram / norm + eps * eye
    z = eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return m @ (z / norm.sqrt())


def _pearl_weights(q: torch.Tensor, k: torch.Tensor, alpha_kk: float, iters: int) -> torch.Tensor:
    """PEARL's attention weights [B, H, L, L], computed in fp32."""
    q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5
    weight = q.norm(dim=-1, keepdim=True)  # [B, H, L, 1]
    weight = torch.cat([torch.zeros_like(weight[..., :1, :]), weight[..., 1:, :]], dim=-2)  # CLS left out
    weight = weight / (weight.sum(dim=-2, keepdim=True) + 1e-6)
    q_c = q - (weight * q).sum(dim=-2, keepdim=True)
    k_c = k - (weight * k).sum(dim=-2, keepdim=True)
    rotation = polar_factor(k_c.transpose(-2, -1) @ q_c, iters)
    logits = (q * scale) @ (k @ rotation).transpose(-2, -1)
    logits = logits + alpha_kk * scale * (k_c @ k_c.transpose(-2, -1))
    return logits.softmax(dim=-1)


def last_block(
    block: ResidualAttentionBlock,
    head: str,
    tokens: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    gaussian_std: float = NACLIP_GAUSSIAN_STD,
    alpha_kk: float = PEARL_ALPHA_KK,
    polar_iters: int = PEARL_POLAR_ITERS,
    omega: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block 12 under `head`'s rule: tokens [B, L, C] -> [B, L, C] (what ln_post then sees)."""
    check_head(head)
    x = block.ln_1(tokens)
    if head == "maskclip":
        return block.attn.value_path(x)
    q, k, v = split_qkv(block, x)
    scale = q.shape[-1] ** -0.5
    if head == "sclip":
        weights = ((q @ q.transpose(-2, -1)) * scale).softmax(-1) + ((k @ k.transpose(-2, -1)) * scale).softmax(-1)
        y = tokens + _mix(block, weights, v)
        return y + block.mlp(block.ln_2(y))
    if head == "clearclip":
        weights = ((q @ q.transpose(-2, -1)) * scale).softmax(-1)
    elif head == "naclip":
        if omega is None:
            omega = gaussian_bias(grid_hw, gaussian_std)
        weights = ((k @ k.transpose(-2, -1)) * scale + omega.to(k.dtype)).softmax(-1)
    else:  # pearl
        weights = _pearl_weights(q, k, alpha_kk, polar_iters).to(v.dtype)
    return _mix(block, weights, v)


def _trunk_tokens(parts: _Parts, pixels: torch.Tensor, pos_resize: str) -> tuple[torch.Tensor, tuple[int, int]]:
    patch = parts.trunk.patch_size
    grid_hw = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    x = parts.trunk.embed(pixels, resize_pos_embed(parts.trunk.positional_embedding, grid_hw, rule=pos_resize))
    for block in parts.trunk.transformer.resblocks[:-1]:
        x = block(x)
    return x, grid_hw


def _grid_of(tokens: torch.Tensor, grid: tuple[int, int] | int | None) -> tuple[int, int]:
    n = tokens.shape[1] - 1
    if grid is None:
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f"{n} patch tokens are not a square grid; pass grid=(h, w)")
        return side, side
    grid_hw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if grid_hw[0] * grid_hw[1] != n:
        raise ValueError(f"grid {grid_hw} does not match {n} patch tokens")
    return grid_hw


def dense_features(
    visual: nn.Module,
    head: str,
    tokens_or_image: torch.Tensor,
    grid: tuple[int, int] | int | None = None,
    *,
    pos_resize: str = "scale",
    **options: float,
) -> torch.Tensor:
    """Dense joint-space features [B, E, h, w], L2-normalised over E, of `head` (see the module docstring).

    From pixels, the position embedding is resized by `pos_resize`: "scale" is the training-free methods' own rule
    (`clip.resize_pos_embed`; NACLIP, SCLIP, ClearCLIP and PEARL all use it), "size" TCL's, which a bundle's trunk
    graph bakes in today. The two differ wherever the grid is not CLIP's 14x14 (e.g. ClearCLIP's 448 windows)."""
    parts = _Parts(visual)
    if tokens_or_image.ndim == 4:
        tokens, grid_hw = _trunk_tokens(parts, tokens_or_image, pos_resize)
    else:
        tokens, grid_hw = tokens_or_image, _grid_of(tokens_or_image, grid)
    x = last_block(parts.block, head, tokens, grid_hw, **options)
    feats = parts.ln_post(x[:, 1:]) @ parts.proj.to(x.dtype)  # [B, h*w, E]
    feats = F.normalize(feats.float(), dim=-1)
    b, _, e = feats.shape
    return feats.transpose(1, 2).reshape(b, e, grid_hw[0], grid_hw[1])


def class_scores(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per-class probabilities [B, N, h, w]: softmax over classes of logit_scale · cos(features, text).

    features [B, E, h, w] and text [N, E] are L2-normalised."""
    cos = torch.einsum("behw,ne->bnhw", features, text)
    return (cos * logit_scale).softmax(dim=1)


class HeadGraph(nn.Module):
    """tokens [B, 1 + G*G, W] -> dense [B, E, G, G], L2-normalised over E (fp32 out): one bundle head graph.

    NACLIP's Ω for the bundle's crop grid is a constant buffer, so the graph holds no grid arithmetic.
    """

    def __init__(self, visual: nn.Module, head: str, grid: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.visual = visual
        self.head = check_head(head)
        self.grid = (grid, grid)
        self.dtype = dtype
        omega = gaussian_bias(self.grid, NACLIP_GAUSSIAN_STD) if head == "naclip" else torch.zeros(0)
        self.register_buffer("omega", omega.to(dtype), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        omega = self.omega if self.head == "naclip" else None
        return dense_features(self.visual, self.head, tokens.to(self.dtype), self.grid, omega=omega)
