"""Exponential moving average of the model weights (the weights DDPM samples with).

The EMA holds a full copy of the *unwrapped* model, so its state dict never carries the
`_orig_mod.` (torch.compile) or `module.` (DDP / DataParallel) prefixes, and it reads the live
parameters through the same unwrapping: a compiled wrapper shares its parameter tensors with the
original module, so updating from either gives the same EMA.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile (`_orig_mod`) and DDP / DataParallel (`module`) wrappers, however nested.

    A DDP-style wrapper is recognised by its structure (its only child is named `module`), so a
    plain module that merely has a submodule called `module` next to others is left alone.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif list(model._modules) == ["module"]:
            model = model._modules["module"]
        else:
            return model


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay for update number `num_updates` (0-based): `min(decay, (1 + n) / (10 + n))` with warm-up, else `decay`.

    The warm-up lets the average forget the random initialisation quickly early in training.
    """
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """`ema.model` (eval mode, no grad) tracks `decay * ema + (1 - decay) * model` after each `update(model)`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self._names = [name for name, _ in self.model.named_parameters()]
        # the EMA's own tensors never change identity (load_state_dict copies in place), so list them once;
        # the trained model's are re-read every update, so a replaced parameter can never be missed silently
        self._params = list(self.model.parameters())
        self._buffers = list(self.model.buffers())

    def _live_params(self, model: nn.Module) -> list[torch.Tensor]:
        """The trained model's parameters in the EMA's order; a different architecture is an error."""
        named = list(unwrap(model).named_parameters())
        if [name for name, _ in named] != self._names:
            raise ValueError("EMA.update got a model whose parameters differ from the one the EMA was built from")
        return [p for _, p in named]  # update() runs under no_grad, so no detach copies are needed

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every EMA parameter towards the model's and copy the buffers (e.g. norm statistics) verbatim."""
        live = self._live_params(model)
        decay = ema_decay(self.decay, self.num_updates, self.warmup)
        # lerp_(ema, p, w) = ema + w * (p - ema) = decay * ema + (1 - decay) * p, a few fused kernels in all
        torch._foreach_lerp_(self._params, live, 1.0 - decay)
        if self._buffers:  # the U-Net has none; skip walking the module tree for them
            torch._foreach_copy_(self._buffers, list(unwrap(model).buffers()))
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """`{"weights": the EMA model's state dict, "num_updates": int}` (plain tensors and numbers)."""
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weights (strictly) and the update count, so the warm-up resumes where it stopped."""
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
