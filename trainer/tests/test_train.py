"""Training: only the trainable parameters move, resume is exact, 2 gloo processes equal 1, config errors."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tclseg_trainer import train as T
from tclseg_trainer.ema import WeightAverage

# 1 torch thread for these tests (cores are shared), restored afterwards: other modules assume 2.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp_path: Path, **optim) -> T.TrainConfig:
    cfg = T.TrainConfig()
    cfg.model.size = "tiny"
    cfg.data.train = str(tmp_path / "data")
    cfg.data.batch_size = 3
    cfg.data.image_size = 64
    cfg.data.workers = 0
    cfg.data.shuffle_buffer = 4
    cfg.optim = T.OptimCfg(steps=10, warmup_steps=2, base_lr=0.05, min_lr=0.005, lr_batch=3, amp="none", **optim)
    cfg.checkpoint.dir = str(tmp_path / "run")
    cfg.checkpoint.every = 2
    cfg.log.every = 1
    return cfg


def make_folder(root: Path, n: int = 8) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "circle", "square"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {words[i % 5]} {words[(i + 2) % 5]}")


def batch(n: int, seed: int = 0, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randn(n, dim, generator=g)


def test_step_changes_only_trainable_params(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, unfreeze_step=1)
    model = T.build_model(cfg)
    opt = T.build_optimizer(model, cfg.optim)
    before = copy.deepcopy(model.state_dict())
    images, text = batch(3)
    T.train_step(model, opt, None, images, text, 0, cfg, 3)
    after = model.state_dict()
    for k, v in before.items():
        same = torch.equal(v, after[k])
        if k.startswith(("clip_text_encoder.", "clip_image_encoder.", "masker.image_encoder.backbone.")):
            assert same, f"{k} changed while frozen"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert any(k.startswith("masker.image_encoder.decoder.") for k in changed)
    assert "masker.sim2mask.w" in changed and "tcli_loss.logit_scale" in changed
    # step 1 >= unfreeze_step: the copied block now trains, CLIP still bit-identical
    T.train_step(model, opt, None, images, text, 1, cfg, 3)
    assert not torch.equal(
        before[next(k for k in before if k.startswith("masker.image_encoder.backbone."))],
        model.state_dict()[next(k for k in before if k.startswith("masker.image_encoder.backbone."))],
    )
    for k, v in before.items():
        if k.startswith(("clip_text_encoder.", "clip_image_encoder.")):
            assert torch.equal(v, model.state_dict()[k]), k


def test_param_groups_and_schedule():
    cfg = T.OptimCfg(steps=100, warmup_steps=10, base_lr=4e-4, min_lr=4e-5, lr_batch=4096)
    model = T.TCL(T.SIZES["tiny"], seed=0)
    opt = T.build_optimizer(model, cfg)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["masker.sim2mask.b"]) in decay  # 0-d scalars do get decay
    assert id(named["masker.image_encoder.decoder.image_proj.ln.weight"]) not in decay
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.05
    assert T.lr_at(0, cfg, 1024) == pytest.approx(1e-4 * 1e-4)  # peak 4e-4 * 1024/4096 = 1e-4
    assert T.lr_at(10, cfg, 1024) == pytest.approx(1e-4)
    assert T.lr_at(55, cfg, 1024) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5)
    assert T.lr_at(100, cfg, 1024) == pytest.approx(1e-5)


def test_resume_gives_the_same_next_step(tmp_path: Path):
    make_folder(tmp_path / "data")
    cfg = tiny_cfg(tmp_path)
    cfg.data.resume = "fast-forward"
    full = T.train(cfg, max_steps=3)
    cfg2 = tiny_cfg(tmp_path)
    cfg2.data.resume = "fast-forward"
    cfg2.checkpoint.dir = str(tmp_path / "run2")
    T.train(cfg2, max_steps=2)
    assert sorted(p.name for p in Path(cfg2.checkpoint.dir).glob("ckpt-*.pt")) == ["ckpt-00000002.pt"]
    resumed = T.train(cfg2, resume=True, max_steps=1)
    assert resumed["step"] == 3
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=1e-7)
    assert resumed["tcli"] == pytest.approx(full["tcli"], rel=1e-6, abs=1e-7)


def test_weight_average_follows_the_weights_and_swaps_back():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    avg.update(model)  # 0.9 * 1 + 0.1 * 3
    avg.update(model)  # 0.9 * 1.2 + 0.1 * 3
    assert torch.allclose(avg.shadow["weight"], torch.full((1, 2), 1.38))
    with pytest.raises(RuntimeError), avg.swapped_in(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 1.38))
        raise RuntimeError("an evaluation that fails")
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))  # the model's own weights are back
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(model, 1.0)


def test_resume_continues_the_weight_average_and_best_pt_holds_it(tmp_path: Path):
    make_folder(tmp_path / "data")
    cfg = tiny_cfg(tmp_path, ema_decay=0.8)
    cfg.data.resume = "fast-forward"
    cfg.optim.steps = 4
    T.train(cfg)
    cfg2 = tiny_cfg(tmp_path, ema_decay=0.8)
    cfg2.data.resume = "fast-forward"
    cfg2.optim.steps = 4
    cfg2.checkpoint.dir = str(tmp_path / "run2")
    T.train(cfg2, max_steps=2)
    T.train(cfg2, resume=True)
    full = torch.load(Path(cfg.checkpoint.dir) / "ckpt-00000004.pt", weights_only=False)
    resumed = torch.load(Path(cfg2.checkpoint.dir) / "ckpt-00000004.pt", weights_only=False)
    decoder = next(k for k in full["weight_average"] if k.startswith("masker.image_encoder.decoder."))
    # only what trains is averaged: the frozen CLIP encoders are not copied
    assert not any(k.startswith(("clip_text_encoder.", "clip_image_encoder.")) for k in full["weight_average"])
    assert any(k.startswith("masker.image_encoder.backbone.") for k in full["weight_average"])
    for k, v in full["weight_average"].items():
        assert torch.allclose(v, resumed["weight_average"][k], rtol=1e-5, atol=1e-7), k
    # the average lags the weights, which moved; without [eval] data the final average is best.pt
    assert not torch.equal(full["weight_average"][decoder], full["state_dict"][decoder])
    best = torch.load(Path(cfg.checkpoint.dir) / "best.pt", weights_only=False)
    assert torch.equal(best["state_dict"][decoder], full["weight_average"][decoder])


def test_keep_last_checkpoints(tmp_path: Path):
    make_folder(tmp_path / "data")
    cfg = tiny_cfg(tmp_path)
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 2
    T.train(cfg, max_steps=4)
    assert sorted(p.name for p in Path(cfg.checkpoint.dir).glob("ckpt-*.pt")) == [
        "ckpt-00000003.pt",
        "ckpt-00000004.pt",
    ]


def _worker(rank: int, world: int, init: str, out: str, cfg: T.TrainConfig) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = T.build_model(cfg)
    opt = T.build_optimizer(model, cfg.optim)
    images, text = batch(4)
    b = 4 // world
    for step in range(2):
        T.train_step(model, opt, None, images[rank * b : (rank + 1) * b], text[rank * b : (rank + 1) * b], step, cfg, 4)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in T.trainable_named_params(model)}, out)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, unfreeze_step=1)
    results = {}
    for world in (1, 2):
        out = str(tmp_path / f"w{world}.pt")
        init = f"file://{tmp_path}/rdzv{world}"
        mp.spawn(_worker, args=(world, init, out, cfg), nprocs=world, join=True)
        results[world] = torch.load(out)
    start = dict(T.trainable_named_params(T.build_model(cfg)))
    moved = 0
    for name, p1 in results[1].items():
        torch.testing.assert_close(results[2][name], p1, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(p1, start[name].detach())
    assert moved > 10


def test_config_errors_name_the_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ntrain = "x"\nbatchsize = 4\n')
    with pytest.raises(T.ConfigError, match=r"bad.toml.*data.batchsize"):
        T.load_config(bad)
    bad.write_text('[data]\ntrain = "x"\n[optim]\namp = "fp8"\n')
    with pytest.raises(T.ConfigError, match="optim.amp"):
        T.load_config(bad)
    bad.write_text('[data]\ntrain = "x"\nbatch_size = "4"\n')
    with pytest.raises(T.ConfigError, match="data.batch_size must be int"):
        T.load_config(bad)
    bad.write_text('[data]\ntrain = "x"\n[bundle]\ntemplates = ["a photo"]\n')
    with pytest.raises(T.ConfigError, match=r"bundle.templates: 'a photo' must contain"):
        T.load_config(bad)
    bad.write_text('[data]\ntrain = "x"\n[bundle]\nbg_thresh = 1.5\n')
    with pytest.raises(T.ConfigError, match=r"bundle.bg_thresh 1.5: must be in \(0, 1\)"):
        T.load_config(bad)
    bad.write_text('[data]\ntrain = "x"\n[optim]\nema_decay = 1\n')
    with pytest.raises(T.ConfigError, match=r"optim.ema_decay 1.0: expected 0 \(off\) or a number below 1"):
        T.load_config(bad)
    assert T.main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_example_configs_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.toml"))
    assert {"paper.toml", "finetune.toml", "synthetic.toml"} <= set(names)
    paper = T.load_config(root / "paper.toml")
    assert paper.optim.steps == 50000 and paper.optim.unfreeze_step == 30000 and paper.loss.tcl_w == 0.1
    for n in names:
        T.load_config(root / n)


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__)]))
