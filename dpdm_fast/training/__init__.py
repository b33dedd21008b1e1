"""Training runs: the loop, its checkpoints, EMA, privacy plan and monitoring."""
from .checkpoint import CheckpointError
from .loop import TrainResult, Trainer, train
from .privacy_plan import PrivacyPlan, plan_privacy

__all__ = ["train", "Trainer", "TrainResult", "CheckpointError", "PrivacyPlan", "plan_privacy"]
