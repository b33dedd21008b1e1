"""Training runs: the loop, EMA, privacy plan and monitoring (checkpoint files: dpdm_fast.checkpoint)."""
from ..checkpoint import CheckpointError
from .loop import TrainResult, Trainer, train
from .privacy_plan import PrivacyPlan, plan_privacy

__all__ = ["train", "Trainer", "TrainResult", "CheckpointError", "PrivacyPlan", "plan_privacy"]
