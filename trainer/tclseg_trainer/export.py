"""ONNX export of a TCL model into a model bundle (format 1, see ARCHITECTURE.md).

The bundle holds five graphs, each a thin wrapper around the model's own methods so that the exported numbers are
the reference's numbers:

    text_encoder  tokens int64 [T,77]            -> text_emb [T,E]              (not normalized)
    image_trunk   pixels [B,3,S,S]               -> tokens [B,1+G*G,W]          (CLIP blocks 1..11)
    tcl_head      tokens [B,1+G*G,W]             -> dense [B,E,4G,4G], kp_feat [B,E,G,G]  (both L2-normalized)
    mask_head     dense, kp_feat, text [N,E]     -> masks [B,N,h,w], kp_masks [B,N,h,w]
    pamr          pixels [B,3,S,S], masks        -> refined [B,N,h,w]

The bundle is written into a temporary sibling directory, every file is hashed into `model.toml`, and the
directory is renamed into place, so a reader never sees half a bundle.

Command line:
    python -m tclseg_trainer.export (--random {tiny,vit-b16} [--seed N] | --clip ViT-B-16.pt --tcl tcl.pth
                                     [--allow-unverified-clip] | --checkpoint CKPT) --out DIR [--name NAME]
                                     [--precision fp32,fp16] [--force]
Exit status: 0 written, 1 failed (one message naming the file and the problem), 2 usage error.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bundle import FORMAT, FORMAT_VERSION, MANIFEST_FILE, open_bundle, sha256_file
from .tokenizer import EOT_TOKEN, SOT_TOKEN, default_vocab_path
from .tokenizer import VOCAB_FILENAME as VOCAB_FILE

OPSET = 18

# Inference constants of the official evaluation (reference/tcl.md §4, §5).
CROP_SIZE = 448
CROP_STRIDE = 224
SHORT_SIDE = 448
LONG_SIDE_MAX = 2048
PAD_MULTIPLE = 16
MASK_STRIDE = 4
KP_WEIGHT = 0.3
KP_SHIFT = 0.25
KP_SCALE = 10.0
BG_THRESH_PAMR = 0.4
BG_THRESH = 0.5
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


def _official_templates() -> list[str]:
    from .model import TEMPLATES

    return list(TEMPLATES)


@dataclass
class BundleDefaults:
    """The inference defaults a bundle carries in model.toml, which `tclseg segment`/`serve`/`eval` use unless told
    otherwise. The official TCL evaluation settings by default; a training recipe whose world differs (the synthetic
    one: 224-pixel images, captions without photo templates) sets its own in the config's [bundle] table."""

    short_side: int = SHORT_SIDE
    kp_weight: float = KP_WEIGHT
    bg_thresh_pamr: float = BG_THRESH_PAMR
    bg_thresh: float = BG_THRESH
    templates: list[str] = field(default_factory=_official_templates)

    def problems(self) -> list[str]:
        """What is wrong with these values, as `key: reason` lines (empty when they are usable)."""
        out = []
        if self.short_side < PAD_MULTIPLE:
            out.append(f"short_side {self.short_side}: must be >= {PAD_MULTIPLE}")
        if not 0.0 <= self.kp_weight <= 1.0:
            out.append(f"kp_weight {self.kp_weight}: must be in [0, 1]")
        for key in ("bg_thresh_pamr", "bg_thresh"):
            if not 0.0 < getattr(self, key) < 1.0:
                out.append(f"{key} {getattr(self, key)}: must be in (0, 1)")
        if not self.templates:
            out.append('templates: give at least one, e.g. ["{}"]')
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                out.append(f"templates: {t!r} must contain '{{}}' exactly once (where the query name goes)")
        return out


# role -> precision -> file name in the bundle.
GRAPH_FILES = {
    "text_encoder": {"fp32": "text_encoder.onnx"},
    "image_trunk": {"fp32": "image_trunk.fp32.onnx", "fp16": "image_trunk.fp16.onnx"},
    "tcl_head": {"fp32": "tcl_head.fp32.onnx", "fp16": "tcl_head.fp16.onnx"},
    "mask_head": {"fp32": "mask_head.onnx"},
    "pamr": {"fp32": "pamr.onnx"},
}
# Roles that get an fp16 variant; the others are small or precision-sensitive and stay fp32.
FP16_ROLES = ("image_trunk", "tcl_head")

# Standard ONNX ops that ONNX Runtime's CPU and CUDA execution providers both implement (for float, float16 and,
# where relevant, int64). An exported graph with any other op type fails the export: no Einsum, no control flow,
# no custom domains.
CUDA_SAFE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "ArgMax",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "Div",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Gather",
        "GatherND",
        "Gemm",
        "Greater",
        "Identity",
        "LayerNormalization",
        "MatMul",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pad",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceL2",
        "ReduceMax",
        "ReduceMean",
        "ReduceProd",
        "ReduceSum",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Where",
    }
)


class ExportError(Exception):
    """An export that cannot be done; the message names the file or the problem."""


# ---------------------------------------------------------------------------------------------------------------
# Graph wrappers: plain nn.Modules whose forward is exactly what one bundle graph computes.


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
    fp32, from `pos_embed_model`) and baked in as a constant, so the graph has no data-dependent resize.
    """

    def __init__(self, model: nn.Module, grid: int, dtype: torch.dtype, pos_embed_model: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        source = pos_embed_model if pos_embed_model is not None else model
        with torch.no_grad():
            pos = source.resized_pos_embed((grid, grid)).detach().float()
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


# ---------------------------------------------------------------------------------------------------------------
# Reading what the export needs from the model.


def sim2mask_params(model: nn.Module) -> tuple[float, float]:
    """The learned Sim2Mask scale w and bias b (read from the model, never assumed)."""
    s2m = model.masker.sim2mask
    return float(s2m.w.detach().float().item()), float(s2m.b.detach().float().item())


def _pamr_module(model: nn.Module) -> nn.Module:
    """The model's PAMR module if it holds one, else a fresh one with the official settings."""
    for attr in ("pamr",):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return module
    from .pamr import PAMR

    return PAMR(num_iter=PAMR_ITERATIONS, dilations=PAMR_DILATIONS)


def _pamr_settings(pamr: nn.Module) -> tuple[int, list[int]]:
    iterations = getattr(pamr, "num_iter", PAMR_ITERATIONS)
    dilations = getattr(pamr, "dilations", PAMR_DILATIONS)
    return int(iterations), [int(d) for d in dilations]


# ---------------------------------------------------------------------------------------------------------------
# ONNX export of one graph.


def graph_op_types(path: Path | str) -> set[str]:
    """The op types a graph file uses (including subgraphs); ops of custom domains read 'domain::Op'."""
    import onnx

    return graph_op_types_of(onnx.load(str(path), load_external_data=False))


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Traces `module` with the TorchScript-based exporter (predictable Resize modes) into one .onnx file."""
    import onnx

    module.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (predictable Resize modes); its deprecation notice and
        # the advanced-indexing note (the EOT gather's indices are never negative) are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1.*")
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            external_data=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    unsupported = sorted(graph_op_types_of(proto) - CUDA_SAFE_OPS)
    if unsupported:
        raise ExportError(f"{path.name}: the graph uses op types outside the CUDA-safe list: {', '.join(unsupported)}")
    path.write_bytes(buffer.getvalue())


def graph_op_types_of(proto: Any) -> set[str]:
    found: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    return found


# ---------------------------------------------------------------------------------------------------------------
# The manifest, written by hand as TOML (format 1).


def _toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has '.' or 'e', a valid TOML float
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _toml_string(key)


def manifest_to_toml(manifest: dict[str, Any]) -> str:
    """Renders a manifest dict in the layout of ARCHITECTURE.md: top-level keys, tables, then [[files]]."""
    lines: list[str] = []
    tables = []
    for key, value in manifest.items():
        if key == "files":
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for entry in manifest.get("files", []):
        lines.append("")
        lines.append("[[files]]")
        for key in ("path", "sha256", "bytes"):
            lines.append(f"{key} = {_toml_value(entry[key])}")
    return "\n".join(lines) + "\n"


def build_manifest(
    model: nn.Module,
    *,
    name: str,
    version: str,
    description: str,
    provenance: dict[str, Any],
    graphs: dict[str, dict[str, str]],
    crop_size: int,
    pamr: nn.Module,
    files: list[dict[str, Any]],
    defaults: BundleDefaults | None = None,
) -> dict[str, Any]:
    cfg = model.config
    defaults = defaults or BundleDefaults()
    vision, text = cfg.vision, cfg.text
    w, b = sim2mask_params(model)
    iterations, dilations = _pamr_settings(pamr)
    from .model import MEAN, STD

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "description": description,
        "architecture": {
            "kind": "tcl",
            "vision_width": int(vision.width),
            "vision_layers": int(vision.layers),
            "vision_heads": int(vision.heads),
            "patch_size": int(vision.patch_size),
            "train_image_size": int(vision.image_size),
            "text_width": int(text.width),
            "text_layers": int(text.layers),
            "text_heads": int(text.heads),
            "context_length": int(text.context_length),
            "vocab_size": int(text.vocab_size),
            "embed_dim": int(vision.embed_dim),
            "mask_stride": MASK_STRIDE,
        },
        "input": {
            "crop_size": int(crop_size),
            "crop_stride": int(crop_size) // 2,
            "short_side": int(defaults.short_side),
            "long_side_max": LONG_SIDE_MAX,
            "pad_multiple": PAD_MULTIPLE,
            "mean": [float(v) for v in MEAN],
            "std": [float(v) for v in STD],
        },
        "mask": {
            "w": w,
            "b": b,
            "kp_weight": float(defaults.kp_weight),
            "kp_shift": KP_SHIFT,
            "kp_scale": KP_SCALE,
            "bg_thresh_pamr": float(defaults.bg_thresh_pamr),
            "bg_thresh": float(defaults.bg_thresh),
            "pamr_iterations": iterations,
            "pamr_dilations": dilations,
        },
        "text": {
            "vocabulary": VOCAB_FILE,
            "sot_token": SOT_TOKEN,
            "eot_token": EOT_TOKEN,
            "templates": list(defaults.templates),
        },
        "provenance": _provenance_table(provenance),
        "graphs": graphs,
        "files": files,
    }


def _provenance_table(provenance: dict[str, Any]) -> dict[str, Any]:
    """The [provenance] table: source, seed (random only), the three hashes (empty when not applicable), torch."""
    source = provenance.get("source")
    if source not in ("random", "official", "checkpoint"):
        raise ExportError(f"provenance source must be random, official or checkpoint, not {source!r}")
    table: dict[str, Any] = {"source": source}
    if source == "random":
        table["seed"] = int(provenance.get("seed", 0))
    for key in ("clip_sha256", "tcl_sha256", "checkpoint_sha256"):
        table[key] = str(provenance.get(key, "") or "")
    table["torch_version"] = str(provenance.get("torch_version") or torch.__version__.split("+")[0])
    for key, value in provenance.items():  # anything else the caller records (e.g. the checkpoint's step)
        if key not in table and isinstance(value, str | int | float | bool):
            table[key] = value
    return table


# ---------------------------------------------------------------------------------------------------------------
# Writing the bundle directory atomically.


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _install(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    """Renames the finished `tmp_dir` to `out_dir`; with force, replaces an existing out_dir atomically enough:
    the old one is renamed away first, the new one renamed in, then the old one deleted."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp_dir, out_dir)
        _fsync_dir(out_dir.parent)
        return
    if not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    os.rename(out_dir, old)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the previous bundle back
        raise
    _fsync_dir(out_dir.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _log(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def export_bundle(
    model: nn.Module,
    out_dir: Path | str,
    *,
    name: str | None = None,
    version: str = "1",
    description: str = "",
    provenance: dict[str, Any],
    precisions: Iterable[str] = ("fp32", "fp16"),
    crop_size: int = CROP_SIZE,
    vocab_path: Path | str,
    force: bool = False,
    log: Callable[[str], None] | None = _log,
    defaults: BundleDefaults | None = None,
) -> dict[str, Any]:
    """Exports `model` into a bundle at `out_dir` and returns the manifest (as written to model.toml).

    `precisions` chooses the image graphs' variants; fp32 is required. An existing `out_dir` is refused unless
    `force` is set; nothing is left behind when the export fails. `defaults` are the inference settings written
    into model.toml (default: the official TCL ones).
    """
    log = log or (lambda _m: None)
    if defaults is not None and (bad := defaults.problems()):
        raise ExportError("bundle defaults: " + "; ".join(bad))
    out_dir = Path(out_dir)
    precisions = list(dict.fromkeys(precisions))
    if "fp32" not in precisions:
        raise ExportError("the fp32 graphs are always exported: precisions must include fp32")
    if unknown := [p for p in precisions if p not in ("fp32", "fp16")]:
        raise ExportError(f"unknown precision(s) {', '.join(unknown)}; known: fp32, fp16")
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise ExportError(f"{vocab_path}: the BPE vocabulary file does not exist")
    patch = int(model.config.vision.patch_size)
    if crop_size <= 0 or crop_size % patch != 0:
        raise ExportError(f"crop_size {crop_size} must be a positive multiple of the patch size {patch}")
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise ExportError(f"{out_dir.parent}: the output's parent directory does not exist")
    name = name or out_dir.name
    grid = crop_size // patch
    pamr = _pamr_module(model)

    model = model.eval()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        graphs = _write_graphs(model, pamr, tmp_dir, grid=grid, crop_size=crop_size, precisions=precisions, log=log)
        shutil.copyfile(vocab_path, tmp_dir / VOCAB_FILE)

        files = []
        for path in sorted(tmp_dir.iterdir()):
            _fsync_file(path)
            files.append({"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size})
        manifest = build_manifest(
            model,
            name=name,
            version=version,
            description=description,
            provenance=provenance,
            graphs=graphs,
            crop_size=crop_size,
            pamr=pamr,
            files=files,
            defaults=defaults,
        )
        manifest_path = tmp_dir / MANIFEST_FILE
        manifest_path.write_text(manifest_to_toml(manifest), encoding="utf-8")
        _fsync_file(manifest_path)
        open_bundle(tmp_dir, verify=False)  # the manifest reads back and passes the loader's checks
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp made it private; a bundle is an ordinary directory
        _fsync_dir(tmp_dir)
        _install(tmp_dir, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in manifest["files"])
    log(f"wrote {out_dir} ({len(manifest['files'])} files, {total / 1e6:.1f} MB)")
    return manifest


def _write_graphs(
    model: nn.Module,
    pamr: nn.Module,
    tmp_dir: Path,
    *,
    grid: int,
    crop_size: int,
    precisions: list[str],
    log: Callable[[str], None],
) -> dict[str, dict[str, str]]:
    """Exports every graph into tmp_dir; returns the [graphs] table."""
    cfg = model.config
    width, embed = int(cfg.vision.width), int(cfg.vision.embed_dim)
    context = int(cfg.text.context_length)
    side = grid * MASK_STRIDE
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def unit(*shape: int, dim: int) -> torch.Tensor:
        x = rand(*shape)
        return x / x.norm(dim=dim, keepdim=True)

    graphs: dict[str, dict[str, str]] = {}

    def timed(role: str, precision: str, fn: Callable[[Path], None]) -> None:
        file = GRAPH_FILES[role][precision]
        start = time.perf_counter()
        fn(tmp_dir / file)
        size = (tmp_dir / file).stat().st_size
        log(f"{file}: {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB")
        graphs.setdefault(role, {})[precision] = file

    tokens = torch.zeros(2, context, dtype=torch.long)
    tokens[:, 0] = SOT_TOKEN
    tokens[0, 1:4] = torch.tensor([320, 1929, EOT_TOKEN])
    tokens[1, 1:3] = torch.tensor([1929, EOT_TOKEN])
    timed(
        "text_encoder",
        "fp32",
        lambda p: _export_graph(
            TextEncoderGraph(model),
            (tokens,),
            p,
            ["tokens"],
            ["text_emb"],
            {"tokens": {0: "T"}, "text_emb": {0: "T"}},
        ),
    )

    pixels = rand(2, 3, crop_size, crop_size)
    trunk_tokens = rand(2, 1 + grid * grid, width)
    half_model = half_with_fp32_layernorms(model) if "fp16" in precisions else None
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.float16
        variant = model if precision == "fp32" else half_model
        timed(
            "image_trunk",
            precision,
            lambda p, v=variant, d=dtype: _export_graph(
                ImageTrunkGraph(v, grid, d, pos_embed_model=model),
                (pixels,),
                p,
                ["pixels"],
                ["tokens"],
                {"pixels": {0: "B"}, "tokens": {0: "B"}},
            ),
        )
        timed(
            "tcl_head",
            precision,
            lambda p, v=variant, d=dtype: _export_graph(
                TclHeadGraph(v, grid, d),
                (trunk_tokens,),
                p,
                ["tokens"],
                ["dense", "kp_feat"],
                {"tokens": {0: "B"}, "dense": {0: "B"}, "kp_feat": {0: "B"}},
            ),
        )
    del half_model

    w, b = sim2mask_params(model)
    timed(
        "mask_head",
        "fp32",
        lambda p: _export_graph(
            MaskHeadGraph(w, b),
            (unit(2, embed, side, side, dim=1), unit(2, embed, grid, grid, dim=1), unit(3, embed, dim=1)),
            p,
            ["dense", "kp_feat", "text"],
            ["masks", "kp_masks"],
            {
                "dense": {0: "B", 2: "h", 3: "w"},
                "kp_feat": {0: "B", 2: "g_h", 3: "g_w"},
                "text": {0: "N"},
                "masks": {0: "B", 1: "N", 2: "h", 3: "w"},
                "kp_masks": {0: "B", 1: "N", 2: "h", 3: "w"},
            },
        ),
    )
    timed(
        "pamr",
        "fp32",
        lambda p: _export_graph(
            PamrGraph(pamr, crop_size, side),
            (pixels, torch.sigmoid(rand(2, 3, side, side))),
            p,
            ["pixels", "masks"],
            ["refined"],
            {"pixels": {0: "B"}, "masks": {0: "B", 1: "N"}, "refined": {0: "B", 1: "N"}},
        ),
    )
    return graphs


# ---------------------------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit status 2 with argparse's usage line
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m tclseg_trainer.export",
        description="Export a TCL model as a tclseg model bundle (ONNX graphs + model.toml).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--random", choices=["tiny", "vit-b16"], help="random weights of a named size")
    src.add_argument("--clip", type=Path, metavar="FILE", help="OpenAI CLIP ViT-B-16.pt (with --tcl)")
    src.add_argument("--checkpoint", type=Path, metavar="FILE", help="a trainer checkpoint")
    p.add_argument("--tcl", type=Path, metavar="FILE", help="the official TCL checkpoint tcl.pth (with --clip)")
    p.add_argument(
        "--allow-unverified-clip",
        action="store_true",
        help="accept a --clip file whose sha256 is not OpenAI's ViT-B/16 (a re-hosted copy, a fine-tuned CLIP): "
        "its weights are then unchecked, and the bundle records that and the file's sha256",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for --random (default 0)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to create")
    p.add_argument("--name", help="bundle name (default: the output directory's name)")
    p.add_argument("--version", default="1", help="bundle version string (default 1)")
    p.add_argument("--description", default=None, help="one-line description")
    p.add_argument("--precision", default="fp32,fp16", help="image-graph precisions, comma-separated (fp32 required)")
    p.add_argument("--crop-size", type=int, default=CROP_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=Path, default=None, help="BPE vocabulary (default: .deps/clip or TCLSEG_BPE_VOCAB)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument(
        "--defaults-from",
        type=Path,
        metavar="CONFIG",
        help="take the bundle's inference defaults from this training config's [bundle] table "
        "(default: the checkpoint's own training config, else the official settings)",
    )
    args = p.parse_args(argv)
    if args.clip is not None and args.tcl is None:
        p.error("--clip needs --tcl")
    if args.tcl is not None and args.clip is None:
        p.error("--tcl needs --clip")
    if args.allow_unverified_clip and args.clip is None:
        p.error("--allow-unverified-clip only applies to --clip")
    if args.seed is not None and args.random is None:
        p.error("--seed only applies to --random")
    precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    if not precisions or any(s not in ("fp32", "fp16") for s in precisions):
        p.error(f"--precision {args.precision!r}: give fp32 or fp32,fp16")
    if "fp32" not in precisions:
        p.error("--precision must include fp32 (every bundle has fp32 graphs)")
    args.precisions = precisions
    return args


def bundle_defaults_from(table: Any, where: str) -> BundleDefaults:
    """BundleDefaults from a [bundle] table (a dict); unknown keys and wrong values are errors naming `where`."""
    if not isinstance(table, dict):
        raise ExportError(f"{where}: [bundle] must be a table")
    known = {f.name for f in fields(BundleDefaults)}
    if unknown := sorted(set(table) - known):
        raise ExportError(
            f"{where}: unknown key(s) bundle.{', bundle.'.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    try:
        defaults = BundleDefaults(**table)
    except TypeError as e:
        raise ExportError(f"{where}: [bundle]: {e}") from None
    if bad := defaults.problems():
        raise ExportError(f"{where}: bundle." + "; bundle.".join(bad))
    return defaults


def _defaults_from_config_file(path: Path) -> BundleDefaults:
    import tomllib

    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("bundle", {})
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file (--defaults-from takes a training config)") from None
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"{path}: invalid TOML: {e}") from None
    return bundle_defaults_from(table, str(path))


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], str]:
    """The model, its provenance and a default description, from the command line's source. For a trainer
    checkpoint, `args.defaults` becomes its training config's [bundle] table unless --defaults-from set it."""
    torch_version = torch.__version__.split("+")[0]
    if args.random is not None:
        from .model import SIZES, TCL

        seed = 0 if args.seed is None else args.seed
        model = TCL(SIZES[args.random], seed=seed)
        provenance = {"source": "random", "seed": seed, "torch_version": torch_version}
        return model, provenance, f"random {args.random} TCL (seed {seed}); for tests, not for use"
    if args.clip is not None:
        from .checkpoints import build_official

        for path in (args.clip, args.tcl):
            if not path.is_file():
                raise ExportError(f"{path}: no such file")
        clip_sha256, verified = check_clip_hash(args.clip, allow_unverified=args.allow_unverified_clip)
        # The hash was checked (or knowingly waived) above; build_official need not read the file twice for it.
        built = build_official(args.clip, args.tcl, clip_sha256=None)
        model, hashes = _split_model_and_meta(built)
        provenance = {
            "source": "official",
            "clip_sha256": hashes.get("clip_sha256") or clip_sha256,
            "clip_verified": verified,
            "tcl_sha256": hashes.get("tcl_sha256") or sha256_file(args.tcl),
            "torch_version": torch_version,
        }
        description = "TCL (CVPR 2023), official checkpoint on OpenAI CLIP ViT-B/16"
        if not verified:
            description = f"TCL (CVPR 2023), official-format checkpoint on an unverified CLIP (sha256 {clip_sha256})"
        return model, provenance, description
    from .checkpoints import load_checkpoint

    if not args.checkpoint.is_file():
        raise ExportError(f"{args.checkpoint}: no such file")
    model, meta = load_checkpoint(args.checkpoint)
    meta = meta if isinstance(meta, dict) else {}
    train_config = meta.get("train_config")
    if args.defaults is None and isinstance(train_config, dict) and "bundle" in train_config:
        args.defaults = bundle_defaults_from(train_config["bundle"], f"{args.checkpoint} (its training config)")
    provenance = {
        "source": "checkpoint",
        "checkpoint_sha256": meta.get("sha256") or meta.get("checkpoint_sha256") or sha256_file(args.checkpoint),
        "torch_version": torch_version,
    }
    return model, provenance, f"TCL trained by tclseg ({args.checkpoint.name})"


def check_clip_hash(path: Path, *, allow_unverified: bool) -> tuple[str, bool]:
    """(the file's sha256, whether it is OpenAI's ViT-B/16). A different file is refused unless `allow_unverified`:
    the pinned hash is what vouches for the weights, so waiving it is the user's explicit, logged decision."""
    from .checkpoints import OPENAI_VIT_B16_SHA256

    found = sha256_file(path)
    if found == OPENAI_VIT_B16_SHA256:
        return found, True
    if not allow_unverified:
        raise ExportError(
            f"{path}: sha256 {found} is not OpenAI's CLIP ViT-B/16 ({OPENAI_VIT_B16_SHA256}); if you trust this file "
            "(a re-hosted copy, a fine-tuned CLIP), pass --allow-unverified-clip to use it anyway"
        )
    _log(
        f"warning: {path}: sha256 {found} is not OpenAI's CLIP ViT-B/16 ({OPENAI_VIT_B16_SHA256}); using it "
        "anyway (--allow-unverified-clip); the bundle records clip_verified = false and this sha256"
    )
    return found, False


def _split_model_and_meta(built: Any) -> tuple[nn.Module, dict[str, Any]]:
    """build_official may return the model alone or (model, info); take the hashes from wherever they are."""
    if isinstance(built, tuple):
        model, info = built[0], built[1] if len(built) > 1 else {}
    else:
        model, info = built, getattr(built, "provenance", {})
    return model, dict(info) if isinstance(info, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from .checkpoints import CheckpointError

    start = time.perf_counter()
    try:
        if args.out.exists() and not args.force:
            raise ExportError(f"{args.out} already exists; pass --force to replace it")
        args.defaults = _defaults_from_config_file(args.defaults_from) if args.defaults_from else None
        vocab = args.vocab or default_vocab_path()
        if not vocab.is_file():
            raise ExportError(f"{vocab}: the BPE vocabulary file does not exist (run scripts/setup)")
        model, provenance, description = _load_model(args)
        _log(f"model ready in {time.perf_counter() - start:.1f} s; exporting to {args.out}")
        export_bundle(
            model,
            args.out,
            name=args.name,
            version=args.version,
            description=args.description if args.description is not None else description,
            provenance=provenance,
            precisions=args.precisions,
            crop_size=args.crop_size,
            vocab_path=vocab,
            force=args.force,
            defaults=args.defaults,
        )
    except (ExportError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = e.filename if e.filename else "a file"
        print(f"export: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 1
    _log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
