from __future__ import annotations

import hashlib
import re

import pytest
import torch

from tclseg_trainer.checkpoints import (
    OPENAI_VIT_B16_SHA256,
    CheckpointError,
    apply_openai_clip,
    apply_tcl,
    build_official,
    load_checkpoint,
    load_clip_into,
    load_openai_clip,
    load_tcl,
    save_checkpoint,
    sha256_file,
)
from tclseg_trainer.clip import CLIP
from tclseg_trainer.model import SIZES, TCL

TINY = SIZES["tiny"]


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(TINY.vision, TINY.text).eval()


@pytest.fixture
def clip_file(tmp_path):
    path = tmp_path / "clip.pt"
    model = tiny_clip(5)
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def tcl_file(tmp_path):
    """A grounder-only checkpoint shaped like the official release: {"model": masker + loss keys}."""
    donor = TCL(TINY, seed=7)
    with torch.no_grad():
        donor.masker.sim2mask.w.fill_(13.0)
        donor.masker.image_encoder.decoder.decoder.net[1].conv2.gate.gate.fill_(0.2)
    sd = {k: v for k, v in donor.state_dict().items() if k.startswith(("masker.", "tcli_loss.", "tclf_loss."))}
    path = tmp_path / "tcl.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_sha256_is_streamed_and_correct(tmp_path):
    p = tmp_path / "blob"
    data = bytes(range(256)) * 10000
    p.write_bytes(data)
    assert sha256_file(p, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_plain_state_dict_loads(clip_file):
    path, model = clip_file
    weights = load_openai_clip(path, expected_sha256=None)
    assert weights.sha256 == sha256_file(path)
    target = tiny_clip(9)
    load_clip_into(target, weights)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_torchscript_archive_loads(tmp_path):
    model = tiny_clip(3)
    # OpenAI's archive also holds these hyper-parameters next to the weights.
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        model.register_buffer(name, torch.tensor(value))
    model.half().float()  # OpenAI's weights are fp16-rounded
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    traced = torch.jit.trace_module(model, {"encode_text": (tokens,)})
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    loaded = load_openai_clip(path, expected_sha256=None)
    assert "input_resolution" not in loaded.state_dict and "visual.conv1.weight" in loaded.state_dict
    assert all(v.dtype == torch.float32 for v in loaded.state_dict.values() if v.is_floating_point())
    target = TCL(TINY, seed=1)
    apply_openai_clip(target, loaded)
    ref = tiny_clip(3).half().float()
    torch.testing.assert_close(target.clip_image_encoder.clip_proj.proj, ref.visual.proj)
    torch.testing.assert_close(
        target.clip_image_encoder.clip_visual.transformer.resblocks[1].mlp.c_fc.weight,
        ref.visual.transformer.resblocks[1].mlp.c_fc.weight,
    )
    torch.testing.assert_close(target.clip_text_encoder.token_embedding.weight, ref.token_embedding.weight)
    # The grounder is re-initialised from the new CLIP.
    torch.testing.assert_close(target.masker.image_encoder.decoder.image_proj.proj, ref.visual.proj)
    torch.testing.assert_close(
        target.grounder_block.attn.in_proj_weight, ref.visual.transformer.resblocks[-1].attn.in_proj_weight
    )
    torch.testing.assert_close(target.encode_text(tokens), ref.encode_text(tokens))


def test_missing_file(tmp_path):
    missing = tmp_path / "absent.pt"
    for fn in (
        lambda: load_openai_clip(missing),
        lambda: load_tcl(missing),
        lambda: load_checkpoint(missing),
    ):
        with pytest.raises(CheckpointError, match=re.escape(str(missing)) + ".*not found"):
            fn()


def test_bad_hash_names_both_hashes(clip_file):
    path, _ = clip_file
    with pytest.raises(CheckpointError) as e:
        load_openai_clip(path)  # the default pin is OpenAI's ViT-B/16 hash
    msg = str(e.value)
    assert str(path) in msg and OPENAI_VIT_B16_SHA256 in msg and sha256_file(path) in msg


def test_wrong_shape_names_file_and_key(clip_file, tmp_path):
    path, model = clip_file
    sd = model.state_dict()
    sd["visual.proj"] = torch.zeros(32, 17)
    bad = tmp_path / "bad_shape.pt"
    torch.save(sd, bad)
    weights = load_openai_clip(bad, expected_sha256=None)
    with pytest.raises(CheckpointError, match=r"bad_shape\.pt.*'visual\.proj'.*\(32, 16\).*\(32, 17\)"):
        apply_openai_clip(TCL(TINY), weights)


def test_unexpected_and_missing_keys_in_clip(clip_file, tmp_path):
    _, model = clip_file
    sd = model.state_dict()
    sd["visual.extra_thing"] = torch.zeros(3)
    extra = tmp_path / "extra.pt"
    torch.save(sd, extra)
    with pytest.raises(CheckpointError, match=r"extra\.pt.*unexpected key 'visual\.extra_thing'"):
        apply_openai_clip(TCL(TINY), load_openai_clip(extra, expected_sha256=None))
    sd = model.state_dict()
    del sd["ln_final.bias"]
    missing = tmp_path / "missing.pt"
    torch.save(sd, missing)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*missing key 'ln_final\.bias'"):
        apply_openai_clip(TCL(TINY), load_openai_clip(missing, expected_sha256=None))


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(CheckpointError, match=r"junk\.pt.*not a CLIP checkpoint"):
        load_openai_clip(junk, expected_sha256=None)
    with pytest.raises(CheckpointError, match=r"junk\.pt.*not a TCL checkpoint"):
        load_tcl(junk)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt.*'format'.*tclseg-trainer-checkpoint.*something-else"):
        load_checkpoint(other)


def test_official_tcl_loads_with_whitelist(clip_file, tcl_file):
    clip_path, clip_model = clip_file
    tcl_path, sd = tcl_file
    model = build_official(clip_path, tcl_path, config=TINY, clip_sha256=None)
    assert model.masker.sim2mask.w.item() == 13.0
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(model.clip_image_encoder.clip_proj.proj, clip_model.visual.proj)
    assert model.provenance["tcl_sha256"] == sha256_file(tcl_path)
    assert model.provenance["clip_sha256"] == sha256_file(clip_path)


def test_tcl_without_loss_temperatures_is_fine(tmp_path, tcl_file):
    _, sd = tcl_file
    slim = {k: v for k, v in sd.items() if not k.endswith("_loss.logit_scale")}
    path = tmp_path / "slim.pth"
    torch.save(slim, path)  # a bare state dict works too
    model = TCL(TINY)
    apply_tcl(model, load_tcl(path))
    assert model.masker.sim2mask.w.item() == 13.0


def test_tcl_errors_name_file_and_key(tmp_path, tcl_file):
    _, sd = tcl_file
    missing = {k: v for k, v in sd.items() if k != "masker.sim2mask.b"}
    path = tmp_path / "no_b.pth"
    torch.save({"model": missing}, path)
    with pytest.raises(CheckpointError, match=r"no_b\.pth.*missing key 'masker\.sim2mask\.b'"):
        apply_tcl(TCL(TINY), load_tcl(path))
    unexpected = {**sd, "pamr.aff_x.kernel": torch.zeros(8, 1, 3, 3)}
    path = tmp_path / "extra.pth"
    torch.save({"model": unexpected}, path)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*unexpected key 'pamr\.aff_x\.kernel'"):
        apply_tcl(TCL(TINY), load_tcl(path))
    wrong = {**sd, "masker.image_encoder.decoder.image_proj.proj": torch.zeros(32, 8)}
    path = tmp_path / "wrong.pth"
    torch.save({"model": wrong}, path)
    with pytest.raises(CheckpointError, match=r"wrong\.pth.*'masker\.image_encoder\.decoder\.image_proj\.proj'"):
        apply_tcl(TCL(TINY), load_tcl(path))


def test_trainer_checkpoint_roundtrip(tmp_path, make_tiny):
    model = make_tiny(4)
    with torch.no_grad():
        model.masker.sim2mask.b.fill_(-1.25)
    path = tmp_path / "ckpts" / "step10.pt"
    digest = save_checkpoint(path, model, model.config, step=10, note="hello")
    assert digest == sha256_file(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step10.pt"]  # no temp file left behind
    loaded, meta = load_checkpoint(path)
    assert meta["step"] == 10 and meta["note"] == "hello" and meta["sha256"] == digest
    assert meta["format"] == "tclseg-trainer-checkpoint" and meta["config"] == model.config.to_dict()
    assert loaded.provenance == {"source": "checkpoint", "checkpoint_sha256": digest}
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not any(p.requires_grad for p in loaded.clip_image_encoder.parameters())


def test_trainer_checkpoint_shape_mismatch(tmp_path, make_tiny):
    model = make_tiny()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, model.config)
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["masker.sim2mask.w"] = torch.zeros(2)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"c\.pt.*'masker\.sim2mask\.w'.*\(\).*\(2,\)"):
        load_checkpoint(path)
