"""A distributed step's two collectives: the ranks' agreement on the step, then one flat all-reduce.

Every rank enters the agreement once per step, also a rank that refused its step (``ok=False``), so
that all stop together instead of one waiting forever; settings changed on one rank only are refused
on every rank. Only after the agreement is the step's flat gradient summed over the ranks.
"""
from __future__ import annotations

import torch

from ..profiling import profile_scope
from .replicas import CHECK_EVERY, Replicas, ReplicaError, parameter_checksum


class StepExchange:
    """The exchange of one DP optimizer's steps with the other ranks (``replicas``)."""

    def __init__(self, replicas: Replicas, collector):
        self.replicas, self.collector = replicas, collector
        self.exchanged = False   # this step's agreement already happened (abandon must not enter it twice)

    @property
    def adds_noise(self) -> bool:
        return self.replicas.adds_noise

    def new_step(self) -> None:
        self.exchanged = False

    def agree(self, ok: bool, steps_taken: int, settings: dict) -> None:
        """The step's agreement: ``settings`` (noise, clip norm, divisor, ...) plus what the collector knows."""
        self.exchanged = True
        layout, collector = self.collector.layout, self.collector
        values = {"ok": float(ok), "steps taken": steps_taken, **settings, "noise multiplicity K": collector.K,
                  "parameter count": layout.size,
                  "trained parameter count": sum(p.numel() for p in layout.params if id(p) in collector.active),
                  "parameter checksum": parameter_checksum(layout.params) if steps_taken % CHECK_EVERY == 0 else 0.0}
        self.replicas.agree(values, collector.layout_device, f"step {steps_taken + 1}")

    def settle(self, flat: torch.Tensor | None, refused: BaseException | None, steps_taken: int, settings: dict,
               discard) -> None:
        """Agree, then (if every rank is ready) sum ``flat`` over the ranks in place. On any failure the step's
        clipped sums are dropped (``discard()``); this rank's own refusal is raised after the agreement."""
        try:
            self.agree(refused is None, steps_taken, settings)
            if refused is None:
                with profile_scope("dpdm_fast.all_reduce"):
                    self.replicas.all_reduce_sum(flat)
        except BaseException:
            discard()
            if refused is None:
                raise
        if refused is not None:
            raise refused     # this rank's own reason (the others report that it refused)

    def abandon(self, steps_taken: int, settings: dict) -> None:
        """Tell the other ranks, at this step's agreement, that this rank cannot finish the step."""
        if self.exchanged:
            return
        try:
            self.agree(False, steps_taken, settings)
        except ReplicaError:
            pass
