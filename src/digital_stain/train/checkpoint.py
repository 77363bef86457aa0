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
