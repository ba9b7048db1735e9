from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tclseg_trainer.checkpoints import CheckpointError, check_state_dict
from tclseg_trainer.clip import (
    CLIP,
    LayerNorm,
    ResidualAttentionBlock,
    TextConfig,
    VisionConfig,
    resize_pos_embed,
)
from tclseg_trainer.model import SIZES


def openai_vit_b16_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of OpenAI's ViT-B/16 state dict, written out from OpenAI's model definition."""
    shapes = {
        "positional_embedding": (77, 512),
        "text_projection": (512, 512),
        "logit_scale": (),
        "token_embedding.weight": (49408, 512),
        "ln_final.weight": (512,),
        "ln_final.bias": (512,),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (197, 768),
        "visual.proj": (768, 512),
        "visual.conv1.weight": (768, 3, 16, 16),
        "visual.ln_pre.weight": (768,),
        "visual.ln_pre.bias": (768,),
        "visual.ln_post.weight": (768,),
        "visual.ln_post.bias": (768,),
    }
    for prefix, width in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            b = f"{prefix}.resblocks.{i}"
            shapes |= {
                f"{b}.attn.in_proj_weight": (3 * width, width),
                f"{b}.attn.in_proj_bias": (3 * width,),
                f"{b}.attn.out_proj.weight": (width, width),
                f"{b}.attn.out_proj.bias": (width,),
                f"{b}.ln_1.weight": (width,),
                f"{b}.ln_1.bias": (width,),
                f"{b}.mlp.c_fc.weight": (4 * width, width),
                f"{b}.mlp.c_fc.bias": (4 * width,),
                f"{b}.mlp.c_proj.weight": (width, 4 * width),
                f"{b}.mlp.c_proj.bias": (width,),
                f"{b}.ln_2.weight": (width,),
                f"{b}.ln_2.bias": (width,),
            }
    return shapes


def test_vit_b16_state_dict_matches_openai_names_and_shapes():
    cfg = SIZES["vit-b16"]
    with torch.device("meta"):  # shapes only: no 600 MB allocation
        model = CLIP(cfg.vision, cfg.text)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == openai_vit_b16_shapes()


def test_random_official_state_dict_loads():
    cfg = SIZES["vit-b16"]
    with torch.device("meta"):
        model = CLIP(cfg.vision, cfg.text)
        sd = {k: torch.empty(s) for k, s in openai_vit_b16_shapes().items()}
    check_state_dict(model.state_dict(), sd, "random.pt")
    result = model.load_state_dict(sd, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    bad = dict(sd)
    bad["visual.proj"] = torch.empty(512, 768, device="meta")
    with pytest.raises(CheckpointError, match=r"random\.pt.*'visual\.proj'.*\(768, 512\).*\(512, 768\)"):
        check_state_dict(model.state_dict(), bad, "random.pt")


class OpenAIStyleBlock(nn.Module):
    """Independent reference: OpenAI's block layout on top of nn.MultiheadAttention (sequence-first)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.Identity(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # x [L, B, C]
        x = x + self.attn(*(self.ln_1(x),) * 3, need_weights=False, attn_mask=mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


@pytest.fixture
def block_pair():
    torch.manual_seed(0)
    ours = ResidualAttentionBlock(32, 4)
    for p in ours.parameters():
        nn.init.normal_(p, std=0.2)
    ref = OpenAIStyleBlock(32, 4)
    ref.load_state_dict(ours.state_dict())  # same names, same layout
    return ours, ref


def test_attention_block_matches_multihead_attention(block_pair):
    ours, ref = block_pair
    x = torch.randn(2, 9, 32)
    causal = torch.full((9, 9), float("-inf")).triu_(1)
    for mask in (None, causal):
        want = ref(x.transpose(0, 1), mask).transpose(0, 1)
        torch.testing.assert_close(ours(x, mask), want, atol=1e-5, rtol=1e-5)


def test_self_only_block_equals_identity_masked_attention(block_pair):
    ours, ref = block_pair
    x = torch.randn(2, 9, 32)
    self_only = torch.full((9, 9), float("-inf")).fill_diagonal_(0)
    got = ours.forward_self_only(x)
    torch.testing.assert_close(got, ours(x, self_only), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref(x.transpose(0, 1), self_only).transpose(0, 1), atol=1e-5, rtol=1e-5)
    # And it is really different from ordinary attention (the test could fail).
    assert (got - ours(x)).abs().max() > 1e-3
    # Token by token: permuting tokens permutes the output.
    perm = torch.randperm(9)
    torch.testing.assert_close(ours.forward_self_only(x[:, perm]), got[:, perm])


def tiny_clip(seed: int = 0) -> CLIP:
    cfg = SIZES["tiny"]
    return CLIP(cfg.vision, cfg.text, seed=seed).eval()


def test_text_encoder_reads_eot_and_ignores_padding(tokenizer):
    model = tiny_clip()
    tokens = tokenizer.tokenize(["a photo of a cat", "a dog"])
    out = model.encode_text(tokens)
    assert out.shape == (2, 16)
    # Anything after EOT is invisible to the EOT token under the causal mask.
    noisy = tokens.clone()
    noisy[0, 10:] = 1234
    torch.testing.assert_close(model.encode_text(noisy)[0], out[0], atol=1e-6, rtol=1e-6)
    # ... but a change before EOT matters.
    changed = tokens.clone()
    changed[0, 2] = 1234
    assert (model.encode_text(changed)[0] - out[0]).abs().max() > 1e-4


def test_clip_forward_and_init_scale():
    model = tiny_clip()
    pixels = torch.randn(2, 3, 224, 224)
    emb = model.encode_image(pixels)
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    assert model.logit_scale.item() == pytest.approx(2.6592600, abs=1e-6)  # log(1/0.07)
    # CLIP's init: token embedding std 0.02, positional std 0.01.
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.2)
    state = torch.random.get_rng_state()
    other = tiny_clip(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded init leaves the global RNG alone
    assert not torch.equal(other.visual.proj, model.visual.proj)
    assert torch.equal(tiny_clip(seed=0).visual.proj, model.visual.proj)


def test_half_precision_layernorm_runs_in_fp32():
    ln = LayerNorm(64)
    nn.init.normal_(ln.weight)
    x = torch.randn(4, 64) * 300 + 1000  # large mean: fp16 statistics would lose precision
    want = F.layer_norm(x, (64,), ln.weight, ln.bias)
    got = ln.half()(x.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)


def test_pos_embed_resize():
    torch.manual_seed(0)
    table = torch.randn(1 + 14 * 14, 8)
    assert resize_pos_embed(table, (14, 14)) is table
    out = resize_pos_embed(table, (28, 20))
    assert out.shape == (1 + 28 * 20, 8)
    torch.testing.assert_close(out[0], table[0])
    grid = table[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(28, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[1:], want.permute(0, 2, 3, 1).reshape(-1, 8))


def test_configs_are_consistent():
    v, t = SIZES["vit-b16"].vision, SIZES["vit-b16"].text
    assert (v.width, v.layers, v.heads, v.patch_size, v.embed_dim) == (768, 12, 12, 16, 512)
    assert (t.width, t.layers, t.heads, t.context_length, t.vocab_size) == (512, 12, 8, 77, 49408)
    assert isinstance(v, VisionConfig) and isinstance(t, TextConfig)
