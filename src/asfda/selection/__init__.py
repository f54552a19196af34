"""Selection: strategies by name, and the diverse batch pickers they share."""

from __future__ import annotations

from asfda.selection.diversity import greedy_diverse_pick, k_center_greedy, rank_normalise
from asfda.selection.strategies import STRATEGIES, PoolScores, Query, get_strategy

__all__ = ["STRATEGIES", "PoolScores", "Query", "get_strategy", "greedy_diverse_pick", "k_center_greedy", "rank_normalise"]
