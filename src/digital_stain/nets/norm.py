"""Instance normalisation whose statistics can be frozen for seam-free tiling.

A generator with instance norm normalises each image by its own per-channel
mean and variance. Stained tile by tile, every tile would get different
statistics and the result would show colour jumps at tile borders. Here each
norm layer can run in three modes:

``instance``
    ordinary instance norm (training, and one-pass inference);
``record``
    statistics pooled over the whole batch and all pixels, i.e. the batch of
    crops is treated as one large image; the statistics are kept;
``frozen``
    the kept statistics are used for every input.

:func:`frozen_norm_statistics` records once (on the whole image, or on crops
spread over it) and freezes, so that every tile is normalised identically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class TileStableInstanceNorm(nn.Module):
    """Instance norm (affine) with recordable, freezable statistics.

    Its state dict holds only ``weight`` and ``bias``, like
    ``nn.InstanceNorm2d(affine=True)``.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.mode = "instance"
        self.register_buffer("frozen_mean", torch.zeros(channels), persistent=False)
        self.register_buffer("frozen_var", torch.ones(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "instance":
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, unbiased=False)
        elif self.mode == "record":
            var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), keepdim=True, unbiased=False)
            # in place: the buffers keep their identity, so a compiled network need not recompile
            self.frozen_mean.copy_(mean.flatten().detach())
            self.frozen_var.copy_(var.flatten().detach())
        elif self.mode == "frozen":
            # one fused multiply-add in the input's dtype: tiled inference spends its time here
            # otherwise (five float32 passes over every activation, several times the conv cost on a GPU)
            scale = self.weight * torch.rsqrt(self.frozen_var + self.eps)
            shift = self.bias - self.frozen_mean * scale
            return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))
        else:  # pragma: no cover - guarded by set_norm_mode
            raise ValueError(self.mode)
        y = (x.float() - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def set_norm_mode(net: nn.Module, mode: str) -> int:
    """Set every :class:`TileStableInstanceNorm` in ``net`` to ``mode``; return how many."""
    if mode not in ("instance", "record", "frozen"):
        raise ValueError(f"unknown norm mode {mode!r}")
    count = 0
    for module in net.modules():
        if isinstance(module, TileStableInstanceNorm):
            module.mode = mode
            count += 1
    return count


@contextlib.contextmanager
def frozen_norm_statistics(net: nn.Module, sample: torch.Tensor) -> Iterator[nn.Module]:
    """Record norm statistics on ``sample`` and freeze them inside the block.

    Parameters
    ----------
    net : nn.Module
        Network whose :class:`TileStableInstanceNorm` layers are frozen.
    sample : Tensor, shape (N, C, H, W)
        The whole image (N = 1), or N crops spread over it whose pooled
        statistics stand for the whole image.
    """
    if set_norm_mode(net, "record") == 0:
        yield net  # nothing to freeze (e.g. a BatchNorm network in eval mode)
        return
    try:
        with torch.no_grad():
            net(sample)
        set_norm_mode(net, "frozen")
        yield net
    finally:
        set_norm_mode(net, "instance")
