"""The synthetic world: generator invariants, and (slow) a short recipe run that beats the step-0 grounder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tclseg_trainer import synthetic as S
from tclseg_trainer import train as T

# 1 torch thread for these tests (cores are shared), restored afterwards: other modules assume 2.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_scene_labels_match_objects_and_captions_name_them():
    rng = random.Random(0)
    for _ in range(20):
        img, labels, objects = S.draw_scene(rng)
        assert img.shape == (S.SIZE, S.SIZE, 3) and labels.shape == (S.SIZE, S.SIZE)
        present = {S.SHAPES[k - 1] for k in np.unique(labels) if k}
        assert present <= {s for _, s in objects}
        cap = S.caption_for(objects, rng)
        assert any(s in cap for _, s in objects)
        assert all(
            w in {*S.SHAPES, *S.COLOURS, "a", "and", "with", "picture", "of", "there", "is"}
            for w in cap.replace(",", " ").replace(";", " ").split()
        )


def test_generate_and_score(tmp_path: Path):
    S.generate(tmp_path, n_train=3, n_eval=2, seed=1)
    assert len(list((tmp_path / "train").glob("*.txt"))) == 3
    classes, pairs = T.load_eval_set(str(tmp_path / "eval"))
    assert classes == list(S.SHAPES) and len(pairs) == 2
    pred = tmp_path / "pred"
    pred.mkdir()
    for img, lab in pairs:  # perfect predictions score 1, the baselines less
        Image.open(lab).save(pred / f"{img.stem}.labels.png")
    r = S.score(pred, tmp_path / "eval")
    assert r["miou"] == 1.0 and r["chance_uniform"] < 0.5 and r["all_background"] < 1.0


@pytest.mark.slow
def test_short_recipe_beats_step0(tmp_path: Path):
    """Few-minute CPU version of scripts/synthetic-world, evaluated in Python (train.evaluate)."""
    S.generate(tmp_path / "world", n_train=600, n_eval=12, seed=0)
    S.pretrain_clip(str(tmp_path / "world/train"), tmp_path / "clip.pt", steps=300, batch=32)
    cfg = T.load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic.toml")
    cfg.model.init = f"checkpoint:{tmp_path / 'clip.pt'}"
    cfg.data.train = str(tmp_path / "world/train")
    cfg.data.workers = 0
    cfg.eval.data = str(tmp_path / "world/eval")
    cfg.checkpoint.dir = str(tmp_path / "run")
    cfg.optim.steps = 150
    cfg.optim.unfreeze_step = 100
    cfg.eval.every = 150
    step0 = T.evaluate(T.build_model(cfg), cfg.eval, T.Tokenizer())
    summary = T.train(cfg)
    assert summary["best_miou"] > step0 + 0.02, (step0, summary)
