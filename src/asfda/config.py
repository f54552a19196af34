"""Typed settings: composed dataclasses, each field declared once with its default and its check, read from YAML and
overridden by CLI flags; unknown keys are errors. `StrategySettings` (what asfda's query reads) and `AdaptSettings`
(what a simulated run and an annotation project share) are the common part of `RunConfig` and a project's
``ProjectSettings``, so each default and each range check exists once (`Settings.problems`); `defaults` and
`default_of` give them to the command line. The bounded reader of every YAML/JSON settings file
(`read_config_file`) is `asfda.config_files`, re-exported here."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

from asfda import options
from asfda.config_files import MAX_CONFIG_BYTES, check_config_data, read_config_file
from asfda.errors import AsfdaError

__all__ = ["MAX_CONFIG_BYTES", "MAX_TRAIN_VOXELS", "SEED", "SEED_MAX", "AdaptSettings", "Problem", "RunConfig",
           "SemiConfig", "SettingError", "Settings", "StrategySettings", "TrainConfig", "check_config_data",
           "config_from_dict", "config_to_dict", "default_of", "defaults", "load_config", "read_config_file", "seed_ok",
           "setting", "train_voxels_ok"]

# RunConfig fields that a config file may not set: given on the command line only (`load_config`)
COMMAND_LINE_ONLY = "command_line_only"
_CHECK, _CHOICES = "check", "choices"  # a field's metadata: (test, what the value must be); its valid strings

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


# ---------------------------------------------------------------------------------------------- checks
Check = tuple[Callable[[Any], bool], str]
AT_LEAST_1: Check = (lambda v: v >= 1, ">= 1")
AT_LEAST_0: Check = (lambda v: v >= 0, ">= 0")
FRACTION: Check = (lambda v: math.isfinite(v) and 0 <= v <= 1, "a number in [0, 1]")
FINITE_AT_LEAST_0: Check = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
SEED: Check = (seed_ok, f"a whole number in [0, {SEED_MAX}]")


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, *, choices: Sequence[str] | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A settings field: its one default (``default``, or ``factory`` for a mutable one) and its one check (``check``:
    a test and what the value must be; ``choices``: the strings it may be, None allowed when the default is None)."""
    metadata: dict[str, Any] = {}
    if check is not None:
        metadata[_CHECK] = check
    if choices is not None:
        metadata[_CHOICES] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Problem(NamedTuple):
    """A setting out of range: its dotted name, its value, what it must be, and its valid strings (a choice)."""

    name: str
    value: Any
    want: str
    choices: tuple[str, ...] | None = None

    def message(self) -> str:
        if self.choices is not None:
            return options.option_problem(self.value, self.choices, self.name) or ""
        return f"{self.name} must be {self.want}, got {self.value!r}"


class SettingError(AsfdaError, ValueError):
    """A setting out of range (`Settings.check`): one line for a user, a ValueError for a library caller."""


class Settings:
    """Base of every settings dataclass: the checks declared with its fields (`setting`), run once for all of them,
    nested settings included."""

    def problems(self, prefix: str = "") -> list[Problem]:
        """Every value out of range, in field order (``prefix``: the dotted path of this part)."""
        out: list[Problem] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, name = getattr(self, f.name), prefix + f.name
            if isinstance(value, Settings):
                out += value.problems(f"{name}.")
            elif _CHOICES in f.metadata and (value is not None or f.default is not None):
                if options.option_problem(value, f.metadata[_CHOICES], name) is not None:
                    out.append(Problem(name, value, f"one of {list(f.metadata[_CHOICES])}", f.metadata[_CHOICES]))
            elif _CHECK in f.metadata and not _passes(f.metadata[_CHECK][0], value):
                out.append(Problem(name, value, f.metadata[_CHECK][1]))
        return out + self._cross_problems(prefix)

    def _cross_problems(self, prefix: str) -> list[Problem]:  # checks of several fields together
        return []

    def check(self, path: str | Path | None = None, fix: Callable[[Problem], str] | None = None) -> None:
        """Raises `SettingError` for the first problem, if any: "NAME must be WANT, got VALUE" (``fix``: its fix)."""
        bad = self.problems()
        if bad:
            raise SettingError(bad[0].message(), path, fix(bad[0]) if fix else None)

    def validate(self, path: str | Path | None = None) -> None:
        """A config file's check: every value out of range in one error, then the first wrong choice."""
        bad = self.problems()
        ranges = [p for p in bad if p.choices is None]
        if ranges:
            raise SettingError(f"out-of-range config values: {', '.join(p.name for p in ranges)}", path,
                               "; ".join(f"{p.name} must be {p.want}" for p in ranges))
        if bad:
            raise SettingError(bad[0].message(), path)


def _passes(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except (TypeError, ValueError):  # a value of the wrong type (a library caller's): refused, not a traceback
        return False


# ---------------------------------------------------------------------------------------------- the settings
@dataclass
class TrainConfig(Settings):
    """The training recipe of one round (every field is configurable from the run config)."""

    steps: int = setting(100, AT_LEAST_1)  # a project's rounds: asfda.project.state.PROJECT_STEPS
    batch_size: int = setting(2, AT_LEAST_1)
    # None: the model's sliding-window roi
    patch_size: tuple[int, int, int] | None = setting(None, (lambda p: p is None or all(s >= 1 for s in p),
                                                             "three sides >= 1"))
    lr: float = setting(1e-3, (lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]"))
    weight_decay: float = setting(1e-5, FINITE_AT_LEAST_0)
    warmup_fraction: float = setting(0.05, FRACTION)
    fg_oversample: float = setting(0.67, FRACTION)
    lambda_u: float = setting(1.0, FINITE_AT_LEAST_0)
    rampup_fraction: float = setting(0.3, FRACTION)
    augment: bool = True  # false: no augmentation at all, whatever `augmentation` says
    # "intensity": light global intensity changes (the original recipe); "spatial_mr": MONAI's RandAffined
    # (rotation, scaling) and MR-typical intensity transforms (bias field, gamma, noise): asfda.training.augment
    augmentation: str = setting("intensity", choices=options.AUGMENTATIONS)
    # true: every round trains from the pretrained weights on every label so far; false: it continues from the
    # previous round's weights (METHOD.md). A round the guard discards leaves the previous round's model either way
    restart: bool = False
    # true: a labelled volume whose round the guard discarded is left out of training (its label kept) until
    # enough other labels exist (asfda.training.guard.held_back); false: every label trains every round
    hold_back_discarded: bool = True
    freeze_encoder: bool = False  # train only what runs after the bottleneck (decoder + head)
    # "bf16": forward and loss under torch.autocast(bfloat16) (weights, gradients, optimiser stay fp32);
    # faster on CPUs with bf16 instructions (benchmarks/train_step.py --variants fp32,bf16)
    precision: str = setting("fp32", choices=options.PRECISIONS)
    # true: the network trains in the channels_last_3d memory layout (put back after the round); under bf16 on a
    # CPU, oneDNN's convolutions with a channel count that is not a multiple of 8 (a 14- or 5-class head) run several
    # times faster in it (asfda.training.trainer._memory_format)
    channels_last: bool = False
    # keep a round's weights only if the adapted model's organs on up to guard_volumes unlabeled volumes are
    # at least as connected as the pretrained model's (asfda.training.guard); otherwise revert the round
    guard: bool = True
    guard_volumes: int = setting(8, AT_LEAST_1)
    seed: int = setting(0, SEED)

    def _cross_problems(self, prefix: str) -> list[Problem]:
        patch = self.patch_size
        if patch is None or not _passes(lambda p: all(s >= 1 for s in p), patch):
            return []  # no patch (the model's roi: checked once known), or refused by its own check
        if _passes(lambda p: train_voxels_ok(p, max(self.batch_size, 1)), patch):
            return []
        return [Problem(f"{prefix}patch_size", patch,
                        f"small enough that patch voxels x train.batch_size <= {MAX_TRAIN_VOXELS:,}")]


@dataclass
class SemiConfig(Settings):
    """Selective semi-supervision (reliable unlabeled volumes with masked pseudo-labels)."""

    enabled: bool = False
    confident_fraction: float = setting(0.5, FRACTION)
    close_fraction: float = setting(0.5, FRACTION)
    prob_threshold: float = setting(0.9, FRACTION)
    flip_average: bool = False  # pseudo-labels from logits averaged over flips (never left-right)
    # "previous": pseudo-labels and reliability from the model as the round starts (METHOD.md's text);
    # "warmup": first train on the labelled volumes alone for warmup_fraction of the steps, then take
    # reliability and pseudo-labels from that model (round 0 otherwise pseudo-labels with the zero-shot model)
    pseudo_from: str = setting("warmup", choices=options.PSEUDO_SOURCES)
    warmup_fraction: float = setting(0.5, FRACTION)


@dataclass(kw_only=True)
class StrategySettings(Settings):
    """What asfda's query reads besides the pool's numbers (`asfda.selection.build_strategy`); other strategies read
    none of it."""

    alpha: float = setting(0.5, (lambda v: 0 <= v <= 1, "in [0, 1]"))  # weight of DKD against ASD
    round0_gap: str = setting("feature_gap", choices=options.ROUND0_GAPS)  # round 0 without BatchNorm statistics
    # the greedy batch pick's space: "embedding" (METHOD.md's), "anatomy" (predicted composition), "none", "batch"
    diversity: str = setting(options.DEFAULT_DIVERSITY, choices=options.DIVERSITY_SPACES)
    # "none" (METHOD.md's), "density", "typical", "complete" (default), "coverage", "trimmed": see options
    representativeness: str = setting("complete", choices=options.REPRESENTATIVENESS)


@dataclass(kw_only=True)
class AdaptSettings(StrategySettings):
    """What a simulated run (`RunConfig`) and an annotation project (``ProjectSettings``) share: the query, the model's
    output, the device and the training recipe."""

    budget: int = setting(2, AT_LEAST_1)  # volumes labelled per round
    temperature0: float = setting(1.0, (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"))
    grow_voxels: int = setting(2, AT_LEAST_0)
    class_map: str | None = None
    device: str = "auto"
    # what turns the network's output into probabilities: softmax, sigmoid, or none (it already outputs
    # probabilities); None: what the model declares (asfda.models.load_model)
    output_activation: str | None = setting(None, choices=options.OUTPUT_ACTIVATIONS)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    # "consider stopping" below this expected next-round gain (mean Dice): what status shows, never a pick or weight
    stop_gain: float = setting(0.01, (lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1)"))


@dataclass(kw_only=True)
class RunConfig(AdaptSettings):
    """One simulation: which model, which data, which strategies, how many labels, how to train (the fields it shares
    with a project: `AdaptSettings`)."""

    model: str = ""
    pool: str = ""
    test: str | None = None  # a separate labelled test dataset; None: a seeded split of the pool
    test_fraction: float = setting(0.25, (lambda v: 0 < v < 1, "in (0, 1)"))
    strategies: list[str] = field(default_factory=lambda: ["asfda", "random"])
    rounds: int = setting(3, AT_LEAST_1)
    seeds: list[int] = setting(factory=lambda: [0], check=(lambda v: len(v) >= 1 and all(seed_ok(s) for s in v),
                                                           f"one or more whole numbers in [0, {SEED_MAX}]"))
    evaluate_tta: bool = False  # test Dice from logits averaged over flips (never left-right), as `predict --tta`
    # the full-supervision upper bound: fine-tune the pretrained model on the whole pool, every case labelled,
    # for upper_bound_steps (0: train.steps x rounds, the steps a strategy's model has seen at its last round)
    upper_bound: bool = True
    upper_bound_steps: int = setting(0, AT_LEAST_0)
    report: bool = True  # report.html: curves, tables, queries and why, overlay previews
    previews: int = setting(4, AT_LEAST_0)  # overlay previews per strategy in the report (first seed's queried volumes)
    cache_dir: str = ".cache"
    out_dir: str = "runs/simulate"
    threads: int = 0  # 0: torch default
    progress: bool = True
    # build the model config with MONAI's full ConfigParser ($ expressions, any _target_) and load TorchScript
    # models: trusted models only. Given on the command line (--trust-model-code) only: a config file may not set it
    trust_model_code: bool = field(default=False, metadata={COMMAND_LINE_ONLY: True})


def defaults(cls: type = RunConfig) -> dict[str, Any]:
    """Every setting of the settings dataclass ``cls`` (`RunConfig`, or a project's ``ProjectSettings``) at its default,
    by dotted name (``"train.steps"``): what the command line shows and passes when a flag is not given."""
    return _flat(config_to_dict(cls()))


def default_of(name: str, cls: type = RunConfig) -> Any:
    """The default of one setting of ``cls`` by dotted name (``default_of("train.steps")``); unknown names raise
    `AsfdaError` with a "did you mean"."""
    known = defaults(cls)
    if name not in known:
        raise AsfdaError(f"{cls.__name__} has no setting {name!r}{options.did_you_mean(name, list(known))}")
    return known[name]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {k: v for key, value in data.items()
            for k, v in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}).items()}


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
            raise AsfdaError(f"unknown key {key!r} in {where}{options.did_you_mean(key, sorted(names))}; valid keys: "
                             f"{sorted(names)}")
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
    cfg.validate(path)
    return cfg
