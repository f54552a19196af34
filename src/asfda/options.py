"""The one check of a setting that takes one of a few strings (diversity space, round-0 gap, representativeness,
pseudo-label source, augmentation, precision, output activation): the value must be one of them exactly, and the
error names the valid ones and, when one is close, "did you mean" (`closest_option`: the one guess asfda makes,
for option values, config keys, project settings and strategy names alike)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from asfda.errors import AsfdaError

__all__ = ["AUGMENTATIONS", "DEFAULT_DIVERSITY", "DIVERSITY_SPACES", "OUTPUT_ACTIVATIONS", "PRECISIONS",
           "PSEUDO_SOURCES", "REPRESENTATIVENESS", "ROUND0_GAPS", "check_option", "closest_option", "did_you_mean",
           "option_problem"]

PRECISIONS = ("fp32", "bf16")
"""Fine-tuning (and inference) precision: fp32, or bfloat16 autocast."""
AUGMENTATIONS = ("none", "intensity", "spatial_mr")
"""Training patch augmentation recipes (`asfda.training.augment`)."""
PSEUDO_SOURCES = ("previous", "warmup")
"""Where selective semi-supervision takes its reliable volumes (`asfda.config.SemiConfig.pseudo_from`)."""
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid", "none")
"""``output_activation`` values: what turns the network's output into probabilities (``none``: it already is)."""
ROUND0_GAPS = ("feature_gap", "norm_kl")
"""asfda's round-0 divergence for networks without stored BatchNorm statistics (`asfda.selection.ASFDAStrategy`)."""
DIVERSITY_SPACES = ("anatomy", "embedding", "none", "batch")
"""Where asfda's greedy batch pick measures the cosine distance between volumes (`asfda.selection.ASFDAStrategy`);
``batch`` is the embedding space with the labelled volumes no anchors: diversity within the batch only (with a budget
of 1, the top of the rank score, which is what ``none`` picks)."""
DEFAULT_DIVERSITY = "embedding"
"""The one place the default diversity space is set (run config, project settings, CLI and API read it)."""
REPRESENTATIVENESS = ("none", "density", "typical", "complete", "coverage", "trimmed")
"""asfda's representativeness term: ``none`` (METHOD.md's rule); ``density`` (TypiClust's typicality in the
diversity space, its rank added with weight ``TYPICALITY_WEIGHT0 / (1 + labelled)``: typical volumes first while
labels are few); ``typical`` (``density``, and the least typical ``OUTLIER_FRACTION0 / (1 + labelled)`` of the pool
are no candidates, and the diversity factor saturates at the pool's median nearest-neighbour distance, so no pick
is drawn to an outlier by distance alone); ``complete`` (the first query, nothing labelled yet, ranks the pool by the
completeness of its predicted anatomy, `asfda.selection.diversity.anatomy_completeness`: every organ whole in the
field of view and of typical size first; once labels exist, ``density``). ``complete`` is the default: the only rule
whose first pick is never harmful and mostly above the pool's median on both real pairs (the single-label utility of
every volume measured; benchmarks/results/selection/README.md); METHOD.md's rule takes the harmful chaos_036 first in
3 of 7 folds of the CT -> MR pair, ``density`` the weak btcv_014 in 4 of 6 folds of the MR -> CT pair.
``coverage`` takes ``complete``'s first query, and once labels exist covers the diversity space (k-center greedy:
each pick the volume farthest from the labelled volumes and the picks so far; the rank score only orders ties; with
``diversity: none`` there is no space to cover and it is the top of the rank score; with ``diversity: batch`` the
labelled volumes are still what it covers against): the coreset baseline's rule from
the second label on, measured against ``complete`` in the selection README. ``trimmed`` is ``complete`` with the
least typical ``OUTLIER_FRACTION0`` of the pool in its predicted organ composition (not the diversity space) no
candidates at every query once labels exist (a share that does not shrink as labels come, unlike ``typical``'s): meant
for ``diversity: batch``, the top of the rank score kept off the outliers; cross-validated against ``complete`` in the
selection README, not the default."""


def closest_option(value: object, options: Sequence[str]) -> str | None:
    """The option a mistyped string ``value`` most likely meant: the one "did you mean" of asfda (option values,
    config keys, project settings, strategy names). MONAI's `look_up_option` rule: the smallest Damerau-Levenshtein
    distance to the value (surrounding spaces stripped), if at most 3, and (so that a short option is not offered
    for any short word) at most half the option's length; None otherwise.

    A tie goes to the option sharing the longest beginning with the value (``asfd``: ``asfda`` before ``asd``),
    then to the option listed first, so the message is the same every run (`look_up_option` breaks a tie by the
    iteration order of a set of strings, which changes from one Python process to the next)."""
    from monai.utils import damerau_levenshtein_distance

    if not isinstance(value, str) or not options:  # a number or None is no misspelling
        return None
    text = value.strip()
    ranked = []
    for k, option in enumerate(options):
        distance = damerau_levenshtein_distance(f"{option}", text)
        if distance <= min(3, max(1, len(option) // 2)):
            ranked.append((distance, -len(os.path.commonprefix([option, text])), k))
    return options[min(ranked)[2]] if ranked else None


def option_problem(value: object, options: Sequence[str], name: str, listed: str | None = None) -> str | None:
    """None when ``value`` is exactly one of ``options`` (no case folding, no stripping); otherwise "``name`` must be
    one of ``listed``, got ``value``", and " (did you mean 'x'?)" when `closest_option` finds one (``listed``: how
    the options are shown, default ``list(options)``'s repr)."""
    if isinstance(value, str) and value in options:
        return None
    problem = f"{name} must be one of {list(options) if listed is None else listed}, got {value!r}"
    guess = closest_option(value, options)
    return problem if guess is None else f"{problem} (did you mean {guess!r}?)"


def did_you_mean(value: object, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` when `closest_option` finds one, else ``""``: the hint of a message asfda writes."""
    guess = closest_option(value, options)
    return "" if guess is None else f" (did you mean {guess!r}?)"


def check_option(value: object, options: Sequence[str], name: str, *, listed: str | None = None,
                 path: str | Path | None = None, fix: str | None = None,
                 error: type[Exception] = AsfdaError) -> str:
    """Returns ``value`` when it is exactly one of ``options``; otherwise raises ``error`` with `option_problem`'s
    message.

    Args:
        listed: how the options are shown (default: ``list(options)``'s repr).
        path, fix: the `AsfdaError`'s file and fix (ignored for other error types).
        error: `AsfdaError` (or a subclass), or an exception type taking one message (``ValueError``).
    """
    problem = option_problem(value, options, name, listed)
    if problem is None:
        assert isinstance(value, str)
        return value
    if issubclass(error, AsfdaError):
        raise error(problem, path, fix)
    raise error(problem)


IMAGE_MODES = ("copy", "link")
"""How a project's round folder holds the queried images (``asfda next --images``): ``copy`` (the default: the folder
can be sent as it is) or ``link`` (links relative to the round folder; a copy where links are impossible)."""
