"""The training config (TOML, `python -m tclseg_trainer.train --config FILE`): one dataclass per table, defaults
from tcl.md §3, and a loader that rejects unknown keys, wrong types and out-of-range values naming the key and the
file, so a bad config fails before any data is opened or any weight is loaded."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import BundleDefaults
from .losses import LossWeights
from .model import SIZES


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------
# Configuration (TOML)


@dataclass
class ModelCfg:
    size: str = "tiny"  # a key of model.SIZES
    init: str = "random"  # "random", "clip:<OpenAI ViT-B-16.pt>" or "checkpoint:<trainer checkpoint>"
    seed: int = 0


@dataclass
class DataCfg:
    train: str = ""  # tar shard glob(s), folder, .csv or .jsonl
    batch_size: int = 64  # per process
    image_size: int = 224
    workers: int = 2
    shuffle_buffer: int = 1000
    scale_min: float = 0.08
    hflip: float = 0.5
    color_jitter: float = 0.4
    rand_augment: bool = True
    erase_p: float = 0.25
    resume: str = "reseed"  # "reseed" (new shuffle seed at resume) or "fast-forward" (replay to the same batch)


@dataclass
class OptimCfg:
    steps: int = 50000
    base_lr: float = 3e-4
    min_lr: float = 4e-5
    lr_batch: int = 4096  # the LRs are scaled by global_batch / lr_batch
    warmup_steps: int = 15000
    warmup_start: float = 1e-4  # warm-up starts at this fraction of the peak LR
    unfreeze_step: int = 30000  # the copied ViT block trains from here on
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    clip_grad: float = 5.0
    amp: str = "fp16"  # "fp16" (GradScaler), "bf16" or "none"
    # 0: off (the paper). Else val evaluation, best.pt and the export use this moving average of the weights (ema.py)
    ema_decay: float = 0.0


@dataclass
class CheckpointCfg:
    dir: str = "runs/tcl"
    every: int = 1000
    keep_last: int = 3


@dataclass
class EvalCfg:
    data: str = ""  # labelled set: classes.txt, images/, labels/ (empty: no evaluation)
    every: int = 5000
    max_images: int = 0  # 0 = all
    short_side: int = 448
    crop: int = 448
    bg_thresh: float = 0.5
    kp_w: float = 0.0
    templates: str = "custom"  # "custom": the [bundle] templates (default: the 9 official ones); "none": the name alone


@dataclass
class LogCfg:
    every: int = 10
    tensorboard: bool = False


@dataclass
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    loss: LossWeights = field(default_factory=LossWeights)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    bundle: BundleDefaults = field(default_factory=BundleDefaults)  # written into the exported bundle
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    """Builds a TrainConfig, rejecting unknown sections/keys and wrong types with their location."""
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in sections:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sections)})")
        default = TrainConfig().__getattribute__(key)
        if not dataclasses.is_dataclass(default):
            if not isinstance(value, type(default)):
                raise ConfigError(f"{where}: {key} must be {type(default).__name__}, found {value!r}")
            kwargs[key] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{key}] must be a table")
        names = {f.name: f for f in dataclasses.fields(default)}
        for k, v in value.items():
            if k not in names:
                raise ConfigError(f"{where}: unknown key {key}.{k} (known: {', '.join(names)})")
            want = getattr(default, k)
            ok = isinstance(v, type(want)) or (
                isinstance(want, float) and isinstance(v, int) and not isinstance(v, bool)
            )
            if not ok or (isinstance(want, int) and isinstance(v, bool) and not isinstance(want, bool)):
                raise ConfigError(f"{where}: {key}.{k} must be {type(want).__name__}, found {v!r}")
        kwargs[key] = type(default)(
            **{k: (float(v) if isinstance(getattr(default, k), float) else v) for k, v in value.items()}
        )
    cfg = TrainConfig(**kwargs)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if cfg.model.size not in SIZES:
        bad(f"model.size {cfg.model.size!r} is not one of {', '.join(SIZES)}")
    if not (cfg.model.init == "random" or re.match(r"^(clip|checkpoint):.+", cfg.model.init)):
        bad(f"model.init {cfg.model.init!r}: expected 'random', 'clip:<file>' or 'checkpoint:<file>'")
    if not cfg.data.train:
        bad("data.train is required (tar shard glob, folder, .csv or .jsonl)")
    if cfg.data.batch_size < 1:
        bad("data.batch_size must be >= 1")
    if cfg.data.image_size % SIZES[cfg.model.size].vision.patch_size:
        bad(f"data.image_size {cfg.data.image_size} must be a multiple of the patch size")
    if cfg.data.resume not in ("reseed", "fast-forward"):
        bad(f"data.resume {cfg.data.resume!r}: expected 'reseed' or 'fast-forward'")
    if cfg.optim.amp not in ("fp16", "bf16", "none"):
        bad(f"optim.amp {cfg.optim.amp!r}: expected 'fp16', 'bf16' or 'none'")
    if cfg.optim.steps < 1 or cfg.optim.warmup_steps < 0 or cfg.optim.warmup_steps > cfg.optim.steps:
        bad("optim.steps must be >= 1 and 0 <= optim.warmup_steps <= optim.steps")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        bad(f"optim.ema_decay {cfg.optim.ema_decay}: expected 0 (off) or a number below 1, e.g. 0.95")
    if len(cfg.optim.betas) != 2:
        bad("optim.betas must have two entries")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep_last < 1:
        bad("checkpoint.every and checkpoint.keep_last must be >= 1")
    if cfg.eval.data and cfg.eval.every < 1:
        bad("eval.every must be >= 1")
    if cfg.eval.templates not in ("custom", "none"):
        bad(f"eval.templates {cfg.eval.templates!r}: expected 'custom' or 'none'")
    for problem in cfg.bundle.problems():
        bad(f"bundle.{problem}")


def load_config(path: str | os.PathLike) -> TrainConfig:
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    cfg = config_from_dict(d, str(p))
    # relative paths are relative to the config file
    base = p.resolve().parent

    def rel(s: str) -> str:
        return ",".join(
            str(base / x.strip()) if x.strip() and not os.path.isabs(x.strip()) else x for x in s.split(",")
        )

    cfg.data.train = rel(cfg.data.train)
    if cfg.eval.data:
        cfg.eval.data = rel(cfg.eval.data)
    if not os.path.isabs(cfg.checkpoint.dir):
        cfg.checkpoint.dir = str(base / cfg.checkpoint.dir)
    kind, _, file = cfg.model.init.partition(":")
    if file and not os.path.isabs(file):
        cfg.model.init = f"{kind}:{base / file}"
    return cfg
