"""Ghost EN: random variants of the frozen recogniser's residual connections, for transfer.

A single EN is overfitted quickly: D learns features only that network reads. Two cheap ways to
train against a family of networks instead, both acting on the residual additions ``skip + branch``
of a converted (``torch.fx``) recogniser:

- skip erosion (Li et al., "Learning Transferable Adversarial Examples via Ghost Networks", AAAI
  2020): each forward draws ``lambda ~ U[1 - tau, 1 + tau]`` per residual addition and sample and
  computes ``lambda * skip + branch``: a new "ghost" network per step, a virtual ensemble for free;
- skip gradient (Wu et al., "Skip Connections Matter", ICLR 2020): the backward pass through the
  residual branch is scaled by ``gamma < 1`` (forward unchanged), so D is shaped more by the
  low-level features the skip connections carry, which are shared across networks;
- linear backpropagation (Guo et al., "Backpropagating Linearly Improves Transferability of
  Adversarial Examples", NeurIPS 2020): from a point of the network on, the activations
  (PReLU/ReLU) pass the gradient as if they were the identity (forward unchanged), so the gradient
  follows the network's linear part, which transfers better than its piecewise gates; with
  ``mix < 1`` the backward is ``mix * identity + (1 - mix) * the activation's own gradient``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from featdeid.errors import ConfigError


def _scale_grad(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x`` forward, ``gamma * grad`` backward."""
    return x * gamma + (x * (1.0 - gamma)).detach()


def _fx(module: nn.Module) -> tuple[Any, dict[str, nn.Module]]:
    """The ``torch.fx`` graph of a converted network and its modules by name."""
    graph = getattr(module, "graph", None)
    if graph is None:
        raise ConfigError("ghost EN needs a torch.fx recogniser (an onnx: EN converted by onnx2torch)")
    return graph, dict(module.named_modules())


def residual_adds(module: nn.Module) -> list[tuple[nn.Module, int]]:
    """The residual additions of an fx-converted network: ``(add module, index of its skip input)``.

    An addition of two computed tensors is residual; its skip input is the one computed earlier
    (the branch is computed from it).
    """
    graph, modules = _fx(module)
    order = {node: i for i, node in enumerate(graph.nodes)}
    out = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 2 or not all(a in order for a in node.args):
            continue
        target = modules[node.target]
        if "add" not in type(target).__name__.lower() and not node.target.lower().startswith("add"):
            continue
        out.append((target, 0 if order[node.args[0]] < order[node.args[1]] else 1))
    if not out:
        raise ConfigError("ghost EN: the recogniser has no residual additions")
    return out


def activations(module: nn.Module) -> list[nn.Module]:
    """The activation modules (PReLU, ReLU, ...) of an fx-converted network, in graph order."""
    graph, modules = _fx(module)
    names = ("relu", "prelu", "leakyrelu")
    return [
        modules[n.target]
        for n in graph.nodes
        if n.op == "call_module" and type(modules[n.target]).__name__.lower().removeprefix("onnx") in names
    ]


def _linear_backward(mix: float):
    """Forward hook: the activation's output forward; ``mix`` identity + ``1 - mix`` its own gradient backward."""

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if not x.requires_grad:
            return out
        return out + mix * ((x - x.detach()) - (out - out.detach()))

    return hook


class GhostSkips:
    """Skip erosion ``tau``, skip gradient ``gamma`` and linear backpropagation on ``net``.

    ``linear_from`` in [0, 1] is the position (fraction of the activations in graph order) from
    which activations are linear in the backward pass; 1 turns it off. ``linear_mix`` in (0, 1]
    is how linear: the share of the identity in their backward.
    """

    def __init__(
        self, net: nn.Module, tau: float = 0.0, gamma: float = 1.0, linear_from: float = 1.0, linear_mix: float = 1.0
    ) -> None:
        if not 0.0 <= tau < 1.0 or not 0.0 < gamma <= 1.0 or not 0.0 <= linear_from <= 1.0 or not 0.0 < linear_mix <= 1.0:
            raise ConfigError(
                "ghost EN: need 0 <= ghost_skip < 1, 0 < skip_grad <= 1, 0 <= linbp_from <= 1 and 0 < linbp_mix <= 1, "
                f"got {tau}, {gamma}, {linear_from}, {linear_mix}"
            )
        self.adds = residual_adds(net)
        self.tau, self.gamma, self.mix = float(tau), float(gamma), float(linear_mix)
        self.linear: list[nn.Module] = []
        if linear_from < 1.0:
            acts = activations(net)
            if not acts:
                raise ConfigError("ghost EN: linbp_from < 1 but the recogniser has no ReLU/PReLU activations")
            self.linear = acts[round(linear_from * len(acts)) :]

    @contextlib.contextmanager
    def draw(self, batch: int, gen: torch.Generator) -> Iterator[None]:
        """One ghost network for every EN call inside the block (C and D alike); ``batch`` samples."""
        lambdas = [1.0 + self.tau * (2.0 * torch.rand(batch, generator=gen) - 1.0) for _ in self.adds]

        def hook(skip_index: int, lam: torch.Tensor):
            def pre(_m: nn.Module, args: tuple) -> tuple:
                skip, branch = args[skip_index], args[1 - skip_index]
                if self.tau and skip.shape[0] == batch:
                    skip = skip * lam.to(skip.device, skip.dtype).view(-1, *([1] * (skip.dim() - 1)))
                if self.gamma != 1.0 and branch.requires_grad:
                    branch = _scale_grad(branch, self.gamma)
                return (skip, branch) if skip_index == 0 else (branch, skip)

            return pre

        handles = [m.register_forward_pre_hook(hook(i, lam)) for (m, i), lam in zip(self.adds, lambdas)]
        handles += [m.register_forward_hook(_linear_backward(self.mix)) for m in self.linear]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
