"""Learning-rate schedule and state snapshots shared by the training loops."""

from __future__ import annotations

import torch


def constant_then_linear(lr: float, step: int, steps: int) -> float:
    """The paper's schedule: ``lr`` for the first half of ``steps``, then linear decay towards 0."""
    half = steps // 2
    return lr if step < half else lr * max(steps - step, 1) / max(steps - half, 1)


def set_lr(optimizers, lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def snapshot(module: torch.nn.Module) -> dict:
    """A detached copy of a module's state (the best state so far)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
