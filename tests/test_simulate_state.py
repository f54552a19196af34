"""state.json (asfda.simulate_state): the fingerprint a resumed run must match, pinned to the values the code before
the format version computed (and a real run saved); the one-time migration of format-1 files; the round record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import pytest

from asfda.config import RunConfig, config_from_dict
from asfda.errors import AsfdaError, RunSettingsChanged
from asfda.selection import build_strategy
from asfda.simulate_state import STATE_FORMAT, RoundRecord, RunKey, accept_state

# the run config of benchmarks/results/crossval/ct_to_mr/fold0 (run.json), its fold's case ids, model hashes
_CONFIG = json.loads("""{"model": "/work/shared/models/ct_abdomen_unet",
 "pool": ".cache/cv/mr_chaos_t2/7folds_seed0/fold0/pool", "test": ".cache/cv/mr_chaos_t2/7folds_seed0/fold0/test",
 "test_fraction": 0.25, "strategies": ["asfda"], "budget": 1, "rounds": 4, "seeds": [0, 1], "alpha": 0.5,
 "round0_gap": "feature_gap", "diversity": "embedding", "representativeness": "density", "evaluate_tta": false,
 "temperature0": 1.0, "grow_voxels": 2, "class_map": null,
 "train": {"steps": 200, "batch_size": 2, "patch_size": null, "lr": 0.001, "weight_decay": 1e-05,
  "warmup_fraction": 0.05, "fg_oversample": 0.67, "lambda_u": 1.0, "rampup_fraction": 0.3, "augment": true,
  "augmentation": "intensity", "restart": false, "hold_back_discarded": true, "freeze_encoder": false,
  "precision": "bf16", "channels_last": false, "guard": true, "guard_volumes": 8, "seed": 0},
 "semi": {"enabled": false, "confident_fraction": 0.5, "close_fraction": 0.5, "prob_threshold": 0.9,
  "flip_average": false, "pseudo_from": "warmup", "warmup_fraction": 0.5},
 "upper_bound": false, "upper_bound_steps": 1000, "report": false, "previews": 4, "cache_dir": ".cache",
 "out_dir": "benchmarks/results/crossval/ct_to_mr/fold0", "device": "auto", "threads": 1, "progress": false,
 "trust_model_code": false, "output_activation": null}""")
_POOL = ("chaos_003", "chaos_005", "chaos_020", "chaos_021", "chaos_022", "chaos_031", "chaos_032", "chaos_034",
         "chaos_036", "chaos_037", "chaos_038", "chaos_039")
_TEST = ("chaos_013", "chaos_019")
_WEIGHTS, _PREPROCESSING = "4f7b529fc6f30983", "faf24dd649d26328"

# computed by simulate._fingerprint before state.json had a format (commit 23ea5ef); asfda seed 0 and 1 in the
# embedding space are the fingerprints that real run saved
_PINNED = {
    ("asfda", 0, "embedding"): ("f1ef3c6ca4ac130d", "44d16723f9d63743"),
    ("asfda", 1, "embedding"): ("4247029ab2634864", "66e4287a3d53ad7f"),
    ("asfda", 0, "anatomy"): ("6c316dd6f3b867ca", "5110a3934fb5d3f7"),
    ("random", 0, "embedding"): ("e5d215a3acdfa699", "c7cbfef251f1a70f"),
    ("random", 0, "anatomy"): ("e5d215a3acdfa699", "c7cbfef251f1a70f"),
    ("random", 1, "anatomy"): ("cb400d35ed551899", "4b46c4f862d866d5"),
    ("ASFDA", 0, "embedding"): ("c91bf9fd55104271", "6c00e63f160f5346"),
    ("ASFDA", 1, "anatomy"): ("9c9f56aeebe39e61", "ef5b149fa9324f45"),
}


def _key(name: str = "asfda", seed: int = 0, diversity: str = "embedding") -> RunKey:
    cfg = dataclasses.replace(config_from_dict(RunConfig, _CONFIG), diversity=diversity)
    strategy = build_strategy(name, settings=cfg)
    return RunKey(cfg, name, seed, _POOL, _TEST, _WEIGHTS, _PREPROCESSING, frozenset(strategy.settings()))


@pytest.mark.parametrize(("name", "seed", "diversity"), list(_PINNED))
def test_fingerprints_are_the_ones_runs_were_written_with(name: str, seed: int, diversity: str) -> None:
    """What `Strategy.settings` declares decides whether ``diversity`` enters (asfda's, not random's), and every
    fingerprint equals the one the code before the format version computed: existing runs resume."""
    key = _key(name, seed, diversity)
    assert (key.fingerprint(2), key.path_fingerprint()) == _PINNED[(name, seed, diversity)]
    # format 3: representativeness enters only the fingerprints of the strategies that read it (asfda's)
    assert (key.fingerprint() == key.fingerprint(2)) == (name != "random")


def _with(key: RunKey, **settings: Any) -> RunKey:
    return dataclasses.replace(key, cfg=dataclasses.replace(key.cfg, **settings))


def test_changing_asfdas_representativeness_keeps_randoms_finished_rounds() -> None:
    random, asfda = _key("random"), _key("asfda")
    assert _with(random, representativeness="coverage").fingerprint() == random.fingerprint()
    assert _with(asfda, representativeness="coverage").fingerprint() != asfda.fingerprint()
    # a format-2 random run written with representativeness: density resumes under coverage, rewritten once
    old = _state(random.fingerprint(2), format=2)
    migrated, changed = accept_state(old, _with(random, representativeness="coverage"), Path("run"))
    assert changed and migrated["format"] == STATE_FORMAT and migrated["fingerprint"] == random.fingerprint()
    with pytest.raises(RunSettingsChanged, match="representativeness: density, and this config asks for "
                                                 "representativeness: coverage"):
        accept_state(_state(asfda.fingerprint(2), format=2), _with(asfda, representativeness="coverage"), Path("r"))


def _state(fingerprint: str, **extra) -> dict:
    return {"pool_state": {"labelled": {"chaos_031": 0}}, "rounds": [{"round": 0}], "weights": "w.safetensors",
            "fingerprint": fingerprint, **extra}


@pytest.mark.parametrize("kind", ["fingerprint", "path_fingerprint"])
def test_a_format_1_state_is_accepted_and_migrated_once(kind: str) -> None:
    key = _key()
    old = _state(getattr(key, kind)())
    migrated, changed = accept_state(old, key, Path("run"))
    assert changed and migrated["format"] == STATE_FORMAT and migrated["fingerprint"] == key.fingerprint()
    assert {k: v for k, v in migrated.items() if k not in ("format", "fingerprint")} == \
        {k: v for k, v in old.items() if k != "fingerprint"}
    again, changed_again = accept_state(migrated, key, Path("run"))
    assert again == migrated and not changed_again


def test_after_the_migration_only_the_current_fingerprint_is_accepted() -> None:
    key = _key()
    with pytest.raises(RunSettingsChanged, match="other settings"):
        accept_state(_state(key.path_fingerprint(), format=STATE_FORMAT), key, Path("run"))
    with pytest.raises(RunSettingsChanged, match="other settings"):
        accept_state(_state("0123456789abcdef"), key, Path("run"))
    with pytest.raises(AsfdaError, match=f"format {STATE_FORMAT + 1}"):
        accept_state(_state(key.fingerprint(), format=STATE_FORMAT + 1), key, Path("run"))


@pytest.mark.parametrize("fmt", [None, STATE_FORMAT])
def test_a_run_picked_in_another_diversity_space_is_refused_by_name(fmt: int | None) -> None:
    embedding, anatomy = _key(diversity="embedding"), _key(diversity="anatomy")
    extra = {} if fmt is None else {"format": fmt}
    with pytest.raises(RunSettingsChanged, match="diversity: embedding, and this config asks for diversity: anatomy"):
        accept_state(_state(embedding.fingerprint(), **extra), anatomy, Path("run"))
    if fmt is None:  # a format-1 run with the path fingerprint too
        with pytest.raises(RunSettingsChanged, match="diversity: embedding"):
            accept_state(_state(embedding.path_fingerprint()), anatomy, Path("run"))


def test_the_round_record_keeps_state_json_keys_in_their_order() -> None:
    keys = ["round", "n_labelled", "queried", "trained_ids", "held_back", "query_scores", "query_components",
            "reliable", "guard", "temperature", "ece_before", "ece_after", "seconds_score", "seconds_train", "device",
            "loss_final", "per_case", "dice_mean", "probe", "queried_dice_before", "seconds_stopping",
            "forward_passes", "stopping"]
    record = RoundRecord(**cast(dict[str, Any], {k: k for k in keys}))
    assert list(record.to_dict()) == keys and record.to_dict()["per_case"] == "per_case"


def test_the_stop_threshold_is_not_part_of_what_a_round_depends_on() -> None:
    """``stop_gain`` changes the recommendation shown after a round, never its pick or weights: a run resumes under
    another threshold (while a setting a round does depend on still changes the fingerprint)."""
    key = _key()
    other = dataclasses.replace(key, cfg=dataclasses.replace(key.cfg, stop_gain=0.05))
    assert other.fingerprint() == key.fingerprint()
    assert dataclasses.replace(key, cfg=dataclasses.replace(key.cfg, budget=3)).fingerprint() != key.fingerprint()
