"""The official side of `official_parity`: kakaobrain/tcl's own evaluation path on a folder of photos.

Runs in the separate official environment (set up by scripts/setup-official: mmsegmentation 0.27.0, mmcv 1.6.2
without compiled ops), never in the trainer's; it imports nothing from tclseg_trainer. The official code is
imported at run time from its checkout (`--official`), unchanged. What runs is what `main.py --eval` runs for one
dataset, minus the parts that need a GPU or a data set on disk:

- the config: `configs/tcl.yml` (with its `_base_` chain) merged with `configs/eval.yml`, then the README's
  no-PAMR options when asked (`evaluate.pamr=false evaluate.bg_thresh=0.5`), and `model.clip_model` pointing at the
  CLIP file (sclip loads a path as it loads a downloaded `ViT-B-16.pt`);
- the model: `models.build_model(cfg.model)` and `utils.load_checkpoint` (the official loader of tcl.pth);
- the data: mmseg's `CustomDataset` over `--images` with the test pipeline and test_cfg of the official VOC config
  (`segmentation/configs/_base_/datasets/pascal_voc12.py`): the classes are background + `--queries`, so
  `build_seg_inference` adds the constant background channel as it does for VOC;
- inference: `build_seg_inference` (TCLSegInference), official `build_seg_dataloader`, mmseg's `single_gpu_test`
  under `MMDataParallel` on the CPU. `main.py` uses `multi_gpu_test` under `MMDistributedDataParallel`, which
  gather results through CUDA; on one process they run the same per-image call,
  `model(return_loss=False, **data)`.

Shims, all import-only (nothing they stand for runs on this path): `webdataset` (the training loader; 0.1.103 does
not import on Python 3.11), `mmcv.ops` (compiled ops, not built: mmseg imports loss and head ops at import time).
A one-process gloo group stands in for torchrun's, because the official data loader samples per rank.

The scores written are mmseg's crop-averaged, resized `slide_inference` output before its softmax (what
tclseg's soft scores are); the labels are what `single_gpu_test` returns (argmax after the softmax).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path


def _import_only_module(name: str, why: str) -> types.ModuleType:
    """A stand-in module for an import that this path never uses: any name imported from it is a class that
    raises, naming itself and `why`, if anything ever calls or instantiates it."""
    module = types.ModuleType(name)

    def getattr_(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def refuse(*_args, **_kwargs):
            raise RuntimeError(f"{name}.{attr} is not available in the official-parity environment: {why}")

        return type(attr, (), {"__init__": refuse, "__call__": refuse})

    module.__getattr__ = getattr_  # PEP 562
    return module


def install_shims() -> None:
    sys.modules.setdefault(
        "webdataset", _import_only_module("webdataset", "the official training loader; evaluation never uses it")
    )
    import mmcv

    ops = _import_only_module("mmcv.ops", "mmcv is built without compiled ops (MMCV_WITH_OPS=0)")
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="kakaobrain/tcl checkout")
    ap.add_argument("--clip", required=True, type=Path)
    ap.add_argument("--tcl", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path, help="folder of .png photos")
    ap.add_argument("--queries", required=True, help="JSON list of class names (background is added first)")
    ap.add_argument("--settings", required=True, help='JSON {name: {"pamr": bool, "bg_thresh": float}}')
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    official = args.official.resolve()
    images = args.images.resolve()
    clip, tcl, out = args.clip.resolve(), args.tcl.resolve(), args.out.resolve()
    # The official code reads its configs by relative path and imports its packages from its root.
    os.chdir(official)
    sys.path.insert(0, str(official))
    install_shims()

    import numpy as np
    import torch
    import torch.distributed as dist
    from datasets import build_text_transform
    from mmcv import Config
    from mmcv.parallel import MMDataParallel
    from mmseg.apis import single_gpu_test
    from mmseg.datasets import build_dataset
    from models import build_model
    from omegaconf import OmegaConf
    from segmentation.evaluation import build_seg_dataloader, build_seg_inference
    from utils import get_logger, load_checkpoint, load_config

    torch.set_num_threads(args.threads)
    store = Path(tempfile.mkdtemp(prefix="tcl-official-")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)

    queries = json.loads(args.queries)
    settings = json.loads(args.settings)
    seg_config = "segmentation/configs/_base_/datasets/pascal_voc12.py"
    test = Config.fromfile(seg_config).data.test
    dataset = build_dataset(
        dict(
            type="CustomDataset",
            pipeline=test.pipeline,
            img_dir=str(images),
            img_suffix=".png",
            classes=["background", *queries],
            test_mode=True,
        )
    )
    names = [Path(info["filename"]).stem for info in dataset.img_infos]

    def config(options: dict) -> OmegaConf:
        """main.py --resume ... --eval: tcl.yml (+ its bases), the run's config.json (none here), eval.yml, then
        --opts (the README's no-PAMR line sets evaluate.pamr and evaluate.bg_thresh)."""
        cfg = OmegaConf.merge(load_config("configs/tcl.yml"), OmegaConf.load("configs/eval.yml"))
        opts = [f"model.clip_model={clip}"]
        if options:
            opts += [f"evaluate.pamr={str(options['pamr']).lower()}", f"evaluate.bg_thresh={options['bg_thresh']}"]
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(opts))
        cfg.checkpoint.resume = str(tcl)
        cfg.evaluate.eval_only = True
        cfg.output = str(out / "log")  # main.py: output/eval, where the logger writes log.txt
        return cfg

    start = time.perf_counter()
    (out / "log").mkdir(parents=True, exist_ok=True)  # main.py: os.makedirs(cfg.output)
    get_logger(config({}))  # main.py sets the logger up from the config before anything logs
    model = build_model(config({}).model)
    load_checkpoint(config({}), model, None, None, None)
    model.eval()
    print(json.dumps({"model_seconds": round(time.perf_counter() - start, 1)}), flush=True)

    for setting, options in settings.items():
        start = time.perf_counter()
        cfg = config(options)
        loader = build_seg_dataloader(dataset)
        seg_model = build_seg_inference(model, dataset, build_text_transform(), cfg, seg_config)

        # The pre-softmax scores: slide_inference's output, recorded on the way through (its code unchanged).
        scores: list[np.ndarray] = []
        slide = seg_model.slide_inference

        def recording_slide(img, img_meta, rescale, slide=slide, scores=scores):
            logits = slide(img, img_meta, rescale)
            scores.append(logits[0].detach().float().cpu().numpy())
            return logits

        seg_model.slide_inference = recording_slide
        runner = MMDataParallel(seg_model, device_ids=None)
        runner.eval()
        labels = single_gpu_test(runner, loader, pre_eval=False, format_only=False)
        if len(labels) != len(names) or len(scores) != len(names):
            raise SystemExit(f"expected {len(names)} results, got {len(labels)} label maps, {len(scores)} scores")
        folder = out / setting
        folder.mkdir(parents=True, exist_ok=True)
        for name, label, score in zip(names, labels, scores, strict=True):
            np.save(folder / f"{name}.labels.npy", np.asarray(label, dtype=np.int64))
            np.save(folder / f"{name}.scores.npy", score.astype(np.float32))
        seconds = time.perf_counter() - start
        print(json.dumps({"setting": setting, "images": len(names), "seconds": round(seconds, 1)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
