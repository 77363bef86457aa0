"""Training checkpoints as safetensors (never pickles): weights, optimiser moments, step."""

from __future__ import annotations

import os

import torch
from torch import nn

from digital_stain.io.modelfile import load_bundle, save_bundle


def save_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], meta: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value
    for name, opt in optimizers.items():
        state = opt.state_dict()
        groups[name] = state["param_groups"]
        for index, slots in state["state"].items():
            for key, value in slots.items():
                tensors[f"opt.{name}.{index}.{key}"] = torch.as_tensor(value)
    save_bundle(path, tensors, {"kind": "checkpoint", "meta": meta, "param_groups": groups})


def load_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore modules and optimisers in place; return the saved ``meta``."""
    tensors, metadata = load_bundle(path)
    if metadata.get("kind") != "checkpoint":
        raise ValueError(f"{path} is a model file, not a training checkpoint")
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        prefix = f"opt.{name}."
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, slot = key[len(prefix):].split(".", 1)
                state.setdefault(int(index), {})[slot] = value
        opt.load_state_dict({"state": state, "param_groups": metadata["param_groups"][name]})
    return metadata["meta"]


class BestSoFar:
    """The best state of one network by its validation score, and the checkpoint that keeps it.

    What the teacher's and the segmenter's loops share: the state chosen so far (weights, score,
    step), the validation history, and a checkpoint holding the live weights, the optimiser, the
    chosen weights and the step, so that a resumed run goes on exactly where the stopped one was.

    Parameters
    ----------
    make : callable
        Builds an empty network of the trained one's architecture (to hold the chosen weights).
    net, optimizer
        The live network and its optimiser (restored in place by :meth:`resume`).
    checkpoint : path-like or None
        Where checkpoints go (none when None).
    config : dict
        The run's settings, stored with each checkpoint; with ``check_config`` a resume with other
        settings is refused.
    higher_is_better : bool
        Whether a larger validation score is better (a Dice) or a smaller one (a loss).
    """

    def __init__(self, make, net: nn.Module, optimizer: torch.optim.Optimizer, checkpoint, config: dict, *,
                 higher_is_better: bool, check_config: bool = False):
        from digital_stain.train.schedule import snapshot

        self.make, self.net, self.optimizer = make, net, optimizer
        self.checkpoint, self.config, self.check_config = checkpoint, config, check_config
        self.sign = 1.0 if higher_is_better else -1.0
        self.score = -float("inf") if higher_is_better else float("inf")
        self.step: int | None = None  # the chosen state's step (None: nothing validated yet)
        self.history: list = []
        self.state = snapshot(net)
        self.saved_config: dict = {}  # the settings the resumed checkpoint was made with (after :meth:`resume`)

    def resume(self) -> int:
        """Restore the live weights, optimiser and chosen state from the checkpoint; returns the step to go on from."""
        from digital_stain.core.arrays import InputError

        holder = self.make()
        meta = load_checkpoint(self.checkpoint, {"net": self.net, "best": holder}, {"net": self.optimizer})
        if self.check_config and meta.get("config") != self.config:
            raise InputError(f"{self.checkpoint} was made with other settings ({meta.get('config')}); resume with "
                             "those, or start again without --resume.")
        self.score, self.step, self.history = meta["best_score"], meta["best_step"], meta["history"]
        self.state, self.saved_config = holder.state_dict(), dict(meta.get("config") or {})
        return int(meta["step"])

    def judge(self, step: int, score: float, entry: dict) -> bool:
        """Record a validation (``entry`` goes to the history); keep the live weights if they are the best. Returns
        whether they are."""
        from digital_stain.train.schedule import snapshot

        self.history.append(entry)
        if self.sign * score > self.sign * self.score:
            self.score, self.step, self.state = score, step, snapshot(self.net)
            return True
        return False

    def save(self, step: int) -> None:
        """Write the checkpoint (nothing without a checkpoint path)."""
        if self.checkpoint:
            holder = self.make()
            holder.load_state_dict(self.state)
            meta = dict(step=step, best_score=self.score, best_step=self.step, history=self.history, config=self.config)
            save_checkpoint(self.checkpoint, {"net": self.net, "best": holder}, {"net": self.optimizer}, meta)

    def best(self) -> nn.Module:
        """The chosen network (the live one when nothing was validated), in eval mode on the CPU."""
        net = self.make()
        net.load_state_dict(self.state if self.step is not None else self.net.state_dict())
        return net.eval()
