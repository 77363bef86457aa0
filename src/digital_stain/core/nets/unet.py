"""Colorization U-Net for the teacher ``G_t``: gray lightness in, Lab chroma out.

Input ``(N, 1, H, W)``: Lab lightness scaled to [-1, 1] (``L / 50 - 1``).
Output ``(N, 2, H, W)``: ``(a, b) / 110`` in [-1, 1] (tanh). Batch norm, so at
inference (eval mode) every tile is normalised identically and tiling cannot
create colour jumps. Input sides must be multiples of ``2 ** depth`` and at
least ``2 ** (depth + 1)`` (the tiler pads to both).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

AB_SCALE = 110.0


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
        nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
    )


class _UNet(nn.Module):
    """A U-Net from lightness ``(N, 1, H, W)`` to ``outputs`` maps at full resolution (no final activation)."""

    def __init__(self, width: int, depth: int, outputs: int):
        super().__init__()
        self.config = dict(width=width, depth=depth)
        self.size_multiple = 2**depth
        self.min_size = 2 ** (depth + 1)  # reflect padding needs >= 2 px at the bottleneck
        chans = [width * 2**i for i in range(depth + 1)]
        self.stem = _double_conv(1, chans[0])
        self.down = nn.ModuleList(_double_conv(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.fuse = nn.ModuleList(_double_conv(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], outputs, 1)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(lightness)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class ColorizationUNet(_UNet):
    """U-Net predicting chroma from lightness.

    Parameters
    ----------
    width : int
        Channels at full resolution; doubled at each level.
    depth : int
        Number of 2x downsamplings.
    """

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__(width, depth, outputs=2)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(lightness))


class NucleiUNet(_UNet):
    """U-Net finding nuclei in lightness: logits of (nucleus, nucleus boundary), ``(N, 2, H, W)``.

    The tutorship segmenter (:mod:`digital_stain.nuclei.tutor`): it reads the enhanced gray, as
    the teacher does, so adaptation to another microscope (a refitted enhancer) reaches it too.
    """

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__(width, depth, outputs=2)


def lightness_input(gray: torch.Tensor) -> torch.Tensor:
    """Gray in [0, 1] ``(N, 1, H, W)`` -> the U-Net's input (Lab lightness scaled to [-1, 1])."""
    from digital_stain.core.color import gray_to_lightness

    return gray_to_lightness(gray) / 50.0 - 1.0


def colorize(net: ColorizationUNet, gray: torch.Tensor) -> torch.Tensor:
    """The teacher's stain: gray in [0, 1] ``(N, 1, H, W)`` -> RGB in [0, 1] ``(N, 3, H, W)``.

    The lightness is the gray's own; the network supplies the chroma.
    """
    from digital_stain.core.color import gray_to_lightness, lab_to_rgb

    gray = gray.float()
    ab = net(lightness_input(gray)).float() * AB_SCALE
    # the colour conversion stays in fp32 even under autocast: in bf16 it is off by up to 23 gray levels
    with torch.autocast(device_type=gray.device.type, enabled=False):
        return lab_to_rgb(torch.cat([gray_to_lightness(gray), ab], dim=1))
