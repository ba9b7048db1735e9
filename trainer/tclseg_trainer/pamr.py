"""PAMR: Pixel-Adaptive Mask Refinement (Araslanov & Roth, CVPR 2020), as TCL uses it at inference.

For every pixel p and each dilation d in (1, 2, 4, 8, 12, 24), the 8 neighbours at distance d (replicate
padding at the borders) give 48 neighbour positions. Per colour channel c:

    std_c(p)  = unbiased std of the 54 samples {the dilated 3x3 neighbourhood of p, centre included} over
                all 6 dilations (the centre therefore appears 6 times);
    a_c(p, k) = -|I_c(p) - I_c(p + delta_k)| / (1e-8 + 0.1 * std_c(p)).

The affinity a(p, k) = mean_c a_c(p, k) is soft-maxed over the 48 neighbours. Each of the `num_iter`
iterations replaces every mask value with the affinity-weighted mean of its 48 neighbours (the centre is not
one of them). The affinity depends only on the image, so it is computed once and shared by all classes.

Written for ONNX export (opset 18, dynamo=False): neighbours are gathered with fixed one-hot dilated convs on
replicate-padded inputs (Pad mode=edge), classes are folded into the batch with a -1 reshape, and there is no
data-dependent Python control flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DILATIONS = (1, 2, 4, 8, 12, 24)
NUM_ITER = 10


def _one_hot_kernels(include_centre: bool) -> torch.Tensor:
    """[K, 1, 3, 3] kernels that each pick one position of a 3x3 window (raster order)."""
    positions = [(i, j) for i in range(3) for j in range(3) if include_centre or (i, j) != (1, 1)]
    kernel = torch.zeros(len(positions), 1, 3, 3)
    for k, (i, j) in enumerate(positions):
        kernel[k, 0, i, j] = 1.0
    return kernel


class PAMR(nn.Module):
    def __init__(self, num_iter: int = NUM_ITER, dilations: tuple[int, ...] = DILATIONS):
        super().__init__()
        self.num_iter = int(num_iter)
        self.dilations = tuple(int(d) for d in dilations)
        # Not persistent: these are constants, not learned state.
        self.register_buffer("neighbours", _one_hot_kernels(include_centre=False), persistent=False)
        self.register_buffer("window", _one_hot_kernels(include_centre=True), persistent=False)

    def _gather(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """x [M, 1, h, w] -> [M, K * len(dilations), h, w]: the kernel's positions at every dilation."""
        out = []
        for d in self.dilations:
            padded = F.pad(x, [d, d, d, d], mode="replicate")
            out.append(F.conv2d(padded, kernel.to(x.dtype), dilation=d))
        return torch.cat(out, dim=1)

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, h, w] -> softmaxed affinity [B, 1, 48, h, w]."""
        B, C, h, w = image.shape
        flat = image.reshape(-1, 1, h, w)  # colour channels folded into the batch
        samples = self._gather(flat, self.window)  # [B*C, 54, h, w]
        std = samples.std(dim=1, keepdim=True, unbiased=True)  # [B*C, 1, h, w]
        diff = (flat - self._gather(flat, self.neighbours)).abs()  # [B*C, 48, h, w]
        aff = -diff / (1e-8 + 0.1 * std)
        aff = aff.reshape(B, C, -1, h, w).mean(dim=1, keepdim=True)  # [B, 1, 48, h, w]
        return aff.softmax(dim=2)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image [B, 3, h, w] (already at the mask resolution), masks [B, N, h, w] -> refined [B, N, h, w]."""
        aff = self.affinity(image)
        B, N, h, w = masks.shape
        m = masks
        for _ in range(self.num_iter):
            neigh = self._gather(m.reshape(-1, 1, h, w), self.neighbours)  # [B*N, 48, h, w]
            neigh = neigh.reshape(B, -1, neigh.shape[1], h, w)  # [B, N, 48, h, w]
            m = (neigh * aff).sum(dim=2)
        return m
