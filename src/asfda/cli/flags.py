"""The flags the commands share, their value types, and where a flag's default comes from.

Choice lists are `asfda.options`'s. A flag that sets a setting declares no default of its own: it reads the settings
dataclass's (`settings_default`), at once for `asfda.config`'s (light to import), or, for a project's settings
(`asfda.project.ProjectSettings`, which pulls in torch), when the help is printed (`from_settings`, shown by
`HelpFormatter`) and when the command runs (the flag's value is None: the settings' default applies). Nothing heavy is
imported here: `asfda --help` stays free of torch."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from asfda.options import IMAGE_MODES, OUTPUT_ACTIVATIONS, PRECISIONS

__all__ = ["HelpFormatter", "IMAGE_MODES", "STRATEGY_NAMES", "add_common", "add_device", "add_inference_precision",
           "add_model_flags", "add_precision", "add_strategies", "add_strategy", "add_trust", "alpha", "device_type",
           "from_settings", "int_list", "project_default", "run_default", "seed", "seed_list", "setting",
           "settings_default"]


def settings_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of settings dataclass ``cls``, read from its `dataclasses.fields`; a dotted
    ``name`` (``train.steps``) reads the nested dataclass's field of the default value."""
    first, *rest = name.split(".")
    field = next(f for f in dataclasses.fields(cls) if f.name == first)
    value = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    for part in rest:
        value = getattr(value, part)
    return value


def run_default(name: str) -> Any:
    """The default of run-config setting ``name`` (`asfda.config.RunConfig`; ``train.steps``: its `TrainConfig`)."""
    from asfda.config import RunConfig

    return settings_default(RunConfig, name)


def project_default(name: str) -> Any:
    """The default of project setting ``name`` (`asfda.project.ProjectSettings`: imports torch)."""
    from asfda import project

    return settings_default(project.ProjectSettings, name)


def from_settings(action: argparse.Action, name: str, shown: Callable[[Any], str] = str) -> argparse.Action:
    """Marks a flag (default None) whose default is project setting ``name``: `HelpFormatter` shows it."""
    action.default_source = lambda: shown(project_default(name))  # type: ignore[attr-defined]
    return action


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with "(default: X)" after a flag marked by `from_settings` (X read when the help is
    printed)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        source = getattr(action, "default_source", None)
        if source is None:
            return text
        default = f"(default: {str(source()).replace('%', '%%')})"
        return f"{text} {default}" if text else default


def device_type(text: str) -> str:
    """--device: one of `asfda.engine.DEVICE_FORMS` (whether this machine has it is checked when the model loads)."""
    from asfda.engine import check_device_name
    from asfda.errors import AsfdaError

    try:
        return check_device_name(text)
    except AsfdaError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def alpha(text: str) -> float:
    """--alpha: a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def seed(text: str) -> int:
    """--seed, --fold-seed: a whole number in [0, `asfda.config.SEED_MAX`]."""
    from asfda.config import SEED_MAX, seed_ok

    try:
        value: object = int(text)
    except ValueError:
        value = None
    if not seed_ok(value):
        raise argparse.ArgumentTypeError(f"a seed is a whole number in [0, {SEED_MAX}], got {text!r}")
    assert isinstance(value, int)
    return value


def seed_list(text: str) -> list[int]:
    """--random-seeds: comma-separated seeds."""
    return [seed(x) for x in text.split(",") if x.strip()]


def setting(text: str) -> tuple[str, str]:
    """--set KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"KEY=VALUE expected, got {text!r}")
    return key.strip(), value.strip()


class _LazyChoices:
    """A list of names as argparse ``choices``, read from ``module.attr`` only when a value is given or help is
    printed (the module pulls in torch). A list of names is "in" it when every name is."""

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def _names(self) -> list[str]:
        import importlib

        return list(getattr(importlib.import_module(self.module), self.attr))

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, value: object) -> bool:
        values = value if isinstance(value, list) else [value]
        return all(v in self._names() for v in values)


class _StrategyNames(_LazyChoices):
    """The strategy registry (`asfda.selection.STRATEGIES`), sorted."""

    def __init__(self) -> None:
        super().__init__("asfda.selection", "STRATEGIES")

    def _names(self) -> list[str]:
        return sorted(super()._names())


STRATEGY_NAMES = _StrategyNames()


def _strategy_name(text: str) -> str:
    return text.strip().lower()


def _strategy_list(text: str) -> list[str]:
    """Comma-separated strategy names, each checked against the registry."""
    names = [_strategy_name(n) for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no strategy names in {text!r}; choose from {', '.join(STRATEGY_NAMES)}")
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown strategy {', '.join(map(repr, unknown))}; choose from "
                                         f"{', '.join(STRATEGY_NAMES)}")
    return names


def add_strategy(p: argparse.ArgumentParser, what: str) -> None:
    """--strategy NAME; None when not given (the project settings' strategy, shown in the help)."""
    from_settings(p.add_argument("--strategy", type=_strategy_name, choices=STRATEGY_NAMES, metavar="NAME",
                                 help=f"{what}: one of %(choices)s"), "strategy")


def add_strategies(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--strategies", type=_strategy_list, choices=STRATEGY_NAMES, metavar="NAMES",
                   help=f"comma-separated strategy names among %(choices)s; {what}")


def add_device(p: argparse.ArgumentParser, default: str | None, where: str = "") -> None:
    """--device; ``default`` None: ``where`` says whose device applies (a config file's, a project's)."""
    p.add_argument("--device", type=device_type, default=default, help="auto (CUDA when available), cpu, cuda, "
                   f"cuda:N, mps (default: {default or where})")


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fine-tuning precision: fp32, or bf16 autocast (faster on CPUs with bf16 instructions and on "
                   f"GPUs) (default: the config's, {run_default('train.precision')}); inference stays fp32 so that "
                   "every figure compares")


def add_inference_precision(p: argparse.ArgumentParser) -> None:
    """--precision of a command that only runs the model: the fine-tuning precision's default (full precision)."""
    p.add_argument("--precision", choices=PRECISIONS, default=run_default("train.precision"),
                   help="inference precision: fp32, or bf16 autocast of each window's forward (faster on CPUs with "
                   "bf16 instructions and on GPUs; windows blended in fp32) (default: %(default)s)")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


TRUST_MODEL_CODE_HELP = ("build the model config with MONAI's full ConfigParser (runs $ expressions and any _target_): "
                         "only for bundles you trust; also needed to load a TorchScript model (a program, refused "
                         "without it). Given here only: a config file cannot grant it")


def add_trust(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_MODEL_CODE_HELP + extra)


def _add_output_activation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-activation", choices=OUTPUT_ACTIVATIONS, default=None,
                   help="what turns the network's output into probabilities: softmax, sigmoid, or none for a network "
                   "that already outputs probabilities (no second softmax) (default: what the model declares: "
                   "asfda_output_activation in its config, its metadata, its postprocessing; else softmax)")


def add_model_flags(p: argparse.ArgumentParser, *, fine_tunes: bool = False, device: str = "run",
                    trust_extra: str = "") -> None:
    """The flags of every command that loads and runs a model: --device, --precision (the fine-tuning precision where
    the command fine-tunes, else the inference precision), --trust-model-code, --output-activation, and the common
    ones. ``device``: whose default device applies: ``run`` (the run config's, given to the command), ``config`` (a
    config file's, else the run config's) or ``project`` (the project settings', shown in the help)."""
    if device == "project":
        from_settings(p.add_argument("--device", type=device_type, help="auto (CUDA when available), cpu, cuda, "
                                     "cuda:N, mps"), "device")
    else:
        add_device(p, run_default("device") if device == "run" else None,
                   f"the config file, else {run_default('device')}")
    (add_precision if fine_tunes else add_inference_precision)(p)
    add_trust(p, trust_extra)
    _add_output_activation(p)
    add_common(p)
