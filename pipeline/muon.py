"""Muon for convolution filters, SGD for everything else, as one optimiser (so that one schedule drives both).

Muon (Keller Jordan, 2024: "Muon: an optimizer for hidden layers in neural networks") orthogonalises each weight
matrix's momentum update; KellerJordan/cifar10-airbench's `airbench94_muon.py` applies it to a small CNN's
convolution filters, each bank flattened to (output channels, the rest), and holds the filters at a fixed norm in
place of weight decay. `torch.optim.Muon` takes 2-D parameters only, hence this module.
"""
from __future__ import annotations

import torch

# the quintic Newton-Schulz iteration of Keller Jordan's Muon (also torch.optim.Muon's): five steps take every
# singular value of a matrix of norm <= 1 to about [0.7, 1.2], which its authors found as good as exactly 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """About U V^T for the 2-D `g` = U S V^T (its singular values all moved near 1), computed in bfloat16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class FilterMuon(torch.optim.Optimizer):
    """SGD with momentum (Nesterov's if `nesterov`) and L2 weight decay, as torch.optim.SGD computes it, on every
    group but those with `orthogonal=True`: for those (the convolution filters), the momentum update is
    orthogonalised and each filter bank is held at Frobenius norm sqrt(output channels), with no weight decay. Only
    for filters that a BatchNorm follows, which makes their scale irrelevant."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonal=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            momentum, orthogonal = group["momentum"], group["orthogonal"]
            if group["weight_decay"] and not orthogonal:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if momentum:
                buffers = []
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "momentum_buffer" not in state:  # as torch.optim.SGD: the first buffer is the gradient
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(g)
                    buffers.append(state["momentum_buffer"])
                grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
            if orthogonal:
                for p, g in zip(params, grads):
                    p.mul_(len(p) ** 0.5 / p.norm())
                    p.add_(orthogonalize(g.reshape(len(g), -1)).view_as(p), alpha=-group["lr"])
            else:
                torch._foreach_add_(params, grads, alpha=-group["lr"])
        return loss
