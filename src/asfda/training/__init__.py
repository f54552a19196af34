"""Fine-tuning: losses with an ignore mask, patch sampling, the trainer, reliable-set selection."""

from __future__ import annotations

from asfda.training.losses import masked_dice_ce
from asfda.training.trainer import TrainConfig, TrainVolume, finetune

__all__ = ["TrainConfig", "TrainVolume", "finetune", "masked_dice_ce"]

from asfda.training.reliable import pseudo_label, pseudo_label_quality, select_reliable  # noqa: E402

__all__ += ["pseudo_label", "pseudo_label_quality", "select_reliable"]
