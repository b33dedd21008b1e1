"""What a DP step checks before it releases anything: the batches it folds in, and no stray gradient."""
from __future__ import annotations


def check_batches(ledger, collector, one_batch_per_step: bool) -> int:
    """Each step folds in exactly the examples of the batches drawn for it, each clipped once.
    Returns how many batches the step accumulated (1 under Poisson sampling)."""
    drawn = ledger.take_drawn()
    if not drawn:
        raise RuntimeError("optimizer.step() without a new batch from the data loader returned by make_private: "
                           "the accountant counts the batches of that loader (iterate it, not the original one)")
    if one_batch_per_step and len(drawn) > 1:
        raise RuntimeError(f"{len(drawn)} Poisson batches were drawn for one optimizer step: the accountant counts "
                           "one batch per step, and every batch drawn must be stepped (also an empty one: "
                           "skipping it changes the mechanism); step after each batch, or split one batch "
                           "into physical batches with dpdm_fast.BatchMemoryManager")
    clipped, size, K = collector.num_examples, sum(drawn), collector.K
    if clipped != size:
        hint = ""
        if size and clipped > size and clipped % size == 0:
            hint = (f" ({clipped // size} x the batch: a loss over {clipped // size} rows per example needs "
                    f"make_private(noise_multiplicity={clipped // size}) (it is {K}), or the batch went "
                    "through backward more than once)")
        raise RuntimeError(f"this step clipped {clipped} examples but its batch has {size}{hint}: every example "
                           "of the batch must be clipped exactly once per step, and the rows of every layer "
                           "must be the batch's rows (one backward per forward over the batch; physical batches "
                           "via BatchMemoryManager); the step was refused and its gradients discarded")
    return len(drawn)


def check_no_ordinary_gradients(param_groups, layout) -> None:
    """No parameter of the optimizer outside the private module may carry a gradient into the step."""
    ours = layout.slots
    stray = [p for g in param_groups for p in g["params"] if id(p) not in ours and p.grad is not None]
    if stray:
        raise RuntimeError(f"{len(stray)} parameter(s) of the optimizer (shapes {[tuple(p.shape) for p in stray][:5]}) "
                           "are not trainable parameters of the private module but have a gradient: it would "
                           "be applied unclipped and un-noised; remove them from the optimizer or wrap a model "
                           "that owns them")
