"""What a query strategy needs from the scoring stage: metric names and the extra passes behind them.

Each strategy class declares one `ScoringNeeds`; the scoring stage (`asfda.scoring.pool.score_volumes`)
computes the union of what the requested strategies declare and nothing more. The base metrics
(``asd``, ``enpy``, ``confidence``, and ``kd`` when the frozen model is given) come from the one
forward pass every volume gets anyway, so they are always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "BASE_METRICS",
    "DEFAULT_MC_PASSES",
    "DEFAULT_TTA_FLIPS",
    "MC_METRICS",
    "ScoringNeeds",
]

BASE_METRICS = frozenset({"asd", "enpy", "confidence", "kd"})
"""From the one forward pass per model (``kd`` only once the model has been adapted)."""

MC_METRICS = frozenset({"mc_entropy", "bald"})
TTA_METRICS = frozenset({"tta_variance"})
FEATURE_STAT_METRICS = frozenset({"bn_kl", "norm_kl"})
KNOWN_METRICS = BASE_METRICS | MC_METRICS | TTA_METRICS | FEATURE_STAT_METRICS
KNOWN_VECTORS = frozenset({"badge", "anatomy", "extent"})

DEFAULT_MC_PASSES = 5
"""MONAI Label's default number of stochastic (dropout) passes for epistemic scoring."""

DEFAULT_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,))
"""Identity plus a flip of model-grid axis 1 and one of axis 2, each alone (the same passes as the
engine's ``run(..., tta=True)``). Axis 0 (left-right after RAS reorientation) is never flipped: labels are
lateral (left / right kidney), so a left-right flip is not label-preserving."""


@dataclass(frozen=True)
class ScoringNeeds:
    """What one strategy (or a union of strategies) reads from the scoring stage.

    Attributes:
        metrics: per-volume numbers read from ``PoolScores.metrics`` (see `KNOWN_METRICS`).
        vectors: per-volume vectors read from ``PoolScores.vectors`` (``badge``: the head-gradient embedding;
            ``anatomy``: the predicted foreground composition, `asfda.scoring.metrics.anatomy_composition`,
            free from the main pass).
        mc_dropout: number of stochastic dropout passes (required >= 2 by ``mc_entropy`` / ``bald``).
        tta_flips: the flips, as tuples of model-grid axes in {1, 2}, of the test-time-augmentation passes;
            ``()`` is the identity (it reuses the main pass). Required (>= 2 flips) by ``tta_variance``.
        divergence: compute ``kd`` with the frozen pretrained model once the model has been adapted.
        feature_stats: compute the round-0 BatchNorm-statistics gap ``bn_kl`` when the model has BatchNorm
            layers with running statistics; silently absent otherwise.
        norm_stats: without such layers, compute ``norm_kl`` (the same gap at InstanceNorm / GroupNorm layers,
            against the pool's own statistics) at round 0: hooks on every normalisation layer of the pass,
            so only when a strategy reads it (asfda with ``round0_gap="norm_kl"``, ``asfda score``).
    """

    metrics: frozenset[str] = field(default_factory=frozenset)
    vectors: frozenset[str] = field(default_factory=frozenset)
    mc_dropout: int = 0
    tta_flips: tuple[tuple[int, ...], ...] = ()
    feature_stats: bool = False
    divergence: bool = False  # read kd (one more forward pass of the frozen pretrained model per volume)
    norm_stats: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", frozenset(self.metrics))
        object.__setattr__(self, "vectors", frozenset(self.vectors))
        flips = tuple(tuple(sorted(set(int(a) for a in f))) for f in self.tta_flips)
        object.__setattr__(self, "tta_flips", tuple(dict.fromkeys(flips)))
        unknown = sorted(self.metrics - KNOWN_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(KNOWN_METRICS)}")
        unknown = sorted(self.vectors - KNOWN_VECTORS)
        if unknown:
            raise ValueError(f"unknown vectors {unknown}; known: {sorted(KNOWN_VECTORS)}")
        if self.mc_dropout < 0:
            raise ValueError(f"mc_dropout must be >= 0, got {self.mc_dropout}")
        if self.metrics & MC_METRICS and self.mc_dropout < 2:
            raise ValueError(f"metrics {sorted(self.metrics & MC_METRICS)} need mc_dropout >= 2 stochastic passes")
        bad = [f for f in self.tta_flips if not set(f) <= {1, 2}]
        if bad:
            raise ValueError(f"TTA may flip only model-grid axes 1 and 2 (axis 0 is left-right), got {bad}")
        if self.metrics & TTA_METRICS and len(self.tta_flips) < 2:
            raise ValueError("tta_variance needs at least 2 TTA flips (the identity counts as one)")

    @property
    def head_gradient(self) -> bool:
        """Whether the BADGE head-gradient embedding is needed."""
        return "badge" in self.vectors

    def __or__(self, other: ScoringNeeds) -> ScoringNeeds:
        return ScoringNeeds(self.metrics | other.metrics, self.vectors | other.vectors,
                            max(self.mc_dropout, other.mc_dropout), self.tta_flips + other.tta_flips,
                            self.feature_stats or other.feature_stats, self.divergence or other.divergence,
                            self.norm_stats or other.norm_stats)

    @staticmethod
    def union(needs: list[ScoringNeeds] | tuple[ScoringNeeds, ...]) -> ScoringNeeds:
        out = ScoringNeeds()
        for n in needs:
            out = out | n
        return out

    def describe(self) -> dict:
        """A JSON-friendly summary (for run records and CLI output)."""
        return {"metrics": sorted(self.metrics), "vectors": sorted(self.vectors), "mc_dropout": self.mc_dropout,
                "tta_flips": [list(f) for f in self.tta_flips], "feature_stats": self.feature_stats,
                "divergence": self.divergence, "norm_stats": self.norm_stats}
