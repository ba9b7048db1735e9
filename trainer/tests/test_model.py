from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tclseg_trainer.model import (
    MEAN,
    SIZES,
    STD,
    TCL,
    TEMPLATES,
    TCLConfig,
    compute_padsize,
    normalize,
)


def cos(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,nc->bnhw", F.normalize(features, dim=1), F.normalize(text, dim=-1))


def test_grounder_at_init_is_maskclip_upsampled(tiny_model: TCL, tiny_text):
    x = torch.randn(1, 3, 64, 96)
    grid = (4, 6)
    tokens = tiny_model.trunk_tokens(x)
    assert tokens.shape == (1, 1 + 24, 32)
    dense = tiny_model.grounder_dense(tokens, grid)
    kp = tiny_model.kp_features(tokens, grid)
    assert dense.shape == (1, 16, 16, 24) and kp.shape == (1, 16, 4, 6)
    maskclip_up = F.interpolate(kp, scale_factor=4, mode="nearest")
    torch.testing.assert_close(cos(dense, tiny_text), cos(maskclip_up, tiny_text), atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, maskclip_up, atol=1e-5, rtol=1e-5)


def test_trained_gates_change_the_grounder(make_tiny, tiny_text):
    model = make_tiny()
    x = torch.randn(1, 3, 32, 32)
    tokens = model.trunk_tokens(x)
    before = model.grounder_dense(tokens, (2, 2))
    with torch.no_grad():
        model.masker.image_encoder.decoder.decoder.net[0].conv.gate.gate.fill_(0.5)
    after = model.grounder_dense(tokens, (2, 2))
    assert (after - before).abs().max() > 1e-4


def test_grounder_is_a_copy_not_a_share(make_tiny):
    model = make_tiny()
    frozen = model.trunk.transformer.resblocks[-1]
    copy = model.grounder_block
    assert copy is not frozen
    torch.testing.assert_close(copy.attn.in_proj_weight, frozen.attn.in_proj_weight)
    with torch.no_grad():
        copy.attn.in_proj_weight.add_(1.0)
    assert not torch.equal(copy.attn.in_proj_weight, frozen.attn.in_proj_weight)


def test_frozen_clip_and_trainable_grounder(make_tiny):
    model = make_tiny()
    model.train()
    assert not model.clip_image_encoder.training and not model.clip_text_encoder.training
    assert model.masker.training
    assert not any(p.requires_grad for p in model.clip_image_encoder.parameters())
    assert not any(p.requires_grad for p in model.clip_text_encoder.parameters())
    assert all(p.requires_grad for p in model.masker.parameters())
    assert model.masker.sim2mask.w.item() == 10.0 and model.masker.sim2mask.b.item() == -2.5


def test_vit_b16_grounder_keys_and_trainable_count():
    with torch.device("meta"):
        model = TCL(SIZES["vit-b16"])
    sd = model.state_dict()
    expected = {
        "masker.image_encoder.backbone.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "masker.image_encoder.backbone.transformer.resblocks.11.mlp.c_fc.weight": (3072, 768),
        "masker.image_encoder.decoder.decoder.net.0.conv.conv.weight": (768, 768, 3, 3),
        "masker.image_encoder.decoder.decoder.net.1.conv2.norm.weight": (768,),
        "masker.image_encoder.decoder.decoder.net.1.conv2.gate.gate": (),
        "masker.image_encoder.decoder.image_proj.ln.weight": (768,),
        "masker.image_encoder.decoder.image_proj.proj": (768, 512),
        "masker.sim2mask.w": (),
        "masker.sim2mask.b": (),
        "tcli_loss.logit_scale": (),
        "tclf_loss.logit_scale": (),
        "clip_image_encoder.clip_visual.transformer.resblocks.11.ln_2.bias": (768,),
        "clip_image_encoder.clip_proj.proj": (768, 512),
        "clip_text_encoder.text_projection": (512, 512),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == pytest.approx(28.7e6, rel=0.01)  # tcl.md 1.3: about 28.7M trainable


def test_padsize_splits_evenly():
    assert compute_padsize(100, 130, 16) == (7, 7, 6, 6)
    assert compute_padsize(101, 129, 16) == (7, 8, 5, 6)
    assert compute_padsize(64, 48, 16) == (0, 0, 0, 0)


@pytest.mark.parametrize("hw", [(100, 130), (33, 17), (64, 64)])
def test_generate_masks_returns_input_size(tiny_model: TCL, tiny_text, hw):
    x = torch.randn(1, 3, *hw)
    masks, simmap = tiny_model.generate_masks(x, tiny_text, apply_pamr=False, kp_w=0.3)
    assert masks.shape == (1, 3, *hw)
    ph, pw = (-(-hw[0] // 16) * 16, -(-hw[1] // 16) * 16)
    assert simmap.shape == (1, 3, ph // 4, pw // 4)
    assert ((masks >= 0) & (masks <= 1)).all()


def test_generate_masks_padding_is_centred(tiny_model: TCL, tiny_text):
    x = torch.randn(1, 3, 100, 130)
    masks, _ = tiny_model.generate_masks(x, tiny_text, apply_pamr=True, kp_w=0.3)
    padded = F.pad(x, (7, 7, 6, 6))
    full, _ = tiny_model.generate_masks(padded, tiny_text, apply_pamr=True, kp_w=0.3)
    torch.testing.assert_close(masks, full[:, :, 6:106, 7:137])


def test_generate_masks_semantics(tiny_model: TCL, tiny_text):
    x = torch.randn(1, 3, 64, 64)
    masks, simmap = tiny_model.generate_masks(x, tiny_text, apply_pamr=False, kp_w=0.0)
    s2m = tiny_model.masker.sim2mask
    want = F.interpolate(torch.sigmoid(simmap * s2m.w + s2m.b), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(masks, want)
    # kp_w=1: the output is the raw MaskCLIP mask, independent of the grounder.
    kp_only, _ = tiny_model.generate_masks(x, tiny_text, kp_w=1.0)
    tokens = tiny_model.trunk_tokens(x)
    kp = torch.sigmoid((cos(tiny_model.kp_features(tokens, (4, 4)), tiny_text) - 0.25) * 10)
    kp = F.interpolate(F.interpolate(kp, size=(16, 16), mode="bilinear"), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(kp_only, kp, atol=1e-6, rtol=1e-5)
    # PAMR changes the result.
    refined, _ = tiny_model.generate_masks(x, tiny_text, apply_pamr=True, kp_w=0.0)
    assert (refined - masks).abs().max() > 1e-4


def test_build_text_embedding_averages_unnormalised(tiny_model: TCL, tokenizer):
    names = ["cat", "dog", "bed "]
    emb = tiny_model.build_text_embedding(names, TEMPLATES, tokenizer)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    raw = tiny_model.encode_text(tokenizer([t.format("dog") for t in TEMPLATES]))
    torch.testing.assert_close(emb[1], normalize(raw.mean(0), dim=-1))
    per_template_first = normalize(normalize(raw, dim=-1).mean(0), dim=-1)
    assert (emb[1] - per_template_first).abs().max() > 1e-6


def test_templates_and_constants():
    assert len(TEMPLATES) == 9
    assert TEMPLATES[0] == "itap of a {}." and TEMPLATES[-1] == "a photo of {}s."
    assert MEAN == (0.485, 0.456, 0.406) and STD == (0.229, 0.224, 0.225)


def test_config_roundtrip():
    for cfg in SIZES.values():
        again = TCLConfig.from_dict(cfg.to_dict())
        assert again == cfg
    with pytest.raises(ValueError, match="bogus"):
        TCLConfig.from_dict({**SIZES["tiny"].to_dict(), "bogus": 1})
    assert SIZES["tiny"].mask_stride == 4


def test_resized_pos_embed_override(tiny_model: TCL):
    x = torch.randn(1, 3, 48, 32)
    table = tiny_model.resized_pos_embed((3, 2))
    assert table.shape == (1 + 6, 32)
    torch.testing.assert_close(tiny_model.trunk_tokens(x, pos_embed=table), tiny_model.trunk_tokens(x))
    assert (tiny_model.trunk_tokens(x, pos_embed=table * 0) - tiny_model.trunk_tokens(x)).abs().max() > 1e-4


def test_seeded_init_is_reproducible(make_tiny):
    a, b, c = make_tiny(0), make_tiny(0), make_tiny(1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(
        a.masker.image_encoder.decoder.image_proj.proj, c.masker.image_encoder.decoder.image_proj.proj
    )
