"""The synthetic world: generator invariants, and (slow) a short recipe run that beats the step-0 grounder."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tclseg_trainer import data as D
from tclseg_trainer import train as T
from tclseg_trainer.model import SIZES, TCL
from tclseg_trainer.tools import sample_sheet as SS
from tclseg_trainer.tools import synthetic as S
from tclseg_trainer.tools import synthetic_diag as G

# 1 torch thread for these tests (cores are shared), restored afterwards: other modules assume 2.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_scene_labels_match_objects_and_captions_name_them():
    rng = random.Random(0)
    for _ in range(20):
        img, objmap, objects = S.draw_scene(rng)
        assert img.shape == (S.SIZE, S.SIZE, 3) and objmap.shape == (S.SIZE, S.SIZE)
        assert len({c for c, _ in objects}) == len({s for _, s in objects}) == len(objects)
        shapes, colours = S.label_map(objmap, objects, "shape"), S.label_map(objmap, objects, "colour")
        assert {S.SHAPES[k - 1] for k in np.unique(shapes) if k} <= {s for _, s in objects}
        assert {list(S.COLOURS)[k - 1] for k in np.unique(colours) if k} <= {c for c, _ in objects}
        assert np.array_equal(shapes > 0, objmap > 0) and np.array_equal(colours > 0, objmap > 0)
        for i, (colour, _) in enumerate(objects, start=1):  # each object's pixels carry its colour
            if (objmap == i).any():
                rgb = img[objmap == i].astype(int).max(axis=0)
                assert np.abs(rgb - np.array(S.COLOURS[colour])).max() <= 1, (colour, rgb)
        cap = S.caption_for(objects, rng)
        assert any(s in cap for _, s in objects)
        assert all(
            w in {*S.SHAPES, *S.COLOURS, "a", "and", "with", "picture", "of", "there", "is"}
            for w in cap.replace(",", " ").replace(";", " ").split()
        )


def test_background_words_name_backgrounds_apart_from_object_colours():
    plain = [c for _, c, _ in itertools.islice(iter(S.SceneStream(0)), 40)]
    named = [c for _, c, _ in itertools.islice(iter(S.SceneStream(0, background_words=True)), 40)]
    assert not any(c.endswith(" background") for c in plain)
    tails = [c.rsplit(" on a ", 1)[1] for c in named if c.endswith(" background")]
    assert 15 <= len(tails) <= 38  # 7 in 10 of 40 captions
    assert {t.removesuffix(" background") for t in tails} <= set(S.BACKGROUND_WORDS)
    assert not set(S.BACKGROUND_WORDS) & set(S.COLOURS)
    assert S.background_word(np.array([35.0, 100.0, 35.0])) == "olive"  # a dull green is not "green"
    assert S.background_word(np.array([20.0, 20.0, 30.0])) == "black"


def test_generate_and_score(tmp_path: Path):
    S.generate(tmp_path, n_train=3, n_eval=2, seed=1)
    assert len(list((tmp_path / "train").glob("*.txt"))) == 3
    classes, _ = D.load_eval_set(str(tmp_path / "eval-shapes"))
    assert classes == list(S.SHAPES)
    classes, pairs = D.load_eval_set(str(tmp_path / "eval"))
    assert classes == list(S.COLOURS) and len(pairs) == 2
    pred = tmp_path / "pred"
    pred.mkdir()
    for img, lab in pairs:  # perfect predictions score 1, the baselines less
        Image.open(lab).save(pred / f"{img.stem}.labels.png")
    r = S.score(pred, tmp_path / "eval")
    assert r["miou"] == 1.0 and r["chance_uniform"] < 0.5 and r["all_background"] < 1.0
    assert r["per_class"]["all_background"]["background"] > 0 and not r["per_class"]["all_background"]["red"] > 0
    # the held-out table: header, rule, the two baselines, then one row per prediction, per class background first
    lines = S.table(tmp_path / "eval", [("perfect", pred)]).splitlines()
    assert lines[0].startswith("| predictor | mIoU | background | red |") and len(lines) == 5
    assert lines[2].startswith("| chance") and lines[3].startswith("| all background | ")
    perfect = lines[4].split(" | ")
    assert perfect[:2] == ["| perfect", "100.0"] and set(perfect[2:-1]) <= {"100.0", "-"}
    # the layout is `tclseg eval --dataset folder`'s: background first, by threshold
    (tmp_path / "eval" / "classes.txt").write_text("red\ngreen\n")
    with pytest.raises(D.DataError, match=r"classes.txt: the first class must be 'background'.*'red'"):
        D.load_eval_set(str(tmp_path / "eval"))


def test_seed_config_keeps_the_recipe_and_pick_reads_only_val_scores(tmp_path: Path):
    """scripts/synthetic-world trains the config once per seed and keeps the run `val` ranks best."""
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic.toml"
    path = S.seed_config(config, 2, tmp_path / "tcl")
    assert path == tmp_path / "tcl" / "seed-2.toml"
    base, copy = T.load_config(config), T.load_config(path)
    assert copy.seed == 2 and Path(copy.checkpoint.dir) == (tmp_path / "tcl" / "seed-2").resolve()
    # everything else is the recipe, with the same files (paths were relative to the config's folder)
    assert Path(copy.data.train) == Path(base.data.train).resolve()
    assert Path(copy.eval.data) == Path(base.eval.data).resolve()
    assert copy.model.init == "checkpoint:" + str(Path(base.model.init.split(":", 1)[1]).resolve())
    copy.seed, copy.checkpoint.dir = base.seed, base.checkpoint.dir
    copy.data.train, copy.eval.data, copy.model.init = base.data.train, base.eval.data, base.model.init
    assert copy.to_dict() == base.to_dict()
    # pick: the highest best.pt score, whatever the order
    runs = []
    for seed, score in [(0, 0.61), (1, 0.72), (2, 0.55)]:
        run = tmp_path / f"seed-{seed}"
        run.mkdir()
        torch.save({"best_miou": score, "state_dict": {}}, run / "best.pt")
        runs.append(run)
    best, scores = S.pick_best(runs)
    assert best == runs[1] and [round(s, 2) for _, s in scores] == [0.61, 0.72, 0.55]
    with pytest.raises(FileNotFoundError):
        S.pick_best([tmp_path / "missing"])


def test_calibration_raises_a_threshold_only_where_it_removes_false_positives():
    """Two queries over a floor of 0.4: query 0 (label 1) is right where it scores 0.8 and wrong on background pixels
    where it scores 0.5; query 1 (label 2) is right everywhere it wins. The search lifts query 0 above 0.5 (the
    lowest grid value that drops the false positives, 0.55) and leaves query 1 at the floor, and applying the
    result through `apply_query_thresholds` gives the labels it scored."""
    from tclseg_trainer.bundle_infer import apply_query_thresholds

    labels = np.array([[[1, 1, 0, 0, 2, 2]]])
    q0 = np.array([[[0.8, 0.8, 0.5, 0.5, 0.1, 0.1]]])
    q1 = np.array([[[0.1, 0.1, 0.1, 0.1, 0.45, 0.45]]])
    scores = np.stack([q0, q1], axis=1)  # [N, Q, H, W]
    th, before, after = S.search_query_thresholds(scores, labels, 0.4)
    assert th == [0.55, 0.4]
    assert before == pytest.approx((0.0 + 0.5 + 1.0) / 3) and after == pytest.approx(1.0)
    with_bg = np.concatenate([np.full((1, 1, 6), 0.4), scores[0]], axis=0)  # the engine's background class in front
    got = apply_query_thresholds(with_bg, with_bg.argmax(axis=0), th)
    assert got.tolist() == labels[0].tolist()


def test_sample_sheet_counts_found_objects_and_stacks_inputs_over_outputs(tmp_path: Path):
    S.write_samples(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    drawn = SS.sample_labels(2)
    for i, (img, labels, _) in enumerate(drawn):  # perfect labels for shapes-0, nothing found in shapes-1
        Image.fromarray(labels if i == 0 else np.zeros_like(labels)).save(out / f"shapes-{i}.labels.png")
        Image.fromarray(img).save(out / f"shapes-{i}.overlay.jpg")
    rows = SS.objects_found(tmp_path / "in", out)
    assert [r["image"] for r in rows] == ["shapes-0.png"] * len(drawn[0][2]) + ["shapes-1.png"] * len(drawn[1][2])
    assert all(r["found"] == (r["image"] == "shapes-0.png") for r in rows)
    sheet = SS.contact_sheet(tmp_path / "in", out, tmp_path / "sheet.png")
    assert (tmp_path / "sheet.png").is_file() and sheet.height > 3 * S.SIZE and sheet.width > SS.COLUMNS * S.SIZE
    # a sample that is not the generator's cannot be labelled
    Image.fromarray(np.zeros((S.SIZE, S.SIZE, 3), np.uint8)).save(tmp_path / "in" / "shapes-1.png")
    with pytest.raises(ValueError, match="not the generator's sample"):
        SS.objects_found(tmp_path / "in", out)


def test_diagnosis_helpers():
    # caption parsing: a "colour shape" phrase names that object only; a bare shape names the object of that shape
    assert G.named_by("a red circle and blue square", "red", "circle")
    assert not G.named_by("a red circle and blue square", "green", "circle")
    assert G.named_by("there is cross; a white square", "green", "cross")
    assert not G.named_by("a red circle", "red", "square")
    # patch majority: a 2x2 grid of 4-pixel patches, the top-left patch three-quarters class 2
    lab = np.zeros((1, 8, 8), dtype=np.uint8)
    lab[0, :3, :4] = 2
    lab[0, 4:, 4:] = 1
    assert G.patch_majority(lab, 4, 3).tolist() == [[[2, 0], [0, 1]]]
    # AUROC: perfect, inverted and tied rankings
    pos = np.array([True, True, False, False])
    assert G.auroc(np.array([0.9, 0.8, 0.1, 0.2]), pos) == 1.0
    assert G.auroc(np.array([0.1, 0.2, 0.9, 0.8]), pos) == 0.0
    assert G.auroc(np.array([0.5, 0.4, 0.5, 0.4]), pos) == 0.5


def test_dense_pretraining_objective_adds_a_pooled_patch_term():
    model = TCL(SIZES["tiny"], seed=0)
    images = torch.randn(2, 3, 64, 64)
    (cls,) = S.pretrain_image_embeddings(model, images, "cls")
    cls2, pooled = S.pretrain_image_embeddings(model, images, "dense")
    assert cls.shape == pooled.shape == (2, model.config.vision.embed_dim)
    # the dense objective's CLS term is CLIP's own embedding; its second term is the mean of the MaskCLIP map
    torch.testing.assert_close(cls2, cls)
    tokens = model.trunk_tokens(images)
    torch.testing.assert_close(pooled, model.kp_features(tokens, (4, 4)).mean(dim=(2, 3)))


@pytest.mark.slow
def test_short_recipe_beats_step0(tmp_path: Path):
    """Few-minute CPU version of scripts/synthetic-world, scored in Python (train.evaluate) on the val set."""
    S.generate(tmp_path / "world", n_train=800, n_eval=40, seed=0)
    S.pretrain_clip(tmp_path / "clip.pt", steps=300, batch=32, workers=0, size="small", background_words=True)
    cfg = T.load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic.toml")
    cfg.model.init = f"checkpoint:{tmp_path / 'clip.pt'}"
    cfg.data.train = str(tmp_path / "world/train")
    cfg.data.workers = 0
    cfg.eval.data = str(tmp_path / "world/val")
    cfg.checkpoint.dir = str(tmp_path / "run")
    # The recipe's schedule as configured (trainer/configs/synthetic.toml: the small model pretrained with captions
    # that name the background, 200 steps of 8 at 16x the paper's scaled LR, unfreezing at 160, the weight average),
    # one seed, evaluated every 50 steps only to save time. Measured 2026-12-07 (Intel Xeon, 5 min beside another
    # job): step 0 scores 0.130 on these 40 images, the evaluations 0.315 / 0.545 / 0.546 / 0.486. The margin, 0.15,
    # sits under the weakest evaluation's gain (0.185) and near a third of the best's: a grounder that does not learn
    # (or unlearns) stays at or under step 0, and another CPU's rounding still clears it.
    assert cfg.model.size == "small" and cfg.optim.steps == 200 and cfg.data.batch_size == 8
    assert cfg.optim.ema_decay == 0.95
    cfg.eval.every = 50
    step0 = T.evaluate(T.build_model(cfg), cfg.eval, T.Tokenizer(), cfg.bundle.templates)
    summary = T.train(cfg)
    assert summary["best_miou"] > step0 + 0.15, (step0, summary)
