"""White-box canaries whose gradient lies in one of the network's own layers (a Conv2d, a GroupNorm, an
attention projection (NIN), a Linear): so that the engine's rule for that layer computes, clips and
noises it, and a broken rule shows in the audit.

Canary j is an ordinary example of the dataset. When its rows reach the chosen layer, a forward
pre-hook replaces the layer's input on those rows by a fixed crafted input ``a_j`` (independent +-1
entries), and a forward hook computes the row's canary term ``<layer(a_j), u_j>`` for a fixed random
``u_j``; the canary's loss is that term alone (its denoising loss is multiplied by 0). Its per-example
gradient is then the fixed direction D_j = d<layer(a_j), u_j> / d(layer's parameters), nothing in the
other layers (the layer's input on its rows is a constant, and nothing after the layer depends on it),
scaled so that |D_j| = GAIN * C: always clipped, each inclusion contributes exactly C along D_j.

Score (white-box, every step's noisy update released, as DP-SGD's guarantee covers): the sum over steps
of the update's component along D_j, plus the pairwise-difference term of ``scores.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .canaries import GAIN

# the layer types whose rules the layer canaries can put to the test (one tensor in, one tensor out)
SUPPORTED = ("Conv2d", "GroupNorm", "NIN", "Linear")


def default_layer(network: nn.Module) -> str:
    """The Conv2d with the most weights (the most room for m nearly orthogonal canary directions)."""
    convs = [(m.weight.numel(), name) for name, m in network.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the network has no Conv2d: name a layer for the canaries (--canary-layer)")
    return max(convs)[1]


class LayerCanaries:
    """m canaries living in the layer ``layer_name`` of ``denoiser.model`` (before make_private: the directions
    are computed on it). ``set_canaries(ids)`` before each forward gives the rows' canary indices (-1: a real
    example, None: no canaries in this forward); the forward then leaves ``canary_term`` (0 for real rows)."""

    def __init__(self, denoiser: nn.Module, layer_name: str, m: int, max_grad_norm: float, input_shape: tuple,
                 labelled: bool, seed: int):
        network = denoiser.model
        modules = dict(network.named_modules())
        if layer_name not in modules:
            raise ValueError(f"--canary-layer {layer_name!r}: no such layer in the network (e.g. {default_layer(network)})")
        layer = modules[layer_name]
        if type(layer).__name__ not in SUPPORTED:
            raise ValueError(f"--canary-layer {layer_name!r} is a {type(layer).__name__}; the layer canaries "
                             f"support {', '.join(SUPPORTED)}")
        self.layer_name, self.m = layer_name, m
        self.params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if not self.params:
            raise ValueError(f"--canary-layer {layer_name!r} has no trainable parameters (e.g. GroupNorm(affine=False))")
        shape_in = _layer_input_shape(denoiser, layer, input_shape, labelled)
        g = torch.Generator().manual_seed(seed)
        dev = self.params[0].device
        self.inputs = (torch.randint(0, 2, (m, *shape_in), generator=g).float() * 2 - 1).to(dev)
        with torch.no_grad():
            shape_out = layer(self.inputs[:1]).shape[1:]
        u = torch.randn((m, *shape_out), generator=g).to(dev)
        directions = self._directions(layer, u)                  # (m, n) gradient of <layer(a_j), u_j>
        scale = GAIN * max_grad_norm / directions.norm(dim=1)    # |D_j| = GAIN * C: always clipped
        self.u = u * scale.reshape(-1, *[1] * (u.dim() - 1))
        self.unit_directions = directions / directions.norm(dim=1, keepdim=True)
        self._row_ids: torch.Tensor | None = None
        self.canary_term: torch.Tensor | None = None
        self._handles: list = []
        self.attach(network)

    def attach(self, network: nn.Module) -> None:
        """Put the canaries into ``network``'s layer of the same name (the directions do not depend on the
        layer's parameters, so they may have been computed on another copy of the network)."""
        self.remove()
        layer = dict(network.named_modules())[self.layer_name]
        self.params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        self._handles = [layer.register_forward_pre_hook(self._replace_inputs),
                         layer.register_forward_hook(self._canary_term)]

    def _directions(self, layer: nn.Module, u: torch.Tensor) -> torch.Tensor:
        rows = []
        for j in range(self.m):   # one small layer, once: a loop is clear and fast enough
            out = layer(self.inputs[j:j + 1])
            grads = torch.autograd.grad((out * u[j:j + 1]).sum(), self.params)
            rows.append(torch.cat([gr.reshape(-1) for gr in grads]))
        return torch.stack(rows).detach()

    def set_canaries(self, row_ids: torch.Tensor | None) -> None:
        self._row_ids = row_ids

    def _rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        ids = self._row_ids
        if ids is None:
            return None
        if len(ids) != n:
            raise RuntimeError(f"the layer canaries were told {len(ids)} rows, the layer sees {n}")
        rows = (ids >= 0).nonzero().reshape(-1)
        return rows, ids[rows]

    def _replace_inputs(self, module, args):
        found = self._rows(args[0].shape[0])
        if found is None or len(found[0]) == 0:
            return None
        x = args[0].clone()
        x[found[0]] = self.inputs[found[1]].to(x.dtype)   # a constant: no gradient reaches earlier layers
        return (x, *args[1:])

    def _canary_term(self, module, args, output):
        found = self._rows(output.shape[0])
        if found is None:
            return None
        rows, ids = found
        term = output.new_zeros(output.shape[0])
        if len(rows):
            term = term.index_put((rows,), (output[rows] * self.u[ids].to(output.dtype)).flatten(1).sum(dim=1))
        self.canary_term = term
        return None

    def project(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """(m,) components of a released update of the layer's parameters along each canary's direction."""
        flat = torch.cat([gr.reshape(-1) for gr in grads]).to(self.unit_directions)
        return self.unit_directions @ flat

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _layer_input_shape(denoiser: nn.Module, layer: nn.Module, input_shape: tuple, labelled: bool) -> tuple:
    """The per-example shape of the layer's input, seen in one forward of the denoiser on zeros."""
    seen = {}

    def record(module, args):
        seen.setdefault("shape", tuple(args[0].shape[1:]))   # (returns None: the input is left as it is)
    handle = layer.register_forward_pre_hook(record)
    try:
        dev = next(denoiser.parameters()).device
        with torch.no_grad():
            labels = torch.zeros(1, dtype=torch.long, device=dev) if labelled else None
            denoiser(torch.zeros(1, *input_shape, device=dev), torch.ones(1, device=dev), labels)
    finally:
        handle.remove()
    if "shape" not in seen:
        raise ValueError("the chosen layer does not run in the network's forward")
    return seen["shape"]
