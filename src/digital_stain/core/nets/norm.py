"""Instance normalisation whose statistics are an argument of the call, for seam-free tiling.

A generator with instance norm normalises each image by its own per-channel
mean and variance. Stained tile by tile, every tile would get different
statistics and the result would show colour jumps at tile borders. So a
:class:`TileStableInstanceNorm` takes its statistics from the call:

``statistics=None``
    ordinary instance norm: each image of the batch by its own (training, one-pass inference);
``record=[...]``
    statistics pooled over the whole batch and all pixels (a batch of crops treated as one
    large image), used, and appended to the list;
``statistics=(...)``
    the given ``(mean, var)`` of every norm layer of the network, indexed by the layer's
    ``position``: every tile is normalised identically.

Nothing is stored in the module, so one network can stain several images from several
threads at once (:func:`record_statistics` returns what a later call is given). Networks
that use it pass ``statistics`` and ``record`` on to their norm layers
(:class:`~digital_stain.core.nets.generator.ResnetGenerator`).
"""

from __future__ import annotations

import torch
from torch import nn

Statistics = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (mean, var) per norm layer, float32 (C,)


class TileStableInstanceNorm(nn.Module):
    """Instance norm (affine) whose statistics can be recorded and handed back in later calls.

    Its state dict holds only ``weight`` and ``bias``, like
    ``nn.InstanceNorm2d(affine=True)``. ``position`` is its index among the norm layers of
    the network that owns it (0 for a layer on its own). With ``inplace``, inference (no
    gradients) writes its result into the input, as ``nn.ReLU(inplace=True)`` does: for a
    layer whose input is a convolution's fresh output, which nothing else reads.
    """

    def __init__(self, channels: int, eps: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.eps = eps
        self.inplace = inplace  # inference may overwrite the input (a fresh convolution output)
        self.position = 0
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, statistics: Statistics | None = None,
                record: list | None = None) -> torch.Tensor:
        if statistics is not None:
            mean, var = statistics[self.position]
            return self._scale_shift(x, mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1))
        mean, var = _moments(x.float(), pooled=record is not None)
        if record is not None:
            record.append((mean.flatten().detach(), var.flatten().detach()))
        if not torch.is_grad_enabled():
            return self._scale_shift(x, mean, var)
        # training: the textbook form, whose gradients the tests compare with nn.InstanceNorm2d's
        y = (x.float() - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)

    def _scale_shift(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Normalise as one fused multiply-add in the input's dtype.

        Inference spends its time here otherwise: the textbook form makes four float32
        passes over every activation, about as much as the convolutions cost on a CPU
        and several times it on a GPU.
        """
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        shift = self.bias.view(1, -1, 1, 1) - mean * scale
        shift, scale = shift.to(x.dtype), scale.to(x.dtype)
        if self.inplace and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # a fresh allocation of a large activation costs more than the arithmetic on a CPU (a
            # compiled graph fuses this with its neighbours anyway, and an out= would break it)
            return torch.addcmul(shift, x, scale, out=x)
        return torch.addcmul(shift, x, scale)


def _moments(x: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``x`` ``(N, C, H, W)``, shaped ``(N or 1, C, 1, 1)``.

    Over each image's pixels, or over the whole batch when ``pooled``. A channels-last CPU tensor
    is read once, in blocks that stay in cache, for the sums of values and squares: several times
    faster than ``torch.var_mean``, whose one-pass update is slow on a CPU. ``E[x^2] - E[x]^2``
    loses digits when a channel's mean is large against its spread (a first layer over dark
    pixels), so such a tensor is read again for the squared deviations from the mean: either way
    the variance is as exact as ``var_mean``'s (float32 rounding).
    """
    batch, channels = x.shape[:2]
    if (x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last) or (batch > 1 and not pooled)
            or torch.compiler.is_compiling()):  # a compiled graph fuses var_mean; blocks and a branch would break it
        var, mean = torch.var_mean(x, dim=(0, 2, 3) if pooled else (2, 3), keepdim=True, unbiased=False)
        return mean, var
    pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: channels-last memory is (pixel, channel)
    count = pixels.shape[0]
    sums, squares = _column_sums(pixels)
    mean = sums / count
    var = squares / count - mean * mean
    if bool((mean * mean > 9.0 * var).any()):
        var = _column_sums(pixels, shift=mean)[1] / count
    return mean.view(1, -1, 1, 1), var.clamp_min(0.0).view(1, -1, 1, 1)


_BLOCK = 1 << 20  # elements per block: 4 MB of float32, which stays in cache between its two reductions
_LANES = 256  # a block is summed as rows this wide: a reduction down 16 or 64 columns uses the vector units poorly


def _column_sums(pixels: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column sums of ``pixels`` ``(P, C)`` and of its squares (of ``pixels - shift``), block by block."""
    count, channels = pixels.shape
    lanes = max(1, _LANES // channels)  # pixels side by side in one wide row
    rows = max(lanes, _BLOCK // channels // lanes * lanes)
    sums, squares = [], []
    for start in range(0, count, rows):
        block = pixels[start : start + rows]
        if shift is not None:
            block = block - shift
        whole = block.shape[0] // lanes * lanes
        for part, width in ((block[:whole].reshape(-1, lanes * channels), lanes), (block[whole:], 1)):
            if part.numel():
                sums.append(part.sum(0).view(width, channels).sum(0))
                squares.append((part * part).sum(0).view(width, channels).sum(0))
    return torch.stack(sums).sum(0), torch.stack(squares).sum(0)


def number_norm_layers(net: nn.Module) -> int:
    """Give every :class:`TileStableInstanceNorm` of ``net`` its ``position`` (module order); return how many."""
    norms = [module for module in net.modules() if isinstance(module, TileStableInstanceNorm)]
    for position, module in enumerate(norms):
        module.position = position
    return len(norms)


def record_statistics(net: nn.Module, sample: torch.Tensor) -> Statistics:
    """The norm statistics of ``sample``, to hand to later calls of ``net`` as ``statistics``.

    Parameters
    ----------
    net : nn.Module
        A network whose forward takes ``record`` (e.g.
        :class:`~digital_stain.core.nets.generator.ResnetGenerator`).
    sample : Tensor, shape (N, C, H, W)
        The whole image (N = 1), or N crops spread over it whose pooled
        statistics stand for the whole image.

    Returns
    -------
    tuple of (mean, var) per norm layer, in ``position`` order; empty for a network without
    such layers.
    """
    record: list = []
    with torch.no_grad():
        net(sample, record=record)
    return tuple(record)
