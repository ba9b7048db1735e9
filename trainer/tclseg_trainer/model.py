"""TCL (Text-grounded Contrastive Learning, CVPR 2023): frozen CLIP ViT + a trainable grounder.

Inference path for one crop (`TCL.generate_masks`):

    pixels --CLIP blocks 1..L-1 (frozen trunk)--> tokens
    tokens --copy of block L, self-only--> drop CLS --GDecoder (2x up, 2x up)--> image_proj --> E  (stride 4)
    masks = sigmoid(w * cos(E, text) + b)              (Sim2Mask; w, b learned)
    optional PAMR on the masks, then the "kp" blend with raw MaskCLIP masks from the frozen block L
    bilinear up to the padded crop, padding cropped off.

Every grounder part starts as a copy of CLIP, and the decoder gates start at zero, so at initialisation the
grounder is exactly MaskCLIP upsampled 4x (nearest).

This is the model as trained and the reference for every parity test; `export_graphs.py` is the same function as it
ships in a bundle (the graphs the Rust runtime runs).

Module and parameter names mirror the official implementation (kakaobrain/tcl, models/tcl/*.py) so that the
released grounder-only `tcl.pth` loads into this class unchanged:

    clip_text_encoder.*                              frozen CLIP text encoder (OpenAI names below it)
    clip_image_encoder.clip_visual.*                 frozen ViT trunk (conv1, embeddings, ln_pre, all blocks)
    clip_image_encoder.clip_proj.{ln.*, proj}        CLIP's ln_post + proj, moved out of the ViT
    masker.image_encoder.backbone.transformer.resblocks.<L-1>.*   trainable copy of the last block
    masker.image_encoder.decoder.decoder.net.<i>.{conv,conv2}.{norm.*, conv.*, gate.gate}   GDecoder
    masker.image_encoder.decoder.image_proj.{ln.*, proj}          trainable copy of ln_post + proj
    masker.sim2mask.{w, b}
    tcli_loss.logit_scale, tclf_loss.logit_scale     training temperatures
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .clip import LNProj, ResidualAttentionBlock, TextConfig, TextTransformer, VisionConfig, VisionTrunk
from .pamr import PAMR

# ImageNet statistics on 0..1 pixels. TCL inherited them from GroupViT instead of CLIP's own; keep them, the
# checkpoint was trained with them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The 9 "custom" prompt templates of the official evaluation (CLIP's 7-template subset + two plurals).
TEMPLATES = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
)

# The kp branch maps MaskCLIP cosine similarity s to sigmoid((s - KP_SHIFT) * KP_SCALE).
KP_SHIFT = 0.25
KP_SCALE = 10.0
NORMALIZE_EPS = 1e-6  # official `us.normalize`: large eps so fp16 does not divide by ~0
TEXT_CHUNK = 1024  # prompts per text-encoder call in build_text_embedding


def normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 normalisation with the official eps."""
    return F.normalize(x, dim=dim, eps=NORMALIZE_EPS)


@dataclass
class TCLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder_layers: int = 2  # GDecoder stages, each a 2x nearest upsample + two gated residual convs
    decoder_kernel_size: int = 3
    sim2mask_init_w: float = 10.0
    sim2mask_init_b: float = -2.5

    @property
    def mask_stride(self) -> int:
        return self.vision.patch_size // (2**self.decoder_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TCLConfig:
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TCLConfig fields: {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)


SIZES = {
    # OpenAI CLIP ViT-B/16, as the released TCL uses it.
    "vit-b16": TCLConfig(
        vision=VisionConfig(width=768, layers=12, heads=12, patch_size=16, image_size=224, embed_dim=512),
        text=TextConfig(width=512, layers=12, heads=8, context_length=77, vocab_size=49408, embed_dim=512),
    ),
    # A few-MB model with the same structure, for tests and fixture bundles.
    "tiny": TCLConfig(
        vision=VisionConfig(width=32, layers=3, heads=2, patch_size=16, image_size=224, embed_dim=16),
        text=TextConfig(width=16, layers=2, heads=2, context_length=77, vocab_size=49408, embed_dim=16),
    ),
    # The synthetic world's built-in model (models/synthetic-shapes, issue 21): twice tiny's width and one more block.
    # With the same pretraining and TCL schedule it scores 72.6 held-out mIoU against tiny's 63.9 (200 images;
    # trainer/notes/synthetic-diagnosis.md, section 8).
    "small": TCLConfig(
        vision=VisionConfig(width=64, layers=4, heads=4, patch_size=16, image_size=224, embed_dim=32),
        text=TextConfig(width=32, layers=2, heads=2, context_length=77, vocab_size=49408, embed_dim=32),
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Grounder parts


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (eps 1e-5, affine); computed in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(
            x.permute(0, 2, 3, 1).float(),
            self.normalized_shape,
            self.weight.float(),
            self.bias.float(),
            self.eps,
        )
        return y.permute(0, 3, 1, 2).to(x.dtype)


class Gate(nn.Module):
    """tanh(g) * x with a scalar g starting at 0: a new residual branch starts switched off."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gate) * x


class ConvBlock(nn.Module):
    """Pre-activation conv: LN2d -> GELU -> conv (bias, zero padding) -> gate."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.activ = nn.GELU()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(self.activ(self.norm(x))))


class ResConv(nn.Module):
    """One decoder stage: nearest 2x upsample, then two gated pre-activation residual convs."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = ConvBlock(channels, kernel_size)
        self.conv2 = ConvBlock(channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = x + self.conv(x)
        x = x + self.conv2(x)
        return x


class GDecoder(nn.Module):
    def __init__(self, channels: int, n_layers: int, kernel_size: int):
        super().__init__()
        self.net = nn.Sequential(*[ResConv(channels, kernel_size) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Sim2Mask(nn.Module):
    """Soft mask sigmoid(w * sim + b) with learnable scalars (trained values live in the checkpoint)."""

    def __init__(self, init_w: float, init_b: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(sim * self.w + self.b)


class LogitScale(nn.Module):
    """A learnable contrastive temperature, log(1/0.07) at init (used by training only)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


# The classes below only give the official nesting (and therefore the official key names).


class CLIPImageEncoder(nn.Module):
    def __init__(self, vision: VisionConfig):
        super().__init__()
        self.clip_visual = VisionTrunk(vision)
        self.clip_proj = LNProj(vision.width, vision.embed_dim)


class MaskerBackbone(nn.Module):
    def __init__(self, vision: VisionConfig):
        super().__init__()
        self.transformer = nn.Module()
        # Officially a slice of CLIP's nn.Sequential, which keeps the original index as the key ("11").
        self.transformer.resblocks = nn.ModuleDict(
            {str(vision.layers - 1): ResidualAttentionBlock(vision.width, vision.heads)}
        )

    @property
    def block(self) -> ResidualAttentionBlock:
        return next(iter(self.transformer.resblocks.values()))


class DecoderWithProj(nn.Module):
    def __init__(self, cfg: TCLConfig):
        super().__init__()
        self.decoder = GDecoder(cfg.vision.width, cfg.decoder_layers, cfg.decoder_kernel_size)
        self.image_proj = LNProj(cfg.vision.width, cfg.vision.embed_dim)


class MaskerImageEncoder(nn.Module):
    def __init__(self, cfg: TCLConfig):
        super().__init__()
        self.backbone = MaskerBackbone(cfg.vision)
        self.decoder = DecoderWithProj(cfg)


class Masker(nn.Module):
    def __init__(self, cfg: TCLConfig):
        super().__init__()
        self.image_encoder = MaskerImageEncoder(cfg)
        self.sim2mask = Sim2Mask(cfg.sim2mask_init_w, cfg.sim2mask_init_b)


def compute_padsize(H: int, W: int, patch_size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding up to a multiple of the patch; the odd pixel goes right/bottom."""
    pad_w = (-W) % patch_size
    pad_h = (-H) % patch_size
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


# ----------------------------------------------------------------------------------------------------------


class TCL(nn.Module):
    def __init__(self, config: TCLConfig | None = None, seed: int | None = None):
        super().__init__()
        config = config if config is not None else SIZES["vit-b16"]
        self.config = config
        self.patch_size = config.vision.patch_size
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.clip_text_encoder = TextTransformer(config.text)
            self.clip_image_encoder = CLIPImageEncoder(config.vision)
            self.masker = Masker(config)
            self.tcli_loss = LogitScale()
            self.tclf_loss = LogitScale()
        self.pamr = PAMR()  # constant buffers only, nothing in the state dict
        # Where the weights came from; checkpoint loaders overwrite it.
        self.provenance: dict = {"source": "random", "seed": seed}
        self.init_grounder_from_clip()
        self.clip_text_encoder.requires_grad_(False)
        self.clip_image_encoder.requires_grad_(False)
        self.train(False)

    # --- construction helpers ---------------------------------------------------------------------------

    @property
    def trunk(self) -> VisionTrunk:
        return self.clip_image_encoder.clip_visual

    @property
    def grounder_block(self) -> ResidualAttentionBlock:
        return self.masker.image_encoder.backbone.block

    @torch.no_grad()
    def init_grounder_from_clip(self) -> None:
        """Copy CLIP's last block and ln_post/proj into the grounder (so it starts as MaskCLIP)."""
        self.grounder_block.load_state_dict(self.trunk.transformer.resblocks[-1].state_dict())
        self.masker.image_encoder.decoder.image_proj.load_state_dict(self.clip_image_encoder.clip_proj.state_dict())

    def train(self, mode: bool = True) -> TCL:
        super().train(mode)
        # The CLIP encoders are frozen for good: always in eval mode.
        self.clip_text_encoder.eval()
        self.clip_image_encoder.eval()
        return self

    # --- the pieces the exported graphs are made of -------------------------------------------------------
    # export_graphs.py wraps these into the head as it ships (one nn.Module per bundle graph; the decoder there
    # runs as polyphase/Winograd convolutions that compute the same function with fewer multiplies).

    def resized_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Positional table [1 + h*w, width] for a patch grid, bicubic-resized from the training grid."""
        return self.trunk.resized_pos_embed(grid_hw)

    def trunk_tokens(self, pixels: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [B, 3, H, W] (ImageNet-normalised, H, W multiples of the patch) -> [B, 1 + h*w, width].

        Runs the frozen CLIP blocks 1..L-1 with ordinary attention; the result feeds both heads.
        `pos_embed` overrides the resized table (export bakes a constant for a fixed crop).
        """
        x = self.trunk.embed(pixels, pos_embed)
        for block in self.trunk.transformer.resblocks[:-1]:
            x = block(x)
        return x

    def _tokens_to_map(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """[B, 1 + h*w, C] -> [B, C, h, w], dropping CLS."""
        h, w = int(grid_hw[0]), int(grid_hw[1])
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def grounder_dense(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Grounder embedding E [B, embed_dim, 4h, 4w], not normalised."""
        x = self.grounder_block.forward_self_only(tokens)
        x = self._tokens_to_map(x, grid_hw)
        head = self.masker.image_encoder.decoder
        return head.image_proj(head.decoder(x))

    def kp_features(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """MaskCLIP features [B, embed_dim, h, w], not normalised: frozen self-only block L, ln_post, proj."""
        x = self.trunk.transformer.resblocks[-1].forward_self_only(tokens)
        return self.clip_image_encoder.clip_proj(self._tokens_to_map(x, grid_hw))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, 77] int64 -> [T, embed_dim], not normalised."""
        return self.clip_text_encoder.encode_text(tokens)

    # --- inference ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def build_text_embedding(
        self,
        class_names: Sequence[str],
        templates: Sequence[str],
        tokenizer: Callable[[list[str]], torch.Tensor],
    ) -> torch.Tensor:
        """[N, embed_dim], normalised. Per class the *un-normalised* template embeddings are averaged, then
        the mean is normalised (TCL's recipe; CLIP's normalises each template first)."""
        prompts = [t.format(name) for name in class_names for t in templates]
        tokens = tokenizer(prompts).to(self.clip_text_encoder.token_embedding.weight.device)
        emb = torch.cat([self.encode_text(tokens[i : i + TEXT_CHUNK]) for i in range(0, len(prompts), TEXT_CHUNK)])
        emb = emb.reshape(len(class_names), len(templates), -1).mean(dim=1)
        return normalize(emb, dim=-1)

    @staticmethod
    def cosine_map(features: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """cos(features[b, :, y, x], text[n]) -> [B, N, h, w] (a MatMul, not an einsum)."""
        B, E, h, w = features.shape
        f = normalize(features, dim=1).reshape(B, E, h * w)
        t = normalize(text_emb, dim=-1)
        return (t.to(f.dtype) @ f).reshape(B, -1, h, w)

    @torch.no_grad()
    def generate_masks(
        self, image: torch.Tensor, text_emb: torch.Tensor, apply_pamr: bool = False, kp_w: float = 0.3
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft masks for one batch of crops, as the official `TCL.generate_masks`.

        image [B, 3, H, W] ImageNet-normalised (any size), text_emb [N, embed_dim].
        Returns masks [B, N, H, W] and the grounder's cosine map [B, N, h', w'] (stride 4, padded input).
        """
        H, W = image.shape[-2:]
        pad = compute_padsize(H, W, self.patch_size)
        if any(pad):
            image = F.pad(image, pad)  # zeros after normalisation: mean-coloured padding
        pH, pW = image.shape[-2:]
        grid = (pH // self.patch_size, pW // self.patch_size)

        tokens = self.trunk_tokens(image)
        simmap = self.cosine_map(self.grounder_dense(tokens, grid), text_emb)
        masks = self.masker.sim2mask(simmap)

        if apply_pamr:
            small = F.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
            masks = self.pamr(small, masks)

        if kp_w:
            # Raw MaskCLIP masks from the frozen CLIP, blended in after PAMR (so they are not refined).
            kp_sim = self.cosine_map(self.kp_features(tokens, grid), text_emb)
            kp = torch.sigmoid((kp_sim - KP_SHIFT) * KP_SCALE)
            kp = F.interpolate(kp, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            masks = kp_w * kp + (1.0 - kp_w) * masks

        masks = F.interpolate(masks, size=(pH, pW), mode="bilinear", align_corners=False)
        left, _, top, _ = pad
        masks = masks[:, :, top : top + H, left : left + W]
        return masks, simmap


@torch.no_grad()
def randomize_gates(model: TCL, seed: int) -> TCL:
    """Sets every decoder gate to a random value in [-1, 1] (tests and fixtures only).

    A freshly initialised TCL has all gates at 0, so its decoder convolutions contribute nothing; parity checks on
    such a model would not notice a wrong convolution. Trained checkpoints have non-zero gates.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("gate.gate"):
            param.copy_(torch.rand((), generator=gen) * 2 - 1)
    return model
