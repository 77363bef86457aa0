"""Registration network ``R`` of Learning-to-Align (after RegGAN) and the resampler.

``R(moving, fixed)`` returns a dense displacement field ``phi`` of shape
``(N, 2, H, W)`` in pixels (x then y). Its last layer starts at zero, so
training starts from the identity field. Used in paired training only
(:mod:`digital_stain.train.student` with ``mode="paired"``); it is never part of a
model file. :func:`smoothness_loss` is the paper's ``L_smoo`` (eq. 6) on such a field.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, True))


class RegistrationNet(nn.Module):
    """Small encoder-decoder predicting a displacement field from two RGB images."""

    size_multiple = 8

    def __init__(self, in_channels: int = 6, width: int = 32, depth: int = 3):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, depth=depth)
        chans = [width * min(2**i, 4) for i in range(depth + 1)]
        self.stem = _block(in_channels, chans[0])
        self.down = nn.ModuleList(_block(chans[i], chans[i + 1], stride=2) for i in range(depth))
        self.up = nn.ModuleList(_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth)))
        self.flow = nn.Conv2d(chans[0], 2, 3, padding=1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(torch.cat([moving, fixed], dim=1))]
        for block in self.down:
            skips.append(block(skips[-1]))
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.flow(x)


def warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Resample ``image`` at ``identity + displacement`` (pixels), differentiably.

    Parameters
    ----------
    image : Tensor, shape (N, C, H, W)
    displacement : Tensor, shape (N, 2, H, W)
        Channel 0 is the x (column) offset, channel 1 the y (row) offset.
    """
    n, _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=image.dtype),
        torch.arange(w, device=image.device, dtype=image.dtype),
        indexing="ij",
    )
    x = xs.unsqueeze(0) + displacement[:, 0]
    y = ys.unsqueeze(0) + displacement[:, 1]
    grid = torch.stack([2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0], dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smoothness_loss(displacement: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Isotropic total variation of a displacement field: the paper's ``L_smoo`` (eq. 6).

    ``1/(W H) sum_ij ( ||(grad_h phi)_ij||_2 + ||(grad_v phi)_ij||_2 )``, averaged over the batch,
    where ``(grad_h phi)_ij = phi[:, i, j+1] - phi[:, i, j]`` is the 2-vector of forward differences
    of both field channels (zero past the last column, likewise for ``grad_v`` and the last row).
    Each norm is ``sqrt(d^2 + eps) - sqrt(eps)``: exactly 0 for a constant field, within
    ``sqrt(eps)`` (1e-3 px by default) of the plain norm otherwise, and with a finite gradient at 0.

    Parameters
    ----------
    displacement : Tensor, shape (N, 2, H, W)
        In pixels, as :class:`RegistrationNet` returns it.
    eps : float
        In squared pixels.
    """
    phi = displacement.float()
    n, _, h, w = phi.shape
    root = eps**0.5
    dh = phi[..., :, 1:] - phi[..., :, :-1]
    dv = phi[..., 1:, :] - phi[..., :-1, :]
    norm_h = (dh.pow(2).sum(1) + eps).sqrt() - root
    norm_v = (dv.pow(2).sum(1) + eps).sqrt() - root
    return (norm_h.sum() + norm_v.sum()) / (n * h * w)
