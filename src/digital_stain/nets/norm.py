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
(:class:`~digital_stain.nets.generator.ResnetGenerator`).
"""

from __future__ import annotations

import torch
from torch import nn

Statistics = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (mean, var) per norm layer, float32 (C,)


class TileStableInstanceNorm(nn.Module):
    """Instance norm (affine) whose statistics can be recorded and handed back in later calls.

    Its state dict holds only ``weight`` and ``bias``, like
    ``nn.InstanceNorm2d(affine=True)``. ``position`` is its index among the norm layers of
    the network that owns it (0 for a layer on its own).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.position = 0
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, statistics: Statistics | None = None,
                record: list | None = None) -> torch.Tensor:
        if statistics is not None:
            mean, var = statistics[self.position]
            return self._scale_shift(x, mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1))
        dims = (0, 2, 3) if record is not None else (2, 3)
        var, mean = torch.var_mean(x.float(), dim=dims, keepdim=True, unbiased=False)
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
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


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
        :class:`~digital_stain.nets.generator.ResnetGenerator`).
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
