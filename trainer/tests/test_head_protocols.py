"""The eval presets of the training-free methods: every paper dataset covered, values in range, every value sourced,
and the headline differences between the two protocols that a copy-paste slip would erase."""

from __future__ import annotations

import re
from dataclasses import fields

from tclseg_trainer.head_protocols import PAPER_DATASETS, PROTOCOLS, DatasetProtocol
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
