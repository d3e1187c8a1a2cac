"""The device's optimizer: Adam with amsgrad, as ``torch.optim.Adam(amsgrad=True)``, without
``torch.optim.Optimizer``.

Every ``torch.optim.Optimizer`` imports ``torch._dynamo`` (and with it torch.fx, sympy and
parts of inductor) on its first ``add_param_group``, ``zero_grad`` or ``step``: its methods
are wrapped in ``torch._disable_dynamo``, with no option or setting that skips the import.
That is ~150 MB of RSS, a seventh of a 1 GB Raspberry Pi 4 (docs/performance.md). This
class keeps the same state and runs torch's own public functional update,
``torch.optim.adam.adam``, which imports nothing: same numbers bit for bit, and the same
``state_dict`` layout, so state saved by either loads into the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam

_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AmsgradAdam:
    """One parameter group; ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict`` as
    torch.optim's. Like torch's Adam, parameters without a gradient are skipped."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("AmsgradAdam got an empty parameter list")
        self.group = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        for i, p in live:
            if i not in self.state:  # lazily, as torch: after a move to channels-last
                self.state[i] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 **{k: torch.zeros_like(p, memory_format=torch.preserve_format)
                                    for k in _STATE}}
        states = [self.state[i] for i, _ in live]
        beta1, beta2 = self.group["betas"]
        adam([p for _, p in live], [p.grad for _, p in live],
             [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
             [s["max_exp_avg_sq"] for s in states], [s["step"] for s in states],
             amsgrad=True, beta1=beta1, beta2=beta2, lr=self.group["lr"],
             weight_decay=self.group["weight_decay"], eps=self.group["eps"], maximize=False)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam(amsgrad=True)'s layout (its defaults for the flags we do not use)."""
        group = {**self.group, "amsgrad": True, "maximize": False, "foreach": None,
                 "capturable": False, "differentiable": False, "fused": None,
                 "decoupled_weight_decay": False, "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Takes a state saved by this class or by ``torch.optim.Adam(amsgrad=True)`` for the
        same parameters; the saved hyperparameters win, as in torch."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("optimizer state: expected exactly one parameter group")
        group = groups[0]
        if len(group.get("params", ())) != len(self.params):
            raise ValueError(f"optimizer state: {len(group.get('params', ()))} parameters, "
                             f"the model has {len(self.params)}")
        if not group.get("amsgrad") or group.get("maximize") or group.get("decoupled_weight_decay"):
            raise ValueError("optimizer state: not Adam with amsgrad (L2 weight decay, minimizing)")
        index = {pid: i for i, pid in enumerate(group["params"])}
        state = {}
        for pid, saved in state_dict.get("state", {}).items():
            if pid not in index or set(saved) != {"step", *_STATE}:
                raise ValueError(f"optimizer state: unexpected entry for parameter {pid!r}")
            p = self.params[index[pid]]
            if any(saved[k].shape != p.shape for k in _STATE):
                raise ValueError(f"optimizer state: shapes of parameter {pid!r} do not match")
            state[index[pid]] = {"step": saved["step"].to(torch.float32).reshape(()),
                                 **{k: saved[k].to(dtype=p.dtype, device=p.device) for k in _STATE}}
        self.group = {"lr": group["lr"], "betas": tuple(group["betas"]), "eps": group["eps"],
                      "weight_decay": group["weight_decay"]}
        self.state = state
