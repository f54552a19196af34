"""The adapter: the pretrained model (frozen) and its adapted copy, and the jobs a round runs on them.

One class, `Adapter`, split by job into one module each:

* `asfda.adapter.models`: the two networks, their inference engines, the prepared-volume cache, the weights' state;
* `asfda.adapter.scoring`: the round's temperature, the labelled anchors, the pool's scores;
* `asfda.adapter.training`: supervised / selective semi-supervised fine-tuning and the non-regression guard;
* `asfda.adapter.evaluation`: Dice on labelled volumes (native grid) and the bundle export.

What a round does with them, in which order, is `asfda.rounds`.
"""

from __future__ import annotations

from .evaluation import EvaluationMixin, mean_of
from .models import AdaptedModels
from .scoring import Anchors, RoundTemperature
from .training import RoundTraining, TrainingMixin, reliable_from_scores

__all__ = ["AdaptedModels", "Adapter", "Anchors", "RoundTemperature", "RoundTraining", "mean_of",
           "reliable_from_scores"]


class Adapter(EvaluationMixin, TrainingMixin):
    """The pretrained model (frozen) and its adapted copy, mapped onto the target's classes, with every job a round
    runs on them (see the module docstring). Construct it as `AdaptedModels`."""
