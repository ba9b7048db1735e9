"""Each TCL loss against a small case worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tclseg_trainer.losses import (
    LossWeights,
    area_priors,
    clamped_scale,
    extended_info_nce,
    gumbel_sigmoid_st,
    info_nce,
    mask_pool,
    tcl_losses,
    total_variation,
)

# 1 torch thread for these tests (cores are shared), restored afterwards: other modules assume 2.
pytestmark = pytest.mark.usefixtures("one_thread")


L1E = math.log(1 + math.exp(-1))  # CE of logits (1, 0) with target 0


def test_total_variation_hand_case():
    x = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    # horizontal |2-1|, |8-4| -> mean 2.5; vertical |4-1|, |8-2| -> mean 4.5
    assert total_variation(x).item() == pytest.approx(7.0)


def test_area_priors_hand_case():
    m = torch.tensor([[0.5, 0.2], [0.1, 0.9]]).reshape(2, 2, 1, 1)
    pos, neg = area_priors(m, offset=0, pos_area=0.4, neg_area=0.0)
    assert pos.item() == pytest.approx(0.3)  # |mean(0.5, 0.9) - 0.4|
    assert neg.item() == pytest.approx(0.15)  # |mean(0.2, 0.1) - 0|
    # second process of two: its local image 0 is global text 2
    m2 = torch.zeros(1, 3, 1, 1)
    m2[0, 2] = 1.0
    pos, neg = area_priors(m2, offset=2)
    assert pos.item() == pytest.approx(0.6) and neg.item() == pytest.approx(0.0)


def test_info_nce_hand_case_and_clamp():
    e = torch.eye(2)
    loss = info_nce(e, e, e, e, 0, torch.tensor(0.0))  # scale 1: logits [[1, 0], [0, 1]]
    assert loss.item() == pytest.approx(L1E, rel=1e-5)
    # swapped texts: logits [[0, 1], [1, 0]], target on the 0 -> CE = log(1 + e)
    t = e.flip(0)
    assert info_nce(e, t, e, t, 0, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.e), rel=1e-5)
    big = torch.tensor(math.log(200.0), requires_grad=True)
    s = clamped_scale(big)
    assert s.item() == pytest.approx(100.0)
    s.backward()
    assert big.grad.item() == 0.0  # clamped: no gradient pushes it further


def test_mask_pool_hand_case():
    masks = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    emb = torch.tensor([3.0, 5.0]).reshape(1, 1, 1, 2)
    assert mask_pool(masks, emb).item() == pytest.approx(3.0 / (1 + 1e-6))
    half = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2)
    assert mask_pool(half, emb).item() == pytest.approx(4.0, rel=1e-5)


def test_extended_info_nce_hand_case():
    # image 0: pixel 0 = [1, 0], pixel 1 = [0, 1]; image 1 swapped. Texts t0 = [1, 0], t1 = [0, 1].
    emb = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])  # [2, 2, 1, 2]
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[1.0, 0.0]]]])  # [2, 2, 1, 2]
    # regions: (0,0) = [1,0], (0,1) = [0,1], (1,0) = [0,1], (1,1) = [0,1] -> cos = [[1, 1], [0, 1]]
    # image side: rows [1, 1] (target 0) and [0, 1] (target 1): (log 2 + L1E) / 2
    # text side: cos.T rows [1, 0] (target 0) and [1, 1] (target 1): (L1E + log 2) / 2
    loss = extended_info_nce(masks, emb, torch.eye(2), 0, torch.tensor(0.0))
    assert loss.item() == pytest.approx((math.log(2) + L1E) / 2, rel=1e-5)


def test_gumbel_sigmoid_straight_through():
    z = torch.tensor([50.0, -50.0, 0.3], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    out = gumbel_sigmoid_st(z, generator=gen)
    assert out[0].item() == 1.0 and out[1].item() == 0.0 and out[2].item() in (0.0, 1.0)
    out.sum().backward()
    # the gradient is the soft sample's: sigmoid'(z + noise), recomputed with the same noise
    u = torch.rand(3, generator=torch.Generator().manual_seed(0)).clamp(1e-10, 1 - 1e-10)
    soft = torch.sigmoid(z.detach() + torch.log(u) - torch.log1p(-u))
    assert torch.allclose(z.grad, soft * (1 - soft))
    # P(hard = 1) = sigmoid(z)
    many = gumbel_sigmoid_st(torch.full((20000,), math.log(0.7 / 0.3)), generator=torch.Generator().manual_seed(1))
    assert many.mean().item() == pytest.approx(0.7, abs=0.02)


def test_tcl_losses_terms_and_gradients(make_tiny):
    model = make_tiny(0).train()
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    text = torch.randn(3, model.config.text.embed_dim)
    terms = tcl_losses(model, images, text, LossWeights(), generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"tcli", "tclf", "area_pos", "area_neg", "tv_emb", "tv_mask", "loss"}
    w = LossWeights()
    expected = (
        w.tcl_w * (terms["tcli"] + terms["tclf"])
        + w.area_w * (terms["area_pos"] + terms["area_neg"])
        + w.tv_w * (terms["tv_emb"] + terms["tv_mask"])
    )
    assert terms["loss"].item() == pytest.approx(expected.item())
    assert all(torch.isfinite(v) for v in terms.values())
    model.zero_grad()
    terms["tcli"].backward()
    # the image-level loss reaches the grounder only through the hard mask (straight-through) and Sim2Mask
    assert model.masker.sim2mask.w.grad is not None and model.masker.sim2mask.w.grad.abs().item() > 0
    assert model.tcli_loss.logit_scale.grad is not None
    assert all(p.grad is None for p in model.clip_image_encoder.parameters())
