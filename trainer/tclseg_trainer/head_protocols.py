"""Each training-free method's own evaluation protocol, as data: the values behind its paper's row.

A `Protocol` is what `tclseg eval --protocol NAME` is to apply (see issue 19, item 3): input scale, sliding window,
prompt set, background handling, probability threshold, logit scale and PAMR, per dataset where the method's
configs differ. Every value carries its source as `repository@commit:path:line` (the commits are the ones
../shared/reference/landscape.md §8 lists), so a reader can check it against the method's code.

Status: the presets are data only. Applying one needs a bundle exported at the protocol's window (`export
--crop-size 224`: the positional embedding is baked per crop size) and an eval that overrides the bundle's input and
head settings; NACLIP's and SCLIP's "whole image, no window" datasets (`window = None`) need a trunk graph per image
size, which a bundle does not have yet.

Shared facts of both harnesses (mmseg-based, the same in SCLIP and NACLIP):
- the image is resized keeping its aspect ratio to fit (2048, short) — `Resize(scale=(2048, short))` — i.e. the short
  side becomes `short` unless the long side would exceed 2048;
- CLIP's own normalisation (mean 122.771/116.746/104.094, std 68.501/66.632/70.323 on 0-255 RGB), not ImageNet's;
- the prompt set is the 80 OpenAI ImageNet templates (`prompts/imagenet_template.py`), each class embedding the mean
  of its normalised template embeddings, renormalised;
- a class line in `configs/cls_<dataset>.txt` may hold several comma-separated names; the class probability is the
  maximum over its names (this is how VOC21/Context60/Object's "background" line lists background words);
- logits are averaged over windows, bilinearly resized to the image, then softmax(logit_scale · logits) over
  names; pixels whose best probability is below `prob_thresh` become class 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NACLIP = "sinahmr/NACLIP@0cac3a651f"
SCLIP = "wangf3014/SCLIP@b56bd3014b"

# CLIP's pixel statistics on 0-255 RGB, as both harnesses' SegDataPreProcessor sets them.
CLIP_MEAN = (122.771, 116.746, 104.094)
CLIP_STD = (68.501, 66.632, 70.323)

PAPER_DATASETS = ("voc21", "context60", "object", "voc20", "context59", "stuff", "cityscapes", "ade")


@dataclass(frozen=True)
class DatasetProtocol:
    """One dataset's settings under a method's protocol; `sources` maps a field name to where its value comes from."""

    short_side: int
    window: int | None  # sliding-window crop side; None: the whole image in one pass
    stride: int
    logit_scale: float
    prob_thresh: float
    pamr: bool
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    name: str
    head: str
    templates: str  # "imagenet80": the 80 OpenAI ImageNet templates
    templates_source: str
    background_words_source: str
    datasets: dict[str, DatasetProtocol]


def _dataset(
    defaults: dict, default_sources: dict[str, str], cfg: str, short: int, short_line: int, **overrides
) -> DatasetProtocol:
    """One dataset: the method's defaults, the short side from its config file `cfg`, and (value, line) overrides
    from the same file."""
    values = dict(defaults)
    sources = dict(default_sources) | {"short_side": f"{cfg}:{short_line}"}
    for key, (value, line) in overrides.items():
        values[key] = value
        sources[key] = f"{cfg}:{line}"
    return DatasetProtocol(short_side=short, sources=sources, **values)


# NACLIP: defaults from naclip.py:20-22 (window 224, stride 112, logit scale 40, prob_thd 0). PAMR on as in its
# README's headline row (`test_all.sh reduced naclip 5 on`, README.md:54; eval.py:56-57 sets pamr_steps=10 with
# naclip.py:21's pamr_stride (8, 16)).
_NACLIP_DEFAULTS = {"window": 224, "stride": 112, "logit_scale": 40.0, "prob_thresh": 0.0, "pamr": True}
_NACLIP_SOURCES = {k: f"{NACLIP}:naclip.py:21-22" for k in _NACLIP_DEFAULTS} | {
    "pamr": f"{NACLIP}:README.md:54, eval.py:56-57"
}
# SCLIP: defaults from clip_segmentor.py:19-21 (window 224, stride 112, logit scale 40, prob_thd 0, no PAMR).
_SCLIP_DEFAULTS = {"window": 224, "stride": 112, "logit_scale": 40.0, "prob_thresh": 0.0, "pamr": False}
_SCLIP_SOURCES = {k: f"{SCLIP}:clip_segmentor.py:20-21" for k in _SCLIP_DEFAULTS}


def _nac(dataset_cfg: str, short: int, short_line: int, **overrides) -> DatasetProtocol:
    cfg = f"{NACLIP}:configs/{dataset_cfg}"
    return _dataset(_NACLIP_DEFAULTS, _NACLIP_SOURCES, cfg, short, short_line, **overrides)


def _sclip(dataset_cfg: str, short: int, short_line: int, **overrides) -> DatasetProtocol:
    cfg = f"{SCLIP}:configs/{dataset_cfg}"
    return _dataset(_SCLIP_DEFAULTS, _SCLIP_SOURCES, cfg, short, short_line, **overrides)


PROTOCOLS: dict[str, Protocol] = {
    "naclip": Protocol(
        name="naclip",
        head="naclip",
        templates="imagenet80",
        templates_source=f"{NACLIP}:naclip.py:13 (prompts/imagenet_template.py), naclip.py:35",
        background_words_source=f"{NACLIP}:configs/cls_voc21.txt:1 (first line: background words), naclip.py:178-189",
        datasets={
            "voc21": _nac("cfg_voc21.py", 336, 16, prob_thresh=(0.1, 6), window=(None, 7)),
            "context60": _nac("cfg_context60.py", 336, 15, prob_thresh=(0.1, 6)),
            "object": _nac("cfg_coco_object.py", 336, 15, prob_thresh=(0.1, 6)),
            "voc20": _nac("cfg_voc20.py", 336, 15, window=(None, 6)),
            "context59": _nac("cfg_context59.py", 336, 14),
            "stuff": _nac("cfg_coco_stuff164k.py", 336, 14),
            "cityscapes": _nac("cfg_city_scapes.py", 560, 14),
            "ade": _nac("cfg_ade20k.py", 336, 14),
        },
    ),
    "sclip": Protocol(
        name="sclip",
        head="sclip",
        templates="imagenet80",
        templates_source=f"{SCLIP}:clip_segmentor.py:7 (prompts/imagenet_template.py), clip_segmentor.py:38",
        background_words_source=f"{SCLIP}:configs/cls_voc21.txt:1 (first line: background words)",
        datasets={
            # SCLIP's VOC21 also drops classes covering under area_thd=0.1 of the image (cfg_voc21.py:8).
            "voc21": _sclip("cfg_voc21.py", 336, 17, logit_scale=(65.0, 6), prob_thresh=(0.1, 7)),
            "context60": _sclip("cfg_context60.py", 336, 16, logit_scale=(50.0, 6), prob_thresh=(0.1, 7)),
            "object": _sclip("cfg_coco_object.py", 336, 16, logit_scale=(50.0, 6), prob_thresh=(0.1, 7)),
            "voc20": _sclip("cfg_voc20.py", 336, 14),
            "context59": _sclip("cfg_context59.py", 336, 14),
            "stuff": _sclip("cfg_coco_stuff164k.py", 448, 14),
            "cityscapes": _sclip("cfg_city_scapes.py", 560, 14),
            "ade": _sclip("cfg_ade20k.py", 336, 14),
        },
    ),
}
