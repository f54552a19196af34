"""One adaptation round, written once: score -> select -> (labels arrive) -> train -> guard -> (evaluate).

The round's two halves are apart because in a project the labels arrive between them (a person annotates):

* `select_batch`: the round's temperature (fitted on the labelled volumes), the pool's scores for the strategy, the
  strategy's pick;
* `train_on_labels`: the labelled volumes a discarded round blamed held back (`train.hold_back_discarded`), the
  when-to-stop probe predicted before and after (`asfda.stopping`), the fine-tuning (supervised or selective
  semi-supervised) and the non-regression guard (`Adapter.train_round`).

`asfda.simulate` calls both in one go with labels from the dataset and evaluates the test set after each round;
`asfda.project` calls `select_batch` in ``asfda next`` and `train_on_labels` in ``asfda finetune``; `asfda.query`
calls `select_batch` once. `PoolState` is the one record of who was labelled in which round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from asfda import stopping
from asfda.adapter import Adapter, RoundTemperature, RoundTraining
from asfda.config import SemiConfig, default_of
from asfda.io.datasets import Case
from asfda.selection import PoolScores, Query
from asfda.training import TrainConfig
from asfda.training.guard import held_back

__all__ = ["BatchSelection", "PoolState", "RoundTrained", "select_batch", "train_on_labels", "trained_history"]


@dataclass
class PoolState:
    """Which case was labelled in which round; serialisable with `state_dict` / `load_state_dict`. Simulations keep
    it in their ``state.json``; a project derives it from ``project.json``'s labels
    (`asfda.project.Project.pool_state`); ``asfda query`` from its ``--labelled`` ids."""

    labelled: dict[str, int] = field(default_factory=dict)

    def add(self, ids: list[str], round_index: int) -> None:
        for i in ids:
            if i in self.labelled:
                raise ValueError(f"case {i!r} is already labelled (round {self.labelled[i]})")
            self.labelled[i] = round_index

    def labelled_ids(self) -> list[str]:
        """Labelled ids by round, then id."""
        return sorted(self.labelled, key=lambda i: (self.labelled[i], i))

    def unlabelled(self, pool_ids: list[str]) -> list[str]:
        """``pool_ids`` (in their order) that are not labelled."""
        return [i for i in pool_ids if i not in self.labelled]

    def state_dict(self) -> dict:
        return {"labelled": dict(self.labelled)}

    def load_state_dict(self, state: dict) -> None:
        self.labelled = {str(k): int(v) for k, v in state.get("labelled", {}).items()}


def trained_history(rounds: list[dict]) -> list[tuple[list[str], bool]]:
    """(ids trained on, discarded by the guard) of each finished round record, `asfda.training.guard.held_back`'s
    input. A record names its ``trained_ids``; older ones trained on every label so far: a project's
    ``labelled_ids``, or a simulation's queried ids up to that round."""
    out: list[tuple[list[str], bool]] = []
    queried: list[str] = []
    for rec in rounds:
        queried = queried + list(rec.get("queried", []))
        trained = rec["trained_ids"] if "trained_ids" in rec else rec.get("labelled_ids", queried)
        out.append((list(trained), bool((rec.get("guard") or {}).get("reverted"))))
    return out


@dataclass
class BatchSelection:
    """What `select_batch` gives: the round's temperature, the pool's scores, what the scoring ran (forward passes
    per volume, MC-dropout passes, TTA flips), the pick and the seconds it took."""

    temperature: RoundTemperature
    scores: PoolScores
    scoring: dict
    query: Query
    seconds: float


def select_batch(adapter: Adapter, strategy, labelled: list[Case], unlabelled: list[Case], budget: int,
                 round_index: int, seed: int, *, t0: float = default_of("temperature0"),
                 grow_voxels: int = default_of("grow_voxels"), always_score: bool = False,
                 temperature: float | None = None) -> BatchSelection:
    """Scores ``unlabelled`` for ``strategy`` with T fitted on ``labelled`` (``t0`` when none; ``temperature``: a
    given T, no fit; a strategy that reads no scores gets the ids alone, unless ``always_score``; see
    `Adapter.round_scores`) and picks ``budget`` of them (seeded by ``seed``). Inside `Adapter.all_ranks` the pool's
    scoring is sharded over the ranks and every rank returns rank 0's temperature, scores (with its labelled anchors)
    and pick, so that what the round trains on next is decided once."""
    start = time.perf_counter()
    temp, scores, info = adapter.round_scores(strategy, labelled, unlabelled, t0, round_index, seed, grow_voxels,
                                              always=always_score, temperature=temperature)
    query = strategy.select(scores, budget, seed)
    if adapter.spmd:  # torchrun: the ranks computed the same up to float rounding; rank 0's numbers are the ones
        temp, scores, info, query = adapter.dist.broadcast_from_main((temp, scores, info, query))
    return BatchSelection(temp, scores, info, query, time.perf_counter() - start)


@dataclass
class RoundTrained:
    """What `train_on_labels` gives: the fine-tuning (loss history, reliable volumes, guard), the labelled ids held
    back and trained on, the when-to-stop probe (outputs after the round, its record) and the seconds."""

    training: RoundTraining
    held_back: list[str]
    trained_ids: list[str]
    probe_after: dict
    probe: dict
    seconds_train: float
    seconds_probe: float

    @property
    def reverted(self) -> bool:
        return bool(self.training.guard and self.training.guard.reverted)


def train_on_labels(adapter: Adapter, labelled: list[Case], unlabelled: list[Case], history: list[dict],
                    train: TrainConfig, semi: SemiConfig, temperature: float, *, probe_ids: list[str],
                    probe_before: dict | None = None, scores: PoolScores | None = None,
                    queried: list[str] | None = None, desc: str = "fine-tune") -> RoundTrained:
    """One round's fine-tuning on ``labelled`` (in this order; those a discarded round blamed left out under
    ``train.hold_back_discarded``: `held_back` of ``history``, the finished round records), with the guard on
    ``unlabelled``. The probe volumes ``probe_ids`` are predicted before (``probe_before`` holds outputs of the
    current model already computed) and after the round (a discarded round keeps the outputs it started from);
    ``scores``/``queried``: this round's pool scores and pick (semi-supervision reads the reliable volumes off them)."""
    ids = [c.case_id for c in labelled]
    held = held_back(ids, trained_history(history)) if train.hold_back_discarded else []
    by_id = {c.case_id: c for c in [*labelled, *unlabelled]}
    t_probe = time.perf_counter()
    before = dict(probe_before or {})
    before.update(_probe(adapter, by_id, [i for i in probe_ids if i not in before]))
    t_probe = time.perf_counter() - t_probe
    start = time.perf_counter()
    training = adapter.train_round([c for c in labelled if c.case_id not in held], unlabelled, train, semi,
                                   temperature, scores, queried, desc=desc)
    seconds_train = time.perf_counter() - start
    start = time.perf_counter()
    reverted = bool(training.guard and training.guard.reverted)
    after = {i: before[i] for i in probe_ids} if reverted else _probe(adapter, by_id, probe_ids)
    record = stopping.probe_record(before, after, len(adapter.target_names), ids)
    t_probe += time.perf_counter() - start
    return RoundTrained(training, held, [i for i in ids if i not in held], after, record, seconds_train, t_probe)


def _probe(adapter: Adapter, by_id: dict[str, Case], ids: list[str]) -> dict:
    """`asfda.stopping.probe_output` of the current model on ``ids`` (one forward pass each; sharded over the ranks
    inside `Adapter.all_ranks`)."""
    outputs = adapter.map_cases(
        [by_id[i] for i in ids],
        lambda c: stopping.probe_output(adapter.forward(c)[0]),
        "probe")
    return dict(zip(ids, outputs, strict=True))
