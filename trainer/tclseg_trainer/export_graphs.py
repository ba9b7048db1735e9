"""The TCL head as it ships: the graph wrappers that `export.py` traces into a bundle's ONNX graphs.

Each wrapper is a plain nn.Module whose forward is exactly what one bundle graph computes, built from the model's
own methods so that the exported numbers are the reference's numbers (`model.py` is the model as trained; this file
is the same function as the Rust runtime runs it). Two wrappers compute the decoder with fewer multiplies and the
same result to float rounding: `PolyphaseUpConv` (a 3x3 conv after 2x nearest upsampling, done at low resolution)
and `WinogradConv3x3` (F(4x4) tiles for fp32, F(2x2) for fp16 and odd sides; both are used).
`half_with_fp32_layernorms` makes the fp16 variant.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .bundle import KP_SCALE, KP_SHIFT
from .clip import resize_pos_embed


def _l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The model's normalization (official eps), always in fp32."""
    from .model import normalize

    return normalize(x.float(), dim=dim)


class TextEncoderGraph(nn.Module):
    """tokens int64 [T,77] -> text_emb [T,E]: CLIP's text feature at the EOT token after text_projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens).float()


class ImageTrunkGraph(nn.Module):
    """pixels [B,3,S,S] -> tokens [B,1+G*G,W], the output of CLIP block 11.

    The positional embedding, resized bicubically from the training grid to the crop grid, is computed once (in
    fp32, from `pos_embed_model`) and baked in as a constant, so the graph has no data-dependent resize. `pos_resize`
    is the rule (`clip.resize_pos_embed`): TCL's "size" for the bundle's own trunk, a method's "scale" for a
    protocol's trunk (`head_protocols.protocol_graphs`).
    """

    def __init__(
        self,
        model: nn.Module,
        grid: int,
        dtype: torch.dtype,
        pos_embed_model: nn.Module | None = None,
        pos_resize: str = "size",
    ):
        super().__init__()
        self.model = model
        self.dtype = dtype
        source = pos_embed_model if pos_embed_model is not None else model
        with torch.no_grad():
            if pos_resize == "size":  # TCL's rule, the bundle's own trunk (unchanged)
                pos = source.resized_pos_embed((grid, grid)).detach().float()
            else:  # a training-free method's protocol trunk (head_protocols.protocol_graphs)
                table = source.trunk.positional_embedding.detach().float()
                pos = resize_pos_embed(table, (grid, grid), rule=pos_resize)
        self.register_buffer("pos_embed", pos.to(dtype), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.model.trunk_tokens(pixels.to(self.dtype), pos_embed=self.pos_embed)
        return tokens.float()


def _fold_taps(w: torch.Tensor, phase: int, axis: int) -> torch.Tensor:
    """Folds the 3 taps of a 3x3 kernel along `axis` into the 2 taps one output phase of a nearest-2x
    upsampled input sees: phase 0 reads low-res offsets (-1, 0) = taps (0, 1+2); phase 1 reads (0, +1) = (0+1, 2)."""
    t0, t1, t2 = (w.select(axis, i) for i in range(3))
    pair = (t0, t1 + t2) if phase == 0 else (t0 + t1, t2)
    return torch.stack(pair, dim=axis)


# Winograd F(2x2, 3x3): a 3x3 conv as 2x2 output tiles from 4x4 input tiles with 16 multiplies per tile per
# channel pair instead of 36 (2.25x fewer). Y = A^T [(G g G^T) * (B^T d B)] A.
# Winograd transforms (Lavin & Gray 2016): F(2x2, 3x3) with points (0, 1, -1, inf) and F(4x4, 3x3) with points
# (0, 1, -1, 2, -2, inf). F(4, 3) needs 2.25 multiplies per output where direct needs 9 and F(2, 3) needs 4, at the
# cost of larger rounding (its transforms have entries up to 8), so fp16 graphs keep F(2, 3).
_WINOGRAD = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


class WinogradConv3x3(nn.Module):
    """A stride-1, padding-1 3x3 conv with bias, computed with Winograd F(m x m, 3x3).

    m = 4 in fp32 graphs (on maps whose sides divide by 4; F(2x2) otherwise) and m = 2 in fp16 ones. With
    t = m + 2: the input transform is a fixed t x t depthwise conv with stride m (t*t kernels per channel); the
    channel mixing is one batched MatMul over the t*t transform positions; the output transform is a fixed
    [m*m, t*t] MatMul and a pixel shuffle. Only standard ONNX ops. The weights are transformed once, in float64,
    when the graph is built.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype):
        super().__init__()
        w = conv.weight.detach().double()  # [Co, Ci, 3, 3]
        co, ci = w.shape[:2]
        self.ci, self.co = ci, co
        self.tiles = (4, 2) if dtype == torch.float32 else (2,)
        for m in self.tiles:
            bt, g, at = (torch.tensor(x, dtype=torch.float64) for x in _WINOGRAD[m])
            t = m + 2
            u = torch.einsum("ur,oirs,vs->uvoi", g, w, g).reshape(t * t, co, ci)
            self.register_buffer(f"u{m}", u.to(dtype), persistent=False)
            kernels = torch.einsum("ur,vs->uvrs", bt, bt).reshape(t * t, 1, t, t)  # V = B^T d B per tile
            self.register_buffer(f"input_kernels{m}", kernels.repeat(ci, 1, 1, 1).to(dtype), persistent=False)
            out = torch.einsum("pu,qv->pquv", at, at).reshape(m * m, t * t)
            self.register_buffer(f"output_transform{m}", out.to(dtype), persistent=False)
        self.register_buffer("bias", conv.bias.detach().to(dtype).reshape(1, co, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Shapes are constants when the graph is traced, so this picks one tile size per exported graph.
        m = next((m for m in self.tiles if h % m == 0 and w % m == 0), None)
        if m is None:
            raise ValueError(f"Winograd conv needs even map sides, got {h}x{w}")
        t, th, tw = m + 2, h // m, w // m
        kernels = getattr(self, f"input_kernels{m}")
        v = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, stride=m, groups=c)  # [B, t*t*C, th, tw]
        v = v.reshape(b, c, t * t, th * tw).permute(2, 1, 0, 3).reshape(t * t, c, b * th * tw)
        mixed = torch.matmul(getattr(self, f"u{m}"), v)  # [t*t, Co, B*T]
        y = torch.matmul(getattr(self, f"output_transform{m}"), mixed.reshape(t * t, -1))
        y = y.reshape(m, m, self.co, b, th, tw).permute(3, 2, 4, 0, 5, 1).reshape(b, self.co, h, w)
        return y + self.bias


class PolyphaseUpConv(nn.Module):
    """`ResConv` (nearest 2x up, then two gated residual 3x3 convs) with its first conv done at low resolution.

    A 3x3 conv over a nearest-upsampled map equals, for each of the four output phases, a 2x2 conv over the
    low-resolution map with folded weights; LN and GELU act per pixel, so they commute with the upsampling.
    All four phases come out of one 2x2 conv with 4x the output channels on the map padded by 1. The stage's
    second conv (at full resolution) runs as Winograd F(4x4, 3x3) in fp32 graphs, F(2x2, 3x3) in fp16 ones. Same
    function with 2.25x fewer multiplies for the first conv and 4x (fp16: 2.25x) for the second (the decoder drops
    from ~166 to ~58 GMACs per 448 crop at ViT-B/16 in fp32); results agree with the model to float rounding
    (tested).
    """

    def __init__(self, stage: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.stage = stage
        w = stage.conv.conv.weight.detach().float()  # [C, C, 3, 3]
        phases = [_fold_taps(_fold_taps(w, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]
        self.register_buffer("weight", torch.cat(phases, 0).to(dtype), persistent=False)  # [4C, C, 2, 2]
        bias = stage.conv.conv.bias.detach().float()
        self.register_buffer("bias", bias.repeat(4).to(dtype), persistent=False)
        self.second_conv = WinogradConv3x3(stage.conv2.conv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        block = self.stage.conv
        z = block.activ(block.norm(x))
        y = F.conv2d(F.pad(z, (1, 1, 1, 1)), self.weight, self.bias)  # [B, 4C, h+1, w+1]
        y = y.reshape(b, 4, c, h + 1, w + 1)
        # Phase (a, b) sits at offset (a, b) of the padded output; interleave into [B, C, 2h, 2w].
        rows = [torch.stack([y[:, 2 * a + p, :, a : a + h, p : p + w] for p in (0, 1)], dim=-1) for a in (0, 1)]
        up_conv = torch.stack([r.reshape(b, c, h, 2 * w) for r in rows], dim=-2).reshape(b, c, 2 * h, 2 * w)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") + block.gate(up_conv)
        second = self.stage.conv2
        return x + second.gate(self.second_conv(second.activ(second.norm(x))))


class TclHeadGraph(nn.Module):
    """tokens [B,1+G*G,W] -> dense [B,E,4G,4G] and kp_feat [B,E,G,G], both L2-normalized over E (in fp32).

    Computes the model's `grounder_dense` with each decoder stage's first conv in polyphase form
    (`PolyphaseUpConv`), and `kp_features` as is.
    """

    def __init__(self, model: nn.Module, grid: int, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.grid = (grid, grid)
        self.dtype = dtype
        head = model.masker.image_encoder.decoder
        self.stages = nn.ModuleList(PolyphaseUpConv(stage, dtype) for stage in head.decoder.net)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(self.dtype)
        x = self.model.grounder_block.forward_self_only(tokens)
        x = self.model._tokens_to_map(x, self.grid)
        for stage in self.stages:
            x = stage(x)
        dense = self.model.masker.image_encoder.decoder.image_proj(x)
        kp_feat = self.model.kp_features(tokens, self.grid)
        return _l2_normalize(dense, 1), _l2_normalize(kp_feat, 1)


def _cosine_map(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """cos [B,N,h,w] between normalized features [B,E,h,w] and normalized text [N,E], by Reshape + MatMul."""
    b, e, h, w = features.shape
    flat = features.reshape(b, e, h * w)  # [B,E,hw]
    cos = torch.matmul(text, flat)  # [N,E] x [B,E,hw] -> [B,N,hw]
    return cos.reshape(b, text.shape[0], h, w)


class MaskHeadGraph(nn.Module):
    """Sim2Mask and the kp branch on L2-normalized inputs.

    masks    = sigmoid(w * cos(dense, text) + b)                                 [B,N,h,w]
    kp_masks = bilinear_up(sigmoid((cos(kp_feat, text) - kp_shift) * kp_scale))  [B,N,h,w]
    """

    def __init__(self, w: float, b: float, kp_shift: float = KP_SHIFT, kp_scale: float = KP_SCALE):
        super().__init__()
        self.register_buffer("w", torch.tensor(float(w)), persistent=False)
        self.register_buffer("b", torch.tensor(float(b)), persistent=False)
        self.kp_shift = float(kp_shift)
        self.kp_scale = float(kp_scale)

    def forward(
        self, dense: torch.Tensor, kp_feat: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        masks = torch.sigmoid(_cosine_map(dense, text) * self.w + self.b)
        kp = torch.sigmoid((_cosine_map(kp_feat, text) - self.kp_shift) * self.kp_scale)
        kp_masks = F.interpolate(kp, size=dense.shape[-2:], mode="bilinear", align_corners=False)
        return masks, kp_masks


def align_corners_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] weights of PyTorch's 1-D bilinear resize with align_corners=True.

    Made by resizing an identity matrix with PyTorch itself, so every weight is bit-identical to what
    F.interpolate uses (the other axis keeps its size, where align_corners=True is the identity).
    """
    eye = torch.eye(in_size, dtype=torch.float32)[None, None]  # [1, 1, in, in]
    return F.interpolate(eye, size=(out_size, in_size), mode="bilinear", align_corners=True)[0, 0]


class PamrGraph(nn.Module):
    """pixels [B,3,S,S], masks [B,N,S/4,S/4] -> refined [B,N,S/4,S/4].

    The image is resized in the graph to the mask size, bilinearly with align_corners=True, as two MatMuls with
    constant weight matrices (columns, then rows) instead of a Resize node: PAMR divides colour differences by
    0.1 x a local std, which magnifies the last-bit differences of ONNX Runtime's Resize coordinates into
    1e-3-sized mask differences; the matrices reproduce PyTorch's weights exactly.
    """

    def __init__(self, pamr: nn.Module, crop_size: int, mask_size: int):
        super().__init__()
        self.pamr = pamr
        rows = align_corners_matrix(crop_size, mask_size)  # [m, S]
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols_t", rows.t().contiguous(), persistent=False)  # [S, m]

    def forward(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        image = torch.matmul(self.rows, torch.matmul(pixels, self.cols_t))  # [B,3,m,m]
        return self.pamr(image, masks)


class _Fp32LayerNorm(nn.Module):
    """Runs a LayerNorm in fp32 whatever the input dtype, and returns the input dtype."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def half_with_fp32_layernorms(model: nn.Module) -> nn.Module:
    """A copy of `model` in fp16 whose LayerNorms (any module that is an nn.LayerNorm) compute in fp32."""
    half = copy.deepcopy(model).half()
    for parent in list(half.modules()):
        if isinstance(parent, _Fp32LayerNorm):
            continue
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, child_name, _Fp32LayerNorm(child))
    return half
