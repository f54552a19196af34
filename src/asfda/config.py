"""Typed run configuration: dataclasses read from YAML, overridden by CLI flags; unknown keys are errors. The
bounded reader of every YAML/JSON settings file (`read_config_file`) is `asfda.config_files`, re-exported here."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from asfda.config_files import MAX_CONFIG_BYTES, check_config_data, read_config_file
from asfda.errors import AsfdaError
from asfda.options import (
    AUGMENTATIONS,
    DEFAULT_DIVERSITY,
    DIVERSITY_SPACES,
    OUTPUT_ACTIVATIONS,
    PRECISIONS,
    PSEUDO_SOURCES,
    REPRESENTATIVENESS,
    ROUND0_GAPS,
    check_option,
)

__all__ = ["MAX_CONFIG_BYTES", "MAX_TRAIN_VOXELS", "SEED_MAX", "RunConfig", "SemiConfig", "TrainConfig",
           "check_config_data", "config_from_dict", "config_to_dict", "load_config", "read_config_file",
           "recipe_problems", "seed_ok", "train_voxels_ok"]

# RunConfig fields that a config file may not set: given on the command line only (`load_config`)
COMMAND_LINE_ONLY = "command_line_only"


@dataclass
class TrainConfig:
    """The training recipe of one round (every field is configurable from the run config)."""

    steps: int = 100
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = None  # None: the model's sliding-window roi
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.05
    fg_oversample: float = 0.67
    lambda_u: float = 1.0
    rampup_fraction: float = 0.3
    augment: bool = True  # false: no augmentation at all, whatever `augmentation` says
    # "intensity": light global intensity changes (the original recipe); "spatial_mr": MONAI's RandAffined
    # (rotation, scaling) and MR-typical intensity transforms (bias field, gamma, noise): asfda.training.augment
    augmentation: str = "intensity"
    # true: every round trains from the pretrained weights on every label so far; false: it continues from the
    # previous round's weights (METHOD.md). A round the guard discards leaves the previous round's model either way
    restart: bool = False
    # true: a labelled volume whose round the guard discarded is left out of training (its label kept) until
    # enough other labels exist (asfda.training.guard.held_back); false: every label trains every round
    hold_back_discarded: bool = False
    freeze_encoder: bool = False  # train only what runs after the bottleneck (decoder + head)
    # "bf16": forward and loss under torch.autocast(bfloat16) (weights, gradients, optimiser stay fp32);
    # faster on CPUs with bf16 instructions (benchmarks/train_step.py --variants fp32,bf16)
    precision: str = "fp32"
    # true: the network trains in the channels_last_3d memory layout (put back after the round); under bf16 on a
    # CPU, oneDNN's convolutions with a channel count that is not a multiple of 8 (a 14- or 5-class head) run several
    # times faster in it (asfda.training.trainer._memory_format)
    channels_last: bool = False
    # keep a round's weights only if the adapted model's organs on up to guard_volumes unlabeled volumes are
    # at least as connected as the pretrained model's (asfda.training.guard); otherwise revert the round
    guard: bool = True
    guard_volumes: int = 8
    seed: int = 0


@dataclass
class SemiConfig:
    """Selective semi-supervision (reliable unlabeled volumes with masked pseudo-labels)."""

    enabled: bool = False
    confident_fraction: float = 0.5
    close_fraction: float = 0.5
    prob_threshold: float = 0.9
    flip_average: bool = False  # pseudo-labels from logits averaged over flips (never left-right)
    # "previous": pseudo-labels and reliability from the model as the round starts (METHOD.md's text);
    # "warmup": first train on the labelled volumes alone for warmup_fraction of the steps, then take
    # reliability and pseudo-labels from that model (round 0 otherwise pseudo-labels with the zero-shot model)
    pseudo_from: str = "warmup"
    warmup_fraction: float = 0.5


@dataclass
class RunConfig:
    """One simulation: which model, which data, which strategies, how many labels, how to train."""

    model: str = ""
    pool: str = ""
    test: str | None = None  # a separate labelled test dataset; None: a seeded split of the pool
    test_fraction: float = 0.25
    strategies: list[str] = field(default_factory=lambda: ["asfda", "random"])
    budget: int = 2  # volumes labelled per round
    rounds: int = 3
    seeds: list[int] = field(default_factory=lambda: [0])
    alpha: float = 0.5  # weight of DKD against ASD
    round0_gap: str = "feature_gap"  # asfda at round 0 without BatchNorm statistics: "feature_gap" or "norm_kl"
    # asfda's batch diversity space: "anatomy" (predicted composition) or "embedding"
    diversity: str = DEFAULT_DIVERSITY
    representativeness: str = "none"  # asfda: "density" adds TypiClust typicality, weighted down as labels accrue;
    # "typical" also leaves the least typical volumes out and caps the diversity factor (see selection.strategies)
    evaluate_tta: bool = False  # test Dice from logits averaged over flips (never left-right), as `predict --tta`
    temperature0: float = 1.0
    grow_voxels: int = 2
    class_map: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    # the full-supervision upper bound: fine-tune the pretrained model on the whole pool, every case labelled,
    # for upper_bound_steps (0: train.steps x rounds, the steps a strategy's model has seen at its last round)
    upper_bound: bool = True
    upper_bound_steps: int = 0
    report: bool = True  # report.html: curves, tables, queries and why, overlay previews
    previews: int = 4  # overlay previews per strategy in the report (first seed's queried volumes)
    cache_dir: str = ".cache"
    out_dir: str = "runs/simulate"
    device: str = "auto"
    threads: int = 0  # 0: torch default
    progress: bool = True
    # build the model config with MONAI's full ConfigParser ($ expressions, any _target_) and load TorchScript
    # models: trusted models only. Given on the command line (--trust-model-code) only: a config file may not set it
    trust_model_code: bool = field(default=False, metadata={COMMAND_LINE_ONLY: True})
    # what turns the network's output into probabilities: softmax, sigmoid, or none (it already outputs
    # probabilities); None: what the model declares (asfda.models.load_model)
    output_activation: str | None = None


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Builds dataclass ``cls`` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise AsfdaError(f"{where} must be a mapping, got {_shown(data)}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise AsfdaError(f"key {_shown(key)} in {where} is not a name; valid keys: {sorted(names)}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise AsfdaError(f"unknown key {key!r} in {where}{hint}; valid keys: {sorted(names)}")
        hint_t = hints[key]
        if isinstance(hint_t, type) and dataclasses.is_dataclass(hint_t):  # a nested config class
            kwargs[key] = config_from_dict(hint_t, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint_t, f"{where}.{key}")
    return cls(**kwargs)


_STR_HINTS = ("str", "str | None", "typing.Optional[str]", "typing.Union[str, NoneType]")


def _shown(value: Any, limit: int = 60) -> str:
    """A value as a message shows it: its repr, cut to ``limit`` characters, with its type when not a plain scalar."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if isinstance(value, (str, int, float, bool, type(None))) else f"{text} ({type(value).__name__})"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise AsfdaError(f"{where} may not be null")
    if hint is bool or text == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise AsfdaError(f"{where} must be true or false, got {value!r}")
    if hint is int or text == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise AsfdaError(f"{where} must be an integer, got {_shown(value)}")
        try:
            return int(value)
        except ValueError:
            raise AsfdaError(f"{where} must be an integer, got {_shown(value)}") from None
    if hint is float or text == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise AsfdaError(f"{where} must be a number, got {_shown(value)}")
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise AsfdaError(f"{where} must be a number, got {_shown(value)}") from None
    if hint is str or text in _STR_HINTS:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise AsfdaError(f"{where} must be a string, got {_shown(value)}")
        return str(value)
    if text.startswith(("list[int]", "list[str]")):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise AsfdaError(f"{where} must be a list or a comma-separated string, got {_shown(value)}")
        if text.startswith("list[int]"):
            return [_coerce(v.strip() if isinstance(v, str) else v, int, where) for v in items]
        return [_coerce(v, str, where).strip() for v in items]
    if "tuple[int, int, int]" in text:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != 3:
            raise AsfdaError(f"{where} must have 3 integers, got {_shown(value)}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, int, where) for v in items)
    return value


def _refuse_command_line_only(cls: type, data: dict, path: Path, where: str = "") -> None:
    """Refuses a config file that sets a field given on the command line only (`COMMAND_LINE_ONLY`): trust in a
    model's code is never read from a file, which may come from the same place as the model. ``false`` grants
    nothing and is accepted (what a run's recorded config holds)."""
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = get_type_hints(cls)[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(data[f.name], dict):
            _refuse_command_line_only(hint, data[f.name], path, f"{where}{f.name}.")
        elif f.metadata.get(COMMAND_LINE_ONLY) and _grants(data[f.name]):
            flag = "--" + f.name.replace("_", "-")
            raise AsfdaError(f"{where}{f.name}: {_shown(data[f.name])} in a config file: trust in a model's code is "
                             f"given on the command line only ({flag}), never by a file", path,
                             f"remove {where}{f.name} from the file; pass {flag} if you trust the model")


def _grants(value: Any) -> bool:
    try:
        return value is not None and _coerce(value, bool, "") is not False
    except AsfdaError:  # not a boolean at all: refused as a setting too
        return True


SEED_MAX = 2 ** 32 - 1
"""The largest seed asfda takes (numpy refuses negative seeds, torch ones past 2^64; MONAI's below 2^32)."""


MAX_TRAIN_VOXELS = 1 << 24
"""The most voxels one training step may hold (patch voxels x batch size): 16.8M, 19 times the benchmark's recipe
(96 x 96 x 48 x 2), about 20 GB of activations for MONAI's UNet; a larger one would exhaust a machine's memory."""


def train_voxels_ok(patch: tuple[int, ...], batch_size: int) -> bool:
    """Whether a training step of ``batch_size`` patches of ``patch`` stays within `MAX_TRAIN_VOXELS`."""
    n = batch_size
    for side in patch:
        n *= side
    return n <= MAX_TRAIN_VOXELS


def seed_ok(value: object) -> bool:
    """Whether ``value`` is a seed asfda takes: a whole number in [0, `SEED_MAX`]."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX


def recipe_problems(train: TrainConfig, semi: SemiConfig) -> list[tuple[str, str]]:
    """``(setting, what it must be)`` of each training or semi-supervision value out of range: what the run config
    (`load_config`) and a project's settings share. A negative weight decay, a non-finite fraction or a learning
    rate past float32 would stop the round with a traceback (or train on NaN)."""
    def fraction(v: float) -> bool:
        return math.isfinite(v) and 0 <= v <= 1

    t, patch = train, train.patch_size
    checks = [("train.steps", t.steps >= 1, ">= 1"), ("train.batch_size", t.batch_size >= 1, ">= 1"),
              ("train.lr", math.isfinite(t.lr) and 0 < t.lr <= 1, "a number in (0, 1]"),
              ("train.weight_decay", math.isfinite(t.weight_decay) and t.weight_decay >= 0, "a finite number >= 0"),
              ("train.lambda_u", math.isfinite(t.lambda_u) and t.lambda_u >= 0, "a finite number >= 0"),
              ("train.patch_size", patch is None or all(p >= 1 for p in patch), "three sides >= 1"),
              ("train.patch_size", patch is None or train_voxels_ok(patch, max(t.batch_size, 1)),
               f"small enough that patch voxels x train.batch_size <= {MAX_TRAIN_VOXELS:,}"),
              ("train.guard_volumes", t.guard_volumes >= 1, ">= 1"),
              ("train.seed", seed_ok(t.seed), f"a whole number in [0, {SEED_MAX}]")]
    checks += [(f"train.{n}", fraction(getattr(t, n)), "a number in [0, 1]")
               for n in ("warmup_fraction", "fg_oversample", "rampup_fraction")]
    checks += [(f"semi.{n}", fraction(getattr(semi, n)), "a number in [0, 1]")
               for n in ("confident_fraction", "close_fraction", "prob_threshold", "warmup_fraction")]
    return [(name, want) for name, ok, want in checks if not ok]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Reads a YAML config (optional) then applies dotted overrides like ``{"train.steps": 50}``."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise AsfdaError("config file not found", p)
        data = read_config_file(p, yaml_syntax=True, what="run config")
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise AsfdaError(f"a run config must be a mapping of settings, got {_shown(data)}", p,
                             "write one 'key: value' per line, e.g. 'budget: 2'")
        _refuse_command_line_only(RunConfig, data, p)
    try:
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            node = data
            parts = key.split(".")
            for i, part in enumerate(parts[:-1]):
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise AsfdaError(f"{'.'.join(parts[:i + 1])} must be a mapping (it has settings under it: "
                                     f"{key}), got {_shown(node)}", path, "write it as a mapping, or remove it")
            node[parts[-1]] = value
        cfg = config_from_dict(RunConfig, data)
    except AsfdaError as exc:
        if path is None or exc.path is not None:
            raise
        raise AsfdaError(exc.problem, path, exc.fix) from None  # name the file the bad value came from
    checks = [("budget", cfg.budget >= 1, ">= 1"), ("rounds", cfg.rounds >= 1, ">= 1"),
              ("test_fraction", 0 < cfg.test_fraction < 1, "in (0, 1)"), ("alpha", 0 <= cfg.alpha <= 1, "in [0, 1]"),
              ("temperature0", math.isfinite(cfg.temperature0) and cfg.temperature0 > 0, "finite and > 0"),
              ("seeds", len(cfg.seeds) >= 1 and all(seed_ok(s) for s in cfg.seeds),
               f"one or more whole numbers in [0, {SEED_MAX}]"),
              ("upper_bound_steps", cfg.upper_bound_steps >= 0, ">= 0"), ("previews", cfg.previews >= 0, ">= 0")]
    bad = recipe_problems(cfg.train, cfg.semi) + [(name, want) for name, ok, want in checks if not ok]
    if bad:
        raise AsfdaError(f"out-of-range config values: {', '.join(name for name, _ in bad)}", path,
                         "; ".join(f"{name} must be {want}" for name, want in bad))
    for name, value, options in (("train.precision", cfg.train.precision, PRECISIONS),
                                 ("train.augmentation", cfg.train.augmentation, AUGMENTATIONS),
                                 ("round0_gap", cfg.round0_gap, ROUND0_GAPS),
                                 ("diversity", cfg.diversity, DIVERSITY_SPACES),
                                 ("representativeness", cfg.representativeness, REPRESENTATIVENESS),
                                 ("output_activation", cfg.output_activation, OUTPUT_ACTIVATIONS),
                                 ("semi.pseudo_from", cfg.semi.pseudo_from, PSEUDO_SOURCES)):
        if value is not None:  # only output_activation may be None: what the model declares
            check_option(value, options, name, path=path)
    return cfg
