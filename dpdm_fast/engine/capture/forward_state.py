"""What the model's hooks and its layers' hooks share while the wrapped model runs forward and backward."""
from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass (e.g. torch.utils.checkpoint recomputing)."""
    return torch._C._current_graph_task_id() != -1


class ForwardState:
    """The state of one forward (and its backward) of a wrapped model.

    ``trigger``: a scalar every layer's tap takes as an input, so a layer's backward can ask whether
    autograd will run the engine's part of the graph (a full ``backward()``) or only input gradients.
    """

    def __init__(self, collector, device: torch.device | None, batch_first: bool = True):
        self.collector = collector
        self.batch_dim = 0 if batch_first else 1   # the model's batch dimension (make_private's batch_first)                 # where the layers' rules write (GroupGradientCollector)
        self.trigger = torch.zeros((), device=device, requires_grad=True)
        self.trigger_node = torch.autograd.graph.get_gradient_edge(self.trigger).node
        self.calls: set[int] = set()               # id(layer) of the layers run in this forward
        self.frozen: dict[int, list] = {}          # id(layer) -> its parameters frozen while it runs
        self.depth = 0                             # nesting of forward calls of the wrapped model
        self.via_wrapper = 0                       # forward calls that came through PrivateModule.forward
        self.rows: int | None = None               # rows (on batch_dim) of this forward's batch
        self.in_rule = False                       # a rule is running (its own module calls are not taps)
