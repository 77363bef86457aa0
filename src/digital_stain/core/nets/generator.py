"""ResNet generator of CycleGAN (Johnson et al.), used for the student ``G`` and reverse ``F``.

Layout: 7x7 conv, two stride-2 convs, ``n_blocks`` residual blocks, two 2x
upsamplings, 7x7 conv, tanh. The paper's size is width 64 and 9 blocks (11.4 M
parameters for 4 -> 3 channels). Input sides must be multiples of 4 (the tiler
pads; it never crops).

The upsampling is the paper's (CycleGAN's) stride-2 transposed convolution, or
a resize then a 3x3 convolution (Odena et al., "Deconvolution and Checkerboard
Artifacts", Distill 2016). A 3x3 stride-2 transposed convolution gives the
output pixels of even and odd positions different numbers of kernel taps, which
leaves a 2- and 4-pixel grid over every stain; a resize followed by a
convolution treats every output pixel alike. Same parameter count either way.
"""

from __future__ import annotations

import torch
from torch import nn

from digital_stain.core.nets.norm import Statistics, TileStableInstanceNorm, number_norm_layers

UPSAMPLING = ("transpose", "nearest", "bilinear")


def _conv_norm_relu(cin: int, cout: int, **conv_kwargs) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, bias=True, **conv_kwargs), TileStableInstanceNorm(cout, inplace=True), nn.ReLU(True)]


def _upsampling(cin: int, cout: int, mode: str) -> list[nn.Module]:
    if mode == "transpose":
        return [nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1)]
    # align_corners=False: each input pixel covers its own 2x2 block, as the transposed convolution's does
    resize = nn.Upsample(scale_factor=2, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return [resize, nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, kernel_size=3)]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_norm_relu(channels, channels, kernel_size=3),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            TileStableInstanceNorm(channels, inplace=True),
        )

    def forward(self, x: torch.Tensor, statistics: Statistics | None = None, record: list | None = None) -> torch.Tensor:
        return x + _run(self.body, x, statistics, record)


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator.

    Parameters
    ----------
    in_channels, out_channels : int
        4 -> 3 for the student (dark-field RGB + enhanced gray -> stained RGB),
        3 -> 3 for the reverse generator.
    width : int
        Channels of the first layer (64 in the paper).
    n_blocks : int
        Residual blocks (9 in the paper).
    upsample : {"transpose", "nearest", "bilinear"}
        How the two 2x upsamplings are made: ``"transpose"`` (the paper's transposed
        convolutions; model files without this key were written with it), or a
        nearest/bilinear resize then a 3x3 convolution, which leaves no checkerboard.
    """

    size_multiple = 4
    min_size = 8  # reflect padding needs >= 2 px at quarter resolution

    def __init__(self, in_channels: int = 4, out_channels: int = 3, width: int = 64, n_blocks: int = 9,
                 upsample: str = "transpose"):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ValueError(f"unknown upsampling {upsample!r}; choose from {', '.join(UPSAMPLING)}.")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, width=width, n_blocks=n_blocks,
                           upsample=upsample)
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), *_conv_norm_relu(in_channels, width, kernel_size=7)]
        layers += _conv_norm_relu(width, 2 * width, kernel_size=3, stride=2, padding=1)
        layers += _conv_norm_relu(2 * width, 4 * width, kernel_size=3, stride=2, padding=1)
        layers += [ResidualBlock(4 * width) for _ in range(n_blocks)]
        for cin, cout in ((4 * width, 2 * width), (2 * width, width)):
            layers += [*_upsampling(cin, cout, upsample), TileStableInstanceNorm(cout, inplace=True), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, kernel_size=7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        number_norm_layers(self)

    def forward(self, x: torch.Tensor, statistics: Statistics | None = None, record: list | None = None) -> torch.Tensor:
        """``x`` ``(N, C, H, W)`` in [-1, 1] to ``(N, out_channels, H, W)`` in [-1, 1].

        ``statistics`` (from :func:`~digital_stain.core.nets.norm.record_statistics`) normalise every
        input with the same, given statistics; ``record`` (a list) pools them over the batch and
        appends them; neither: each input by its own (:mod:`digital_stain.core.nets.norm`).
        """
        return _run(self.model, x, statistics, record)


def _run(layers: nn.Sequential, x: torch.Tensor, statistics, record) -> torch.Tensor:
    """``layers`` in order, handing the norm layers (and blocks holding them) ``statistics`` and ``record``."""
    if statistics is None and record is None:
        return layers(x)
    for layer in layers:
        x = layer(x, statistics, record) if isinstance(layer, (TileStableInstanceNorm, ResidualBlock)) else layer(x)
    return x
