"""Training loops and per-defense recipes."""

from __future__ import annotations

from advdefense.training.loop import EpochRecord, TrainingConfig, TrainingHistory, train_classifier

__all__ = ["EpochRecord", "TrainingConfig", "TrainingHistory", "train_classifier"]
