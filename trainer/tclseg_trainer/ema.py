"""An exponential moving average of a model's weights (`optim.ema_decay`), for the recipes that train at a high LR.

TCL at a small batch and a high peak LR moves fast: in the synthetic world `val` mIoU swings by 10-25 points between
evaluations 25 steps apart, and which checkpoint lands on a good swing decides the result. The average over the last
~1 / (1 - decay) steps smooths those swings; the training itself (losses, optimizer, data) is unchanged, and only
what is evaluated, kept as best.pt and exported is the average. The paper trains without one (decay 0, the default).
Measured in the synthetic world (trainer/notes/synthetic-diagnosis.md, sections 9 and 10) it lifts some seeds by 4-5
points of held-out mIoU and leaves others within a point or lower; with the background-naming CLIP it lifts the seed
`val` picks by 3.8, and the synthetic recipe uses it (0.95).

The average covers the floating-point state-dict entries under the given prefixes (the trainer passes the parts that
train, so the frozen CLIP encoders are not copied: for ViT-B/16 that would be ~600 MB more). The copied ViT block,
frozen until `unfreeze_step`, is in the average from the start and follows it once it moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer step; starts at the model's weights."""

    def __init__(self, model: nn.Module, decay: float, prefixes: tuple[str, ...] = ("",)) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay: expected a number in (0, 1), found {decay}")
        self.decay = decay
        self.prefixes = prefixes
        self.restart(model)

    def restart(self, model: nn.Module) -> None:
        """The average becomes the model's current weights."""
        self.shadow = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if v.is_floating_point() and k.startswith(self.prefixes)
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            avg = self.shadow.get(name)
            if avg is not None:
                avg.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own weights again after it."""
        state = model.state_dict()
        live = {k: state[k].detach().clone() for k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(live, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"the checkpoint's weight average lacks {len(missing)} tensors, e.g. {missing[0]!r}")
        for name, avg in self.shadow.items():
            avg.copy_(state[name])
