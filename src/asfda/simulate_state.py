"""A simulated run's ``state.json`` (`asfda.results.RunLayout`): what a finished round depends on (`RunKey`: the
fingerprint a resumed run must match), the file's format with the one-time migration of older files, reading it
back to resume (`resume`) and the checkpoint after each round (`checkpoint`).

The file: ``{"format": 3, "pool_state": ..., "rounds": [record per finished round], "weights": NAME,
"fingerprint": HEX}``. ``weights`` names the weights after the last finished round, written before the state that
names them, so a kill between the two leaves the previous state pointing at the previous round's weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from asfda.adapter import Adapter
from asfda.config import RunConfig, config_to_dict
from asfda.errors import AsfdaError, RunSettingsChanged
from asfda.io import atomic_write, atomic_write_json
from asfda.models import LoadedModel
from asfda.options import DIVERSITY_SPACES, REPRESENTATIVENESS
from asfda.results import RunLayout
from asfda.rounds import PoolState
from asfda.selection.strategies import Strategy

log = logging.getLogger(__name__)

__all__ = ["STATE_FORMAT", "RoundRecord", "RunKey", "accept_state", "checkpoint", "resume", "saved_json",
           "without_later_defaults"]

STATE_FORMAT = 3
"""``state.json``'s format. 1 (no ``format`` key: runs written before it existed): the fingerprint is
`RunKey.fingerprint` at format 2, or for runs written before the model and data entered it by content,
`RunKey.path_fingerprint`. 2: `RunKey.fingerprint` at format 2 (``representativeness`` entered every strategy's).
3: `RunKey.fingerprint` (``representativeness`` enters only the fingerprint of the strategies that read it, so
changing asfda's leaves random's finished rounds valid). An older file that matches is rewritten once as format 3
(`accept_state`); nothing else about it changes."""

# settings added after runs were written, with the value those runs had: at that value they leave the fingerprint
_LATER_SETTINGS: dict[tuple[str, ...], object] = {
    ("train", "augmentation"): "intensity", ("train", "restart"): False, ("train", "hold_back_discarded"): False,
    ("train", "channels_last"): False, ("representativeness",): "none", ("evaluate_tta",): False,
    ("output_activation",): None, ("diversity",): "embedding"}
# of those, the strategy settings (`Strategy.settings`) that only the strategies declaring them read: they enter
# no other strategy's fingerprint (the older settings, e.g. ``alpha``, enter every strategy's, as they always did)
_READ_BY_DECLARING_STRATEGY = ("diversity", "representativeness")
# before format 3, only these were: what an older file's fingerprint was computed with
_READ_BY_DECLARING_BEFORE_3 = ("diversity",)
# the values a refused run may have picked its batches with, named in the refusal when one of them matches
_SETTING_VALUES: dict[str, tuple[str, ...]] = {"diversity": DIVERSITY_SPACES, "representativeness": REPRESENTATIVENESS}
# what extends a run (more rounds, strategies, seeds) or does not change a finished round: never in the fingerprint
_NOT_IN_FINGERPRINT = ("out_dir", "cache_dir", "progress", "threads", "device", "strategies", "seeds", "rounds",
                       "upper_bound", "upper_bound_steps", "report", "previews", "trust_model_code", "stop_gain")


@dataclass
class RoundRecord:
    """One finished round as ``state.json``'s ``rounds`` keep it (`to_dict`: these keys, in this order)."""

    round: int
    n_labelled: int  # labelled after the round
    queried: list[str]
    trained_ids: list[str]  # the labelled volumes it trained on (a discarded round's volume may be held back)
    held_back: list[str]
    query_scores: list[float]
    query_components: dict[str, dict]  # per queried volume: the numbers behind its score
    reliable: dict[str, dict[str, float]]  # semi-supervision: per unlabelled volume used, why it was reliable
    guard: dict | None  # the guard's verdict (`Guard.to_dict`); None without a guard
    temperature: float
    ece_before: float | None
    ece_after: float | None
    seconds_score: float
    seconds_train: float
    device: str
    loss_final: float  # mean training loss of the last 10 steps
    per_case: list[dict]  # test Dice per case after the round
    dice_mean: float
    probe: dict | None  # the when-to-stop probe's change of predictions (`asfda.stopping`)
    queried_dice_before: dict[str, float]  # the queried volumes' Dice under the model that picked them
    seconds_stopping: float
    forward_passes: dict[str, int]  # forward passes the round ran, per kind
    stopping: dict[str, Any] | None = None  # the when-to-stop estimate after the round (reads no test Dice)

    def to_dict(self) -> dict:
        return asdict(self)


def without_later_defaults(cfg_dict: dict, prefix: tuple[str, ...] = ()) -> dict:
    """``cfg_dict`` (a `config_to_dict`, or its section ``prefix``) without the settings added after runs were
    written, where they have the value those runs had: what such a run recorded."""
    out = json.loads(json.dumps(cfg_dict))
    for path, value in _LATER_SETTINGS.items():
        if path[:len(prefix)] != prefix:
            continue
        *parents, key = path[len(prefix):]
        where = out
        for p in parents:
            where = where.get(p, {})
        if where.get(key, value) == value:
            where.pop(key, None)
    return out


@dataclass(frozen=True)
class RunKey:
    """What a finished round of one strategy and seed depends on: the settings, the model and the data, the latter
    by content (weights hash, the model's preprocessing key, case ids), so a run moved to another folder or machine
    resumes."""

    cfg: RunConfig
    name: str  # the strategy as the config names it
    seed: int
    pool: tuple[str, ...]
    test: tuple[str, ...]
    weights_hash: str
    preprocessing: str  # `Preprocessing.cache_key`
    strategy_settings: frozenset[str]  # the names `Strategy.settings` declares

    @classmethod
    def of(cls, cfg: RunConfig, name: str, strategy: Strategy, seed: int, pool: Sequence[str], test: Sequence[str],
           pretrained: LoadedModel) -> RunKey:
        return cls(cfg, name, seed, tuple(pool), tuple(test), pretrained.weights_hash,
                   pretrained.preprocessing.cache_key(), frozenset(strategy.settings()))

    def fingerprint(self, state_format: int = 3) -> str:
        """16 hex digits of what a finished round depends on; a resumed run must match it (``state_format`` < 3:
        as files of that format computed it)."""
        return self._hash(by_content=True, declaring=_declaring(state_format))

    def path_fingerprint(self) -> str:
        """The fingerprint of format-1 runs written before the model and data entered it by content (the config's
        ``model``, ``pool`` and ``test`` paths in it, no preprocessing key): read by `accept_state` alone."""
        return self._hash(by_content=False, declaring=_READ_BY_DECLARING_BEFORE_3)

    def _hash(self, by_content: bool, declaring: Sequence[str]) -> str:
        keep = config_to_dict(self.cfg)
        for key in (*_NOT_IN_FINGERPRINT, *(("model", "pool", "test") if by_content else ())):
            keep.pop(key, None)
        keep = without_later_defaults(keep)  # at the values runs had before those settings existed: they resume
        for key in declaring:
            if key not in self.strategy_settings:
                keep.pop(key, None)
        content = {"preprocessing": self.preprocessing} if by_content else {}
        blob = json.dumps({"cfg": keep, "model": self.weights_hash, "strategy": self.name, "seed": self.seed,
                           "pool": list(self.pool), "test": list(self.test), **content}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def accept_state(saved: dict, key: RunKey, where: Path) -> tuple[dict, bool]:
    """``saved`` (a run's ``state.json``) if it was written with ``key``'s settings, migrated to `STATE_FORMAT` when
    it is older, and whether it was migrated (the caller writes it back once). Refuses other settings, naming the
    strategy setting that differs when that is what does."""
    fmt = saved.get("format", 1)
    if not isinstance(fmt, int) or not 1 <= fmt <= STATE_FORMAT:
        raise AsfdaError(f"this run's state.json has format {fmt!r}; this asfda reads formats 1 to {STATE_FORMAT}",
                         where / RunLayout.STATE, "update asfda, or use another --out folder")
    found, expected = saved.get("fingerprint"), key.fingerprint()
    if found not in _accepted(key, fmt):
        raise _settings_changed(found, fmt, key, where)
    if fmt == STATE_FORMAT:
        return saved, False
    return {"format": STATE_FORMAT, **{k: v for k, v in saved.items() if k != "format"},
            "fingerprint": expected}, True


def _declaring(state_format: int) -> tuple[str, ...]:
    return _READ_BY_DECLARING_STRATEGY if state_format >= 3 else _READ_BY_DECLARING_BEFORE_3


def _with_setting(key: RunKey, setting: str, value: object) -> RunKey:
    changes: dict[str, Any] = {setting: value}
    return replace(key, cfg=replace(key.cfg, **changes))


def _accepted(key: RunKey, fmt: int) -> tuple[str, ...]:
    """The fingerprints a ``state.json`` of format ``fmt`` may hold for ``key``'s run."""
    if fmt == STATE_FORMAT:
        return (key.fingerprint(),)
    # before format 3 a strategy that does not read representativeness had it in its fingerprint all the same: any
    # value it was written with is what it ran with
    unread = [s for s in _READ_BY_DECLARING_STRATEGY if s not in _READ_BY_DECLARING_BEFORE_3
              and s not in key.strategy_settings]
    then = [key, *(_with_setting(key, s, v) for s in unread for v in _SETTING_VALUES[s])]
    return (key.fingerprint(), *(k.fingerprint(fmt) for k in then),
            *((k.path_fingerprint() for k in then) if fmt == 1 else ()))


def _settings_changed(found: object, fmt: int, key: RunKey, where: Path) -> RunSettingsChanged:
    for setting in _READ_BY_DECLARING_STRATEGY:
        asked = getattr(key.cfg, setting)
        if setting not in key.strategy_settings:
            continue
        for before in _SETTING_VALUES[setting]:
            if before == asked:
                continue
            if found not in _accepted(_with_setting(key, setting, before), fmt):
                continue
            return RunSettingsChanged(f"this {key.name} run picked its batches with {setting}: {before}, and this "
                                      f"config asks for {setting}: {asked}", where,
                                      f"set {setting}: {before} in the run config (--config) to resume it, or use "
                                      "another output folder")
    return RunSettingsChanged("this results folder holds a run with other settings (config, model, pool or test set)",
                              where, "use another --out folder, or delete it to start again")


def saved_json(adapter: Adapter, path: Path) -> dict | None:
    """``path``'s JSON (None when it is missing), as rank 0 reads it: inside `Adapter.all_ranks` rank 0 reads it and
    sends it to the other ranks, so every rank takes the same resume decision."""
    data = json.loads(path.read_text()) if adapter.dist.is_main and path.exists() else None
    return adapter.dist.broadcast_from_main(data) if adapter.spmd else data


def resume(adapter: Adapter, layout: RunLayout, key: RunKey, rounds_wanted: int) -> tuple[PoolState, list[dict]]:
    """The pool state and finished rounds' records of ``key``'s run (none when it has no ``state.json``), with the
    adapter holding the weights after its last finished round; migrates an older ``state.json`` (`accept_state`)."""
    state, rounds = PoolState(), list[dict]()
    run_dir = layout.run_dir(key.name, key.seed)
    saved = saved_json(adapter, layout.state(key.name, key.seed))
    if saved is None:
        return state, rounds
    saved, migrated = accept_state(saved, key, run_dir)
    if migrated and adapter.dist.is_main:
        atomic_write_json(layout.state(key.name, key.seed), saved)
    state.load_state_dict(saved["pool_state"])
    rounds = saved["rounds"]
    weights = run_dir / saved.get("weights", "")
    # written before the state that names it, so always complete; under torchrun rank 0 reads it for every rank
    found = load_file(str(weights)) if adapter.dist.is_main and rounds and weights.is_file() else None
    if adapter.spmd:
        found = adapter.dist.broadcast_from_main(found)
    if found is not None:
        adapter.load_current_state(found)
    elif rounds and len(rounds) < rounds_wanted:
        raise AsfdaError(f"the weights of round {len(rounds) - 1} are missing, so the run cannot go on",
                         weights, f"restore the file, or delete {run_dir} to run this strategy and seed again")
    elif rounds:  # a finished run copied without its weights (they are not committed): rows only
        log.warning("%s: finished rounds kept, but their weights %s are missing; no bundle is exported",
                    run_dir, weights.name)
    return state, rounds


def checkpoint(adapter: Adapter, layout: RunLayout, key: RunKey, state: PoolState, rounds: list[dict]) -> None:
    """After a round: its weights (a new file per round), then the ``state.json`` that names them, then the older
    rounds' weights are deleted. Under torchrun every rank holds the same weights and records; rank 0 writes."""
    if not adapter.dist.is_main:
        return
    run_dir = layout.run_dir(key.name, key.seed)
    weights_name = layout.weights_name(rounds[-1]["round"])
    atomic_write(run_dir / weights_name, lambda p: save_file(adapter.current_state(), str(p)))
    atomic_write_json(layout.state(key.name, key.seed), {
        "format": STATE_FORMAT, "pool_state": state.state_dict(), "rounds": rounds, "weights": weights_name,
        "fingerprint": key.fingerprint()})
    for old in run_dir.glob(layout.WEIGHTS_GLOB):
        if old.name != weights_name:
            old.unlink(missing_ok=True)
