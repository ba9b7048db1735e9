"""The training-free heads (heads.py): each head's defining property checked against a direct computation written
independently here (full attention rewritten from the block's weights), plus shapes, normalisation, the NACLIP bias,
the polar factor, and that tokens and pixels give the same features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tclseg_trainer.clip import CLIP, TextConfig, VisionConfig, resize_pos_embed
from tclseg_trainer.heads import (
    HEADS,
    HeadGraph,
    class_scores,
    dense_features,
    gaussian_bias,
    last_block,
    polar_factor,
)
from tclseg_trainer.model import SIZES, TCL

VISION = VisionConfig(width=64, layers=3, heads=4, patch_size=8, image_size=32, embed_dim=32)
TEXT = TextConfig(width=32, layers=1, heads=2, context_length=77, embed_dim=32)


@pytest.fixture(scope="module")
def visual():
    model = CLIP(VISION, TEXT, seed=3).eval()
    # Non-zero biases so that a bias dropped or misplaced shows.
    with torch.no_grad():
        for p in model.visual.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.visual


def trunk(visual, pixels):
    g = (pixels.shape[-2] // VISION.patch_size, pixels.shape[-1] // VISION.patch_size)
    x = visual.embed(pixels)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x, g


def attention_out(block, x, rule):
    """Reference attention written per head with explicit loops over heads, from the weights."""
    c = x.shape[-1]
    h = block.attn.heads
    d = c // h
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = x @ w[:c].T + b[:c]
    k = x @ w[c : 2 * c].T + b[c : 2 * c]
    v = x @ w[2 * c :].T + b[2 * c :]
    outs = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        a = rule(q[..., sl], k[..., sl])
        outs.append(a @ v[..., sl])
    return block.attn.out_proj(torch.cat(outs, -1))


def project(visual, x):
    f = visual.ln_post(x[:, 1:]) @ visual.proj
    return F.normalize(f, dim=-1)


def as_tokens_map(feats):
    b, e, h, w = feats.shape
    return feats.reshape(b, e, h * w).transpose(1, 2)


@pytest.fixture(scope="module")
def sample(visual):
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens, grid = trunk(visual, pixels)
    return pixels, tokens, grid


def test_every_head_returns_normalised_maps_of_the_grid(visual, sample):
    pixels, tokens, grid = sample
    for head in HEADS:
        with torch.no_grad():
            f = dense_features(visual, head, tokens, grid)
        assert f.shape == (2, VISION.embed_dim, *grid), head
        assert torch.allclose(f.norm(dim=1), torch.ones(2, *grid), atol=1e-5), head


def test_heads_differ_from_each_other(visual, sample):
    _, tokens, grid = sample
    with torch.no_grad():
        feats = {h: dense_features(visual, h, tokens, grid) for h in HEADS}
    for a in HEADS:
        for b in HEADS:
            if a < b:
                assert (feats[a] - feats[b]).abs().max() > 1e-3, (a, b)


def test_pixels_and_tokens_agree(visual, sample):
    pixels, tokens, grid = sample
    for head in HEADS:
        with torch.no_grad():
            # the fixture's tokens come from the trunk with TCL's resize rule ("size")
            a = dense_features(visual, head, pixels, pos_resize="size")
            b = dense_features(visual, head, tokens, grid)
        assert torch.allclose(a, b, atol=1e-6), head


def test_the_heads_resize_the_position_embedding_by_their_methods_rule(visual, sample):
    pixels, _, _ = sample
    with torch.no_grad():
        own = dense_features(visual, "naclip", pixels)  # default: the methods' "scale" rule
        tcl = dense_features(visual, "naclip", pixels, pos_resize="size")
        assert not torch.allclose(own, tcl, atol=1e-4)  # the fixture's grid is not the table's own
        table = visual.positional_embedding
        g = int(round((table.shape[0] - 1) ** 0.5))
        assert torch.equal(resize_pos_embed(table, (g, g), rule="scale"), table)  # unchanged at the native grid
        with pytest.raises(ValueError, match="known: size, scale"):
            resize_pos_embed(table, (g + 1, g), rule="ratio")


def test_maskclip_is_the_value_path_without_mixing(visual, sample):
    _, tokens, grid = sample
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = block.ln_1(tokens)
        want = project(visual, attention_out(block, x, lambda q, k: torch.eye(q.shape[-2])))
        got = as_tokens_map(dense_features(visual, "maskclip", tokens, grid))
        # No mixing: changing one token's input changes only that token's feature.
        moved = tokens.clone()
        moved[:, 5] += torch.randn(VISION.width, generator=torch.Generator().manual_seed(9))
        other = as_tokens_map(dense_features(visual, "maskclip", moved, grid))
    assert torch.allclose(got, want, atol=1e-5)
    changed = (other - got).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [4]


def test_sclip_keeps_residual_and_ffn(visual, sample):
    _, tokens, grid = sample
    block = visual.transformer.resblocks[-1]
    d = VISION.width // VISION.heads

    def csa(q, k):
        return ((q @ q.transpose(-2, -1)) / math.sqrt(d)).softmax(-1) + (
            (k @ k.transpose(-2, -1)) / math.sqrt(d)
        ).softmax(-1)

    with torch.no_grad():
        y = tokens + attention_out(block, block.ln_1(tokens), csa)
        y = y + block.mlp(block.ln_2(y))
        want = project(visual, y)
        got = as_tokens_map(dense_features(visual, "sclip", tokens, grid))
    assert torch.allclose(got, want, atol=1e-5)


def test_clearclip_is_qq_attention_alone(visual, sample):
    _, tokens, grid = sample
    block = visual.transformer.resblocks[-1]
    d = VISION.width // VISION.heads
    with torch.no_grad():
        want = project(
            visual,
            attention_out(
                block, block.ln_1(tokens), lambda q, k: ((q @ q.transpose(-2, -1)) / math.sqrt(d)).softmax(-1)
            ),
        )
        got = as_tokens_map(dense_features(visual, "clearclip", tokens, grid))
    assert torch.allclose(got, want, atol=1e-5)


def test_naclip_bias_is_a_gaussian_of_patch_distance():
    omega = gaussian_bias((3, 4), std=2.0)
    assert omega.shape == (13, 13)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    # Patch (0, 0) is token 1, patch (1, 2) is token 1 + 1*4 + 2 = 7: squared distance 1 + 4 = 5.
    assert omega[1, 7].item() == pytest.approx(math.exp(-5 / 8))
    assert torch.allclose(omega[1:, 1:].diagonal(), torch.ones(12))
    assert torch.equal(omega, omega.T)


def test_naclip_is_kk_plus_neighbourhood_alone(visual, sample):
    _, tokens, grid = sample
    block = visual.transformer.resblocks[-1]
    d = VISION.width // VISION.heads
    omega = gaussian_bias(grid, 5.0)
    with torch.no_grad():
        want = project(
            visual,
            attention_out(
                block, block.ln_1(tokens), lambda q, k: ((k @ k.transpose(-2, -1)) / math.sqrt(d) + omega).softmax(-1)
            ),
        )
        got = as_tokens_map(dense_features(visual, "naclip", tokens, grid))
        # A narrower neighbourhood changes the result: the option reaches the bias.
        narrow = as_tokens_map(dense_features(visual, "naclip", tokens, grid, gaussian_std=0.5))
    assert torch.allclose(got, want, atol=1e-5)
    assert (narrow - got).abs().max() > 1e-4


def test_polar_factor_is_orthogonal_and_matches_the_svd():
    gen = torch.Generator().manual_seed(2)
    # A well-conditioned m (singular values in [0.5, 2]), where a few dozen iterations converge.
    u0, _, v0 = torch.linalg.svd(torch.randn(3, 8, 8, generator=gen, dtype=torch.float64))
    m = u0 @ torch.diag_embed(torch.linspace(0.5, 2.0, 8, dtype=torch.float64).expand(3, 8)) @ v0
    r = polar_factor(m, iters=30)
    u, _, vh = torch.linalg.svd(m)
    assert torch.allclose(r, u @ vh, atol=1e-4)
    assert torch.allclose(r.transpose(-2, -1) @ r, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-4)


def test_pearl_uses_aligned_keys(visual, sample):
    _, tokens, grid = sample
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        a = last_block(block, "pearl", tokens, grid)
        b = last_block(block, "pearl", tokens, grid, alpha_kk=0.0)
        c = last_block(block, "pearl", tokens, grid, polar_iters=1)
    assert a.shape == tokens.shape
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-6  # the k̄k̄ᵀ term contributes
    assert (a - c).abs().max() > 1e-6  # the iteration count reaches the polar factor


def test_a_tcl_model_gives_its_frozen_clip_features():
    model = TCL(SIZES["tiny"], seed=4).eval()
    g = 4
    pixels = torch.randn(1, 3, g * model.config.vision.patch_size, g * model.config.vision.patch_size)
    with torch.no_grad():
        tokens = model.trunk_tokens(pixels)
        f = dense_features(model, "naclip", tokens)
        from_pixels = dense_features(model, "naclip", pixels, pos_resize="size")  # trunk_tokens: TCL's rule
    assert f.shape == (1, model.config.vision.embed_dim, g, g)
    assert torch.allclose(f, from_pixels, atol=1e-5)


def test_head_graph_matches_dense_features(visual, sample):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tokens, grid = trunk(visual, pixels)
        for head in HEADS:
            got = HeadGraph(visual, head, grid[0])(tokens)
            assert torch.allclose(got, dense_features(visual, head, tokens, grid), atol=1e-6), head


def test_class_scores_are_a_softmax_over_classes():
    feats = F.normalize(torch.randn(1, 8, 2, 3), dim=1)
    text = F.normalize(torch.randn(4, 8), dim=1)
    p = class_scores(feats, text, 40.0)
    assert torch.allclose(p.sum(1), torch.ones(1, 2, 3), atol=1e-6)
    assert torch.equal(p.argmax(1), torch.einsum("behw,ne->bnhw", feats, text).argmax(1))


def test_unknown_head_and_bad_grid_are_errors(visual, sample):
    _, tokens, grid = sample
    with pytest.raises(ValueError, match="unknown head 'gem'"):
        dense_features(visual, "gem", tokens, grid)
    with pytest.raises(ValueError, match="not a square grid"):
        dense_features(visual, "sclip", tokens)
    with pytest.raises(ValueError, match="does not match"):
        dense_features(visual, "sclip", tokens, (4, 4))
