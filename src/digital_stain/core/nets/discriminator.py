"""PatchGAN discriminator (pix2pix / CycleGAN, five conv layers with ``n_layers=3``)."""

from __future__ import annotations

import torch
from torch import nn

from digital_stain.core.nets.norm import TileStableInstanceNorm


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN. Returns a map of real/fake scores ``(N, 1, h, w)``.

    The authors average the map to one score per image; LSGAN targets are
    applied to the map's mean by the training loss.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, n_layers=n_layers)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1),
                TileStableInstanceNorm(width * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(width * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
