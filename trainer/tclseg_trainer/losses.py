"""TCL's training losses (tcl.md §2), written so one process and D processes give the same numbers.

Every function takes *local* tensors (this process's B images) and the *global* ones (all B*D images or
texts, gathered with `gather_with_grad`), plus `offset` = rank * B, the global index of the first local image.
Each loss is a mean over local rows; averaging the gradients over processes (as the trainer does) then gives
exactly the gradient of the one-process loss over the global batch.

    total = tcl_w * (tcli + tclf) + area_w * (area_pos + area_neg) + tv_w * (tv_emb + tv_mask)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0  # the learnable temperatures' scale is clamped at <= 100
INIT_LOGIT_SCALE = math.log(1 / 0.07)
POOL_EPS = 1e-6  # mask-pooling denominator
COS_EPS = 1e-6  # official normalisation eps


@dataclass
class LossWeights:
    tcl_w: float = 0.1
    area_w: float = 0.4
    tv_w: float = 1.0
    pos_area: float = 0.4  # target coverage of a matched caption
    neg_area: float = 0.0  # ... and of an unmatched one


# ---------------------------------------------------------------------------------------------------------
# Distributed gather that keeps gradients


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums the incoming gradients over processes and returns this one's slice.

    Works on gloo and NCCL (only all_gather and all_reduce are used).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates x from every process along dim 0 (identity with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


# ---------------------------------------------------------------------------------------------------------
# Pieces


def clamped_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) clamped at MAX_LOGIT_SCALE (the clamp stops the gradient above it, as in CLIP)."""
    return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def gumbel_sigmoid_st(
    logits: torch.Tensor,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hard {0,1} mask from a Gumbel-sigmoid sample (logistic noise), with a straight-through gradient.

    Forward: 1[sigmoid((z + g1 - g2) / tau) > 0.5]; backward: the gradient of the soft sample.
    `uniform` (same shape as logits, in (0, 1)) replaces the random draw.
    """
    u = uniform
    if u is None:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(1e-10, 1 - 1e-10)
    noise = (torch.log(u) - torch.log1p(-u)).to(logits.dtype)  # logistic = difference of two Gumbels
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """mean|x[..., :, 1:] - x[..., :, :-1]| + mean|x[..., 1:, :] - x[..., :-1, :]|."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def area_priors(
    masks: torch.Tensor, offset: int, pos_area: float = 0.4, neg_area: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, N, h, w] (local images x all texts): |mean(diagonal) - pos_area|, |mean(off-diagonal) - neg_area|.

    The diagonal of local image b is text offset + b. Means run over the whole tensor, not per sample.
    """
    B, N = masks.shape[:2]
    diag = torch.zeros(B, N, dtype=torch.bool, device=masks.device)
    diag[torch.arange(B), offset + torch.arange(B)] = True
    pos = masks[diag]  # [B, h, w]
    neg = masks[~diag]  # [B * (N - 1), h, w]
    pos_loss = (pos.mean() - pos_area).abs()
    neg_loss = (neg.mean() - neg_area).abs() if neg.numel() else masks.sum() * 0.0
    return pos_loss, neg_loss


def info_nce(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_all: torch.Tensor,
    txt_all: torch.Tensor,
    offset: int,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE: ½(CE(img -> all texts) + CE(txt -> all images)), targets at offset + row.

    img, txt [B, C] local; img_all, txt_all [N, C] global. Embeddings are L2-normalised here.
    """
    s = clamped_scale(logit_scale)
    img, txt = F.normalize(img, dim=-1, eps=COS_EPS), F.normalize(txt, dim=-1, eps=COS_EPS)
    img_all, txt_all = F.normalize(img_all, dim=-1, eps=COS_EPS), F.normalize(txt_all, dim=-1, eps=COS_EPS)
    target = offset + torch.arange(img.shape[0], device=img.device)
    loss_i = F.cross_entropy(s * img @ txt_all.t(), target)
    loss_t = F.cross_entropy(s * txt @ img_all.t(), target)
    return 0.5 * (loss_i + loss_t)


def mask_pool(masks: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """e[b, n] = sum_p M[b,n,p] E[b,:,p] / (sum_p M[b,n,p] + 1e-6): masks [B,N,h,w], emb [B,C,h,w] -> [B,N,C]."""
    num = torch.einsum("bnhw,bchw->bnc", masks, emb)
    return num / (masks.sum(dim=(2, 3)).unsqueeze(-1) + POOL_EPS)


def extended_info_nce(
    masks: torch.Tensor, emb: torch.Tensor, txt_all: torch.Tensor, offset: int, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Feature-level TCL. masks [B, N, h, w] soft, emb [B, C, h, w] un-normalised, txt_all [N, C].

    image side: l_img[b, n] = s cos(e_bn, t_n), target n = offset + b (negatives: the same image's regions
    grounded by other captions). text side: l_txt[b, m] = s cos(e_m,offset+b, t_offset+b) over all images m
    (negatives: other images' regions grounded by the same caption).
    """
    s = clamped_scale(logit_scale)
    regions = F.normalize(mask_pool(masks, emb), dim=-1, eps=COS_EPS)  # [B, N, C]
    t = F.normalize(txt_all, dim=-1, eps=COS_EPS).to(regions.dtype)  # [N, C]
    cos = (regions * t.unsqueeze(0)).sum(-1)  # [B, N]: cos(e_bn, t_n)
    B = masks.shape[0]
    target = offset + torch.arange(B, device=masks.device)
    loss_img = F.cross_entropy(s * cos, target)
    cos_all = gather_with_grad(cos)  # [N_img, N]: every image against every text
    loss_txt = F.cross_entropy(s * cos_all[:, target].t(), target)
    return 0.5 * (loss_img + loss_txt)


# ---------------------------------------------------------------------------------------------------------
# Everything at once, for a TCL model


def clip_image_embedding(model, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP image encoder in its ordinary mode: CLS token after all blocks, ln_post, proj."""
    trunk = model.clip_image_encoder.clip_visual
    x = trunk.transformer(trunk.embed(pixels))
    return model.clip_image_encoder.clip_proj(x[:, 0])


def tcl_losses(
    model,
    images: torch.Tensor,
    text_emb: torch.Tensor,
    weights: LossWeights,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """All TCL loss terms for a local batch. images [B, 3, H, W] (ImageNet-normalised), text_emb [B, C] (the
    frozen text encoder's caption embeddings, local). Returns the terms plus "loss", their weighted sum.
    """
    B = images.shape[0]
    offset = dist.get_rank() * B if dist.is_available() and dist.is_initialized() else 0
    txt_all = gather_with_grad(text_emb)  # [N, C]
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)

    tokens = model.trunk_tokens(images)
    emb = model.grounder_dense(tokens, grid)  # [B, C, h', w'], un-normalised
    sim = model.cosine_map(emb, txt_all)  # [B, N, h', w']
    s2m = model.masker.sim2mask
    logits = sim * s2m.w + s2m.b
    masks = torch.sigmoid(logits)

    # image level: hard straight-through masks of each image's own caption, applied to the pixels
    own = logits[torch.arange(B), offset + torch.arange(B)].unsqueeze(1)  # [B, 1, h', w']
    # the noise is drawn for the global batch and sliced, so it does not depend on the number of processes
    n_img = txt_all.shape[0]
    u = torch.rand((n_img, *own.shape[1:]), generator=generator, device=own.device, dtype=torch.float32)
    hard = gumbel_sigmoid_st(own, uniform=u[offset : offset + B])
    hard = F.interpolate(hard, size=images.shape[-2:], mode="nearest")
    masked_emb = clip_image_embedding(model, images * hard.to(images.dtype))
    tcli = info_nce(masked_emb, text_emb, gather_with_grad(masked_emb), txt_all, offset, model.tcli_loss.logit_scale)

    tclf = extended_info_nce(masks, emb, txt_all, offset, model.tclf_loss.logit_scale)
    area_pos, area_neg = area_priors(masks, offset, weights.pos_area, weights.neg_area)
    tv_emb = total_variation(emb)
    tv_mask = total_variation(masks)
    terms = {
        "tcli": tcli,
        "tclf": tclf,
        "area_pos": area_pos,
        "area_neg": area_neg,
        "tv_emb": tv_emb,
        "tv_mask": tv_mask,
    }
    terms = {k: v.float() for k, v in terms.items()}
    terms["loss"] = (
        weights.tcl_w * (terms["tcli"] + terms["tclf"])
        + weights.area_w * (terms["area_pos"] + terms["area_neg"])
        + weights.tv_w * (terms["tv_emb"] + terms["tv_mask"])
    )
    return terms
