"""The eval presets of the training-free methods: every paper dataset covered, values in range, every value sourced,
and the headline differences between the two protocols that a copy-paste slip would erase."""

from __future__ import annotations

import re
from dataclasses import fields

from tclseg_trainer.head_protocols import (
    CLIP_MEAN,
    EVAL_KEYS,
    IMAGENET_TEMPLATES,
    PAPER_DATASETS,
    PROTOCOLS,
    DatasetProtocol,
    bundle_protocols,
)
from tclseg_trainer.heads import HEADS

SOURCE = re.compile(r"^[\w-]+/[\w-]+@[0-9a-f]{10}:[\w/.]+\.(py|md|txt):\d+")


def test_every_protocol_covers_the_paper_suite_with_sourced_values():
    valued = [f.name for f in fields(DatasetProtocol) if f.name != "sources"]
    for name, protocol in PROTOCOLS.items():
        assert protocol.head in HEADS, name
        assert set(protocol.datasets) == set(PAPER_DATASETS), name
        for key, d in protocol.datasets.items():
            assert set(d.sources) == set(valued), (name, key)
            assert all(SOURCE.match(s) for s in d.sources.values()), (name, key, d.sources)
            assert d.short_side >= 224 and d.stride > 0 and d.logit_scale > 0, (name, key)
            assert 0.0 <= d.prob_thresh < 1.0, (name, key)
            assert d.window is None or d.stride <= d.window, (name, key)


def test_the_protocols_differ_where_the_methods_do():
    nac, scl = PROTOCOLS["naclip"].datasets, PROTOCOLS["sclip"].datasets
    assert nac["voc21"].window is None and scl["voc21"].window == 224  # NACLIP: VOC without sliding windows
    assert (scl["voc21"].logit_scale, nac["voc21"].logit_scale) == (65.0, 40.0)
    assert nac["ade"].pamr and not scl["ade"].pamr
    assert nac["cityscapes"].short_side == scl["cityscapes"].short_side == 560
    assert (scl["stuff"].short_side, nac["stuff"].short_side) == (448, 336)


def test_each_head_has_its_protocol_with_defaults_and_the_80_templates():
    assert set(PROTOCOLS) == set(HEADS)
    assert len(IMAGENET_TEMPLATES) == 80 and all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    for name, protocol in PROTOCOLS.items():
        assert protocol.defaults is not None and protocol.defaults.window is not None, name
        assert SOURCE.match(protocol.pos_resize_source), (name, protocol.pos_resize_source)
        assert protocol.pos_resize == "scale", name
    clear, pearl = PROTOCOLS["clearclip"], PROTOCOLS["pearl"]
    assert (clear.defaults.window, clear.defaults.stride, clear.defaults.logit_scale) == (448, 224, 50.0)
    assert clear.datasets["voc21"].prob_thresh == 0.5 and clear.datasets["cityscapes"].window == 224
    assert (pearl.defaults.window, pearl.defaults.short_side) == (224, 336)
    assert PROTOCOLS["maskclip"].datasets == clear.datasets  # ClearCLIP's code runs MaskCLIP


def test_a_bundle_gets_a_trunk_per_window_and_rule_and_the_eval_dataset_names():
    tables = bundle_protocols(["naclip", "sclip", "clearclip", "tcl"], crop_size=448, patch=16, train_grid=14)
    assert set(tables) == {"naclip", "sclip", "clearclip"}
    nac, scl, clear = (tables[n][1] for n in ("naclip", "sclip", "clearclip"))
    # 224 windows are CLIP's native grid, where both rules leave the table as it is: one trunk for both.
    assert nac.trunk == scl.trunk == "image_trunk_224" and nac.head == "naclip_head_224"
    # 448 windows: the bundle's trunk has TCL's "size" rule, the methods need "scale".
    assert (clear.trunk, clear.head) == ("image_trunk_448_scale", "clearclip_head")
    at224 = bundle_protocols(["naclip"], crop_size=224, patch=16, train_grid=14)["naclip"][1]
    assert (at224.trunk, at224.head) == ("image_trunk", "naclip_head")
    table = tables["naclip"][0]
    assert set(table["datasets"]) == set(EVAL_KEYS.values())
    assert table["datasets"]["voc"]["whole_image"] and table["datasets"]["voc"]["prob_thresh"] == 0.1
    assert (table["crop_size"], table["crop_stride"], table["short_side"]) == (224, 112, 336)
    assert abs(table["mean"][0] * 255 - CLIP_MEAN[0]) < 1e-9 and table["templates"] == list(IMAGENET_TEMPLATES)
