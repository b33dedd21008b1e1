"""Distributed: one model trained across the ranks of a torch.distributed job, with one guarantee.

Owns: the ranks and their collectives (``replicas``: the all-reduce, the agreement, the parameter
broadcast and checksum), a DP step's exchange (``step_exchange``), and the hash over every example
that the ranks compare at wrap time (``dataset_hash``; keyed, the trainer's data check too). See
``replicas`` for why the one-process mechanism is kept exactly.

May import: ``dpdm_fast.engine.profiling``. The collector is handed in as an object. Never capture,
clipping's internals, sampling or the public API.
"""
from .dataset_hash import dataset_fingerprint
from .replicas import (CHECK_EVERY, ReplicaError, Replicas, collective_failed, exact_float, is_replicated_run,
                       parameter_checksum)
from .step_exchange import StepExchange

__all__ = ["Replicas", "ReplicaError", "StepExchange", "dataset_fingerprint", "exact_float", "is_replicated_run",
           "parameter_checksum", "collective_failed", "CHECK_EVERY"]
