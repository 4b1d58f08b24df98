"""Muon for convolution filters, SGD for everything else, as one optimiser (so that one schedule drives both).

Muon (Keller Jordan, 2024: "Muon: an optimizer for hidden layers in neural networks") orthogonalises each weight
matrix's momentum update; KellerJordan/cifar10-airbench's `airbench94_muon.py` applies it to a small CNN's
convolution filters, each bank flattened to (output channels, the rest), and holds the filters at a fixed norm in
place of weight decay. `torch.optim.Muon` takes 2-D parameters only, hence this module.
"""
from __future__ import annotations

import torch
from torch.optim.sgd import sgd

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
        x = torch.addmm(x, torch.addmm(s, s, s, beta=b, alpha=c), x, beta=a)  # a x + (b s + c s^2) x
    return (x.T if tall else x).to(g.dtype)


class FilterMuon(torch.optim.Optimizer):
    """SGD with momentum (Nesterov's if `nesterov`) and L2 weight decay, torch.optim.SGD's own step, on every group
    but those with `orthogonal=True`: for those (the convolution filters), the momentum update is orthogonalised and
    each filter bank is held at Frobenius norm sqrt(output channels), with no weight decay. Only for filters that a
    BatchNorm follows, which makes their scale irrelevant."""

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
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            if group["orthogonal"]:
                filter_step(params, buffers, lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"])
            else:
                sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
                    momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=group["nesterov"],
                    maximize=False)
            if group["momentum"]:
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        return loss


def filter_step(params: list[torch.Tensor], buffers: list[torch.Tensor | None], *, lr: float, momentum: float,
                nesterov: bool) -> None:
    """Muon's step on filter banks (out, in, kh, kw), in place; `buffers` are their momentum buffers (None before
    the first step: then filled in, with the gradient, as torch.optim.SGD does)."""
    for i, p in enumerate(params):
        update = p.grad
        if momentum:
            if buffers[i] is None:
                buffers[i] = update.clone()
            else:
                buffers[i].mul_(momentum).add_(update)
            update = update.add(buffers[i], alpha=momentum) if nesterov else buffers[i]
        p.mul_(len(p) ** 0.5 / p.norm())
        p.add_(orthogonalize(update.reshape(len(p), -1)).view_as(p), alpha=-lr)
