"""LARS (You et al. 2017) as used by BYOL / DetCon / the official AnaUS code, and its param groups.

Update for a parameter p with gradient g in an *adapted* group (weights):

    d     = g + wd * p
    trust = eta * ||p|| / (||g|| + wd * ||p||)      (1 when ||p|| = 0 or ||g|| = 0)
    v     = momentum * v + lr * trust * d           (v starts at the first lr * trust * d)
    p     = p - v

Excluded groups (``lars_adaptation=False``: biases and normalisation parameters) use
``trust = 1`` and ``wd = 0``, i.e. plain SGD with momentum. The learning rate sits inside the
momentum buffer, as in optax/DeepMind DetCon and the official AnaUS ``LARSSGD``; lightly (and
Lightning Bolts) apply it outside (``p -= lr * v``) -- the two agree whenever lr is constant.
Written here because lightly is not a runtime dependency (it pulls in pytorch-lightning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

#: module types whose parameters are normalisation parameters (SyncBatchNorm is a _BatchNorm)
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def param_groups_excluding_norm_and_bias(model: nn.Module, *, weight_decay: float = 1e-6) -> list[dict[str, Any]]:
    """Two parameter groups of the trainable parameters of ``model``.

    Group 0: weights (weight decay ``weight_decay``, LARS adaptation). Group 1: every parameter
    of a normalisation layer (found by ``isinstance``, not by name) and every parameter registered
    as ``bias`` on its module (weight decay 0, no LARS adaptation). Frozen parameters (the EMA
    target) are left out. Shared parameters appear once.
    """
    seen: set[int] = set()
    decayed: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for module in model.modules():
        is_norm = isinstance(module, NORM_LAYER_TYPES)
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (excluded if is_norm or name == "bias" else decayed).append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay, "lars_adaptation": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False},
    ]


class LARS(Optimizer):
    """LARS with momentum; per-group ``lars_adaptation`` switches the trust ratio (and decay) off.

    Args:
        params: parameters or groups (``param_groups_excluding_norm_and_bias``).
        lr: learning rate (the schedule overwrites ``group["lr"]`` each step).
        momentum: heavy-ball momentum (0.9).
        weight_decay: L2 coefficient for adapted groups (1e-6).
        eta: trust coefficient (1e-3).
        foreach: one ``torch._foreach_*`` kernel per operation over all of a group's parameters
            (norms, trust ratios, momentum, update) instead of a Python loop of small kernels;
            the same maths (tested against the loop).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 1e-3,
        foreach: bool = True,
    ) -> None:
        self.foreach = bool(foreach)
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adaptation=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.foreach:
            for group in self.param_groups:
                self._foreach_group(group)
            return loss
        for group in self.param_groups:
            adapt = group["lars_adaptation"]
            weight_decay = group["weight_decay"] if adapt else 0.0
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                update = grad.add(parameter, alpha=weight_decay) if weight_decay else grad.clone()
                if adapt:
                    param_norm = torch.linalg.vector_norm(parameter)
                    grad_norm = torch.linalg.vector_norm(grad)
                    trust = group["eta"] * param_norm / (grad_norm + weight_decay * param_norm)
                    trust = torch.where((param_norm > 0) & (grad_norm > 0), trust, torch.ones_like(trust))
                    update.mul_(trust)
                update.mul_(group["lr"])
                state = self.state[parameter]
                if group["momentum"]:
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = update
                    else:
                        buffer.mul_(group["momentum"]).add_(update)
                    update = buffer
                parameter.sub_(update)
        return loss


    def _foreach_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        adapt = group["lars_adaptation"]
        weight_decay = group["weight_decay"] if adapt else 0.0
        updates = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else torch._foreach_mul(grads, 1.0)
        if adapt:
            param_norms = torch.stack(torch._foreach_norm(params))
            grad_norms = torch.stack(torch._foreach_norm(grads))
            trust = group["eta"] * param_norms / (grad_norms + weight_decay * param_norms)
            trust = torch.where((param_norms > 0) & (grad_norms > 0), trust, torch.ones_like(trust))
            torch._foreach_mul_(updates, list(trust.unbind()))
        torch._foreach_mul_(updates, group["lr"])
        if group["momentum"]:
            states = [self.state[p] for p in params]
            fresh = [i for i, state in enumerate(states) if "momentum_buffer" not in state]
            for i in fresh:
                states[i]["momentum_buffer"] = updates[i]
            old = [i for i in range(len(params)) if i not in set(fresh)]
            if old:
                buffers = [states[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, [updates[i] for i in old])
            updates = [state["momentum_buffer"] for state in states]
        torch._foreach_sub_(params, updates)


def build_lars(
    param_groups: Iterable[Any],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    eta: float = 1e-3,
    foreach: bool = True,
) -> LARS:
    """``LARS(param_groups, ...)``; groups keep their own ``weight_decay``/``lars_adaptation``."""
    return LARS(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, foreach=foreach)
