"""Each training-free method's own evaluation protocol, as data: the values behind its paper's row.

A `Protocol` is what `tclseg eval --protocol NAME` is to apply (see issue 19, item 3): input scale, sliding window,
prompt set, background handling, probability threshold, logit scale and PAMR, per dataset where the method's
configs differ. Every value carries its source as `repository@commit:path:line` (the commits are the ones
../shared/reference/landscape.md §8 lists), so a reader can check it against the method's code.

How a bundle carries them: `export` writes `bundle_protocols(...)` into model.toml's [protocols] (one table per
protocol of an exported head, with the dataset overrides under [protocols.<name>.datasets.<dataset>]) and exports
the graphs a protocol needs beside the bundle's own: a trunk at the protocol's window with its position-embedding
rule and the head graph at that window's grid (`protocol_graphs`). `tclseg segment/eval --protocol NAME` reads them
(src/model/bundle.rs, `Bundle::with_protocol`); the numbers live here only. Not carried: NACLIP's, SCLIP's and
PEARL's "whole image, no window" datasets (`window = None`: a trunk graph per image size) run at the protocol's
window; the background word lists (a class line's several names) are not in the presets, the probability threshold
alone makes background; PEARL's text-aware Laplacian propagation (`use_prop`, pearl_ovss.py:24) is not in
heads.py; PAMR under a method's protocol (its whole-image PAMR on logits) is not run.

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
CLEARCLIP = "mc-lan/ClearCLIP@ad68a404d5"
PEARL = "PGSmall/PEARL@c26062b506"

# OpenAI's 80 ImageNet prompt templates (CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb, MIT licence), the
# set every method here encodes a class name with (`prompts/imagenet_template.py` in each repository; the official
# comparison, tools/heads_parity.py, checks that this list equals the checkout's).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# How a method resizes CLIP's position embedding to a window's patch grid: "scale" is DINO's
# `interpolate_pos_encoding` rule, scale factor (g + 0.1) / 14, which all four take (clip.resize_pos_embed);
# TCL's bundle trunk uses "size".
POS_RESIZE = "scale"

# CLIP's pixel statistics on 0-255 RGB, as both harnesses' SegDataPreProcessor sets them.
CLIP_MEAN = (122.771, 116.746, 104.094)
CLIP_STD = (68.501, 66.632, 70.323)

PAPER_DATASETS = ("voc21", "context60", "object", "voc20", "context59", "stuff", "cityscapes", "ade")
# The same datasets by `tclseg eval`'s names (src/eval/datasets/tables.rs), the keys model.toml's
# [protocols.<name>.datasets] uses.
EVAL_KEYS = {
    "voc21": "voc",
    "context60": "context",
    "object": "coco_object",
    "voc20": "voc20",
    "context59": "context59",
    "stuff": "coco_stuff",
    "cityscapes": "cityscapes",
    "ade": "ade20k",
}


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
    # What `tclseg segment --protocol NAME` uses without a dataset: the method's own defaults at its usual scale.
    defaults: DatasetProtocol | None = None
    pos_resize: str = POS_RESIZE
    pos_resize_source: str = ""


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


# ClearCLIP (and MaskCLIP as its model_type='MaskCLIP'): defaults from clearclip_segmentor.py:22-23 (window 448,
# stride 224, logit scale 50, prob_thd 0), CLIP's statistics at :25-26, short side 448 in every config.
_CLEAR_DEFAULTS = {"window": 448, "stride": 224, "logit_scale": 50.0, "prob_thresh": 0.0, "pamr": False}
_CLEAR_SOURCES = {k: f"{CLEARCLIP}:clearclip_segmentor.py:22-23" for k in _CLEAR_DEFAULTS}
# PEARL: defaults from pearl_ovss.py:22 (window 224, stride 112, logit scale 40, prob_thd 0), no PAMR.
_PEARL_DEFAULTS = {"window": 224, "stride": 112, "logit_scale": 40.0, "prob_thresh": 0.0, "pamr": False}
_PEARL_SOURCES = {k: f"{PEARL}:pearl_ovss.py:22" for k in _PEARL_DEFAULTS}


def _clear(dataset_cfg: str, short: int, short_line: int, **overrides) -> DatasetProtocol:
    cfg = f"{CLEARCLIP}:configs/{dataset_cfg}"
    return _dataset(_CLEAR_DEFAULTS, _CLEAR_SOURCES, cfg, short, short_line, **overrides)


def _pearl(dataset_cfg: str, short: int, short_line: int, **overrides) -> DatasetProtocol:
    cfg = f"{PEARL}:configs/{dataset_cfg}"
    return _dataset(_PEARL_DEFAULTS, _PEARL_SOURCES, cfg, short, short_line, **overrides)


def _clear_protocol(head: str) -> Protocol:
    """ClearCLIP's protocol for `head` (ClearCLIP's own, or MaskCLIP as ClearCLIP's code runs it)."""
    return Protocol(
        name=head,
        head=head,
        templates="imagenet80",
        templates_source=f"{CLEARCLIP}:clearclip_segmentor.py (prompts/imagenet_template.py)",
        background_words_source=f"{CLEARCLIP}:configs/cls_voc21.txt:1 (first line: background words)",
        datasets=_clear_datasets(),
        defaults=_clear("cfg_ade20k.py", 448, 14),
        pos_resize_source=f"{CLEARCLIP}:open_clip/transformer.py:569 (interpolate_pos_encoding)",
    )


def _clear_datasets() -> dict[str, DatasetProtocol]:
    return {
        "voc21": _clear("cfg_voc21.py", 448, 15, prob_thresh=(0.5, 6)),
        "context60": _clear("cfg_context60.py", 448, 15, prob_thresh=(0.15, 6)),
        "object": _clear("cfg_coco_object.py", 448, 15, prob_thresh=(0.4, 6)),
        "voc20": _clear("cfg_voc20.py", 448, 14),
        "context59": _clear("cfg_context59.py", 448, 14),
        "stuff": _clear("cfg_coco_stuff164k.py", 448, 14),
        "cityscapes": _clear("cfg_city_scapes.py", 448, 15, window=(224, 6)),
        "ade": _clear("cfg_ade20k.py", 448, 14),
    }


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
        defaults=_nac("cfg_ade20k.py", 336, 14),
        pos_resize_source=f"{NACLIP}:clip/model.py:134 (interpolate_pos_encoding)",
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
        defaults=_sclip("cfg_ade20k.py", 336, 14),
        pos_resize_source=f"{SCLIP}:clip/model.py:263 (interpolate_pos_encoding)",
    ),
    "clearclip": _clear_protocol("clearclip"),
    # MaskCLIP as ClearCLIP's repository runs it (model_type='MaskCLIP': the value path), under ClearCLIP's protocol.
    "maskclip": _clear_protocol("maskclip"),
    "pearl": Protocol(
        name="pearl",
        head="pearl",
        templates="imagenet80",
        templates_source=f"{PEARL}:pearl_ovss.py (prompts/imagenet_template.py)",
        background_words_source=f"{PEARL}:configs/cls_voc21.txt:1 (first line: background words)",
        datasets={
            "voc21": _pearl("cfg_voc21.py", 336, 16, prob_thresh=(0.1, 6), window=(None, 7)),
            "context60": _pearl("cfg_context60.py", 336, 15, prob_thresh=(0.1, 6)),
            "object": _pearl("cfg_coco_object.py", 336, 15, prob_thresh=(0.1, 6)),
            "voc20": _pearl("cfg_voc20.py", 336, 15, window=(None, 6)),
            "context59": _pearl("cfg_context59.py", 336, 14),
            "stuff": _pearl("cfg_coco_stuff164k.py", 336, 14),
            "cityscapes": _pearl("cfg_city_scapes.py", 560, 16),
            "ade": _pearl("cfg_ade20k.py", 336, 15),
        },
        defaults=_pearl("cfg_ade20k.py", 336, 15),
        pos_resize_source=f"{PEARL}:clip/model.py:140 (interpolate_pos_encoding)",
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Into a bundle: the graphs a protocol needs and its model.toml table.


@dataclass(frozen=True)
class ProtocolGraphs:
    """The [graphs] roles one protocol runs: `trunk` (pixels -> block-11 tokens at `window`, position embedding by
    `pos_resize`) and `head` (tokens -> dense at the window's grid). A role may be the bundle's own."""

    trunk: str
    head: str
    window: int
    pos_resize: str
    method_head: str  # the heads.py head the `head` graph runs


def protocol_graphs(protocol: Protocol, crop_size: int, patch: int, train_grid: int) -> ProtocolGraphs:
    """The roles of `protocol` in a bundle whose own trunk is at `crop_size` with TCL's "size" rule: the bundle's own
    trunk where the window and the rule agree with it (any rule at CLIP's native grid, where both leave the table as
    it is), else `image_trunk_<window>` (native grid) or `image_trunk_<window>_<rule>`; the head graph
    `<head>_head` at the bundle's crop, else `<head>_head_<window>`."""
    if protocol.defaults is None or protocol.defaults.window is None:
        raise ValueError(f"protocol {protocol.name} has no default window")
    window = protocol.defaults.window
    native = window // patch == train_grid
    if window == crop_size and (native or protocol.pos_resize == "size"):
        trunk = "image_trunk"
    else:
        trunk = f"image_trunk_{window}" if native else f"image_trunk_{window}_{protocol.pos_resize}"
    head = f"{protocol.head}_head" if window == crop_size else f"{protocol.head}_head_{window}"
    return ProtocolGraphs(
        trunk=trunk, head=head, window=window, pos_resize=protocol.pos_resize, method_head=protocol.head
    )


def _unit_scale(values: tuple[float, ...]) -> list[float]:
    """0..255 statistics as the 0..1 values model.toml's [input] holds."""
    return [v / 255.0 for v in values]


def protocol_table(protocol: Protocol, graphs: ProtocolGraphs, long_side_max: int = 2048) -> dict:
    """model.toml's [protocols.<name>]: what `Bundle::with_protocol` (src/model/bundle.rs) applies, and where each
    value comes from. Datasets whose window is the whole image keep the protocol's window (module docstring)."""
    d = protocol.defaults
    assert d is not None and d.window is not None
    datasets = {}
    for name, ds in protocol.datasets.items():
        datasets[EVAL_KEYS[name]] = {
            "short_side": int(ds.short_side),
            "logit_scale": float(ds.logit_scale),
            "prob_thresh": float(ds.prob_thresh),
            "whole_image": ds.window is None,
        }
    sources = {f"default.{k}": v for k, v in d.sources.items()}
    sources |= {
        "templates": protocol.templates_source,
        "background_words": protocol.background_words_source,
        "pos_resize": protocol.pos_resize_source,
    }
    return {
        "head": protocol.head,
        "trunk": graphs.trunk,
        "graph": graphs.head,
        "pos_resize": graphs.pos_resize,
        "crop_size": int(d.window),
        "crop_stride": int(d.stride),
        "short_side": int(d.short_side),
        "long_side_max": int(long_side_max),
        "mean": _unit_scale(CLIP_MEAN),
        "std": _unit_scale(CLIP_STD),
        "logit_scale": float(d.logit_scale),
        "prob_thresh": float(d.prob_thresh),
        "pamr": bool(d.pamr),
        "fusion": "logits",
        "prompt_average": "unit",
        "templates": list(IMAGENET_TEMPLATES),
        "datasets": datasets,
        "sources": sources,
    }


def bundle_protocols(
    heads: list[str] | tuple[str, ...], crop_size: int, patch: int, train_grid: int
) -> dict[str, tuple[dict, ProtocolGraphs]]:
    """Every protocol of the exported heads, by name: its model.toml table and its graphs."""
    out = {}
    for name, protocol in PROTOCOLS.items():
        if protocol.head in heads:
            graphs = protocol_graphs(protocol, crop_size, patch, train_grid)
            out[name] = (protocol_table(protocol, graphs), graphs)
    return out
