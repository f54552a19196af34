"""Selection: strategies by name, and the diverse batch pickers they share."""

from __future__ import annotations

from asfda.selection.diversity import greedy_diverse_pick, k_center_greedy, kmeans_pp_pick, rank_normalise, typicality
from asfda.selection.strategies import (
    DEFAULT_DIVERSITY,
    DIVERSITY_SPACES,
    REPRESENTATIVENESS,
    ROUND0_GAPS,
    STRATEGIES,
    PoolScores,
    Query,
    ScoringNeeds,
    build_strategy,
    get_strategy,
    needs_of,
)

__all__ = ["DEFAULT_DIVERSITY", "DIVERSITY_SPACES", "REPRESENTATIVENESS", "ROUND0_GAPS", "STRATEGIES", "PoolScores",
           "Query", "ScoringNeeds", "build_strategy", "get_strategy",
           "greedy_diverse_pick",
           "k_center_greedy", "kmeans_pp_pick", "needs_of", "rank_normalise", "typicality"]
