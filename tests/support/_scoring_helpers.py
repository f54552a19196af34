"""Hand-computed entropies and small probability volumes shared by the scoring tests (natural logs; ln 2 = 0.693147,
ln 3 = 1.098612)."""

from __future__ import annotations

import torch

# Normalised entropies used below (H / ln C):
# H(0.25, 0.75)/ln2     = (0.25*1.386294 + 0.75*0.287682) / 0.693147 = 0.562335 / 0.693147 = 0.811278
# H(0.1, 0.8, 0.1)/ln3  = (2*0.1*2.302585 + 0.8*0.223144) / 1.098612 = 0.639032 / 1.098612 = 0.581672
# H(0.2, 0.2, 0.6)/ln3  = (2*0.2*1.609438 + 0.6*0.510826) / 1.098612 = 0.950271 / 1.098612 = 0.864974
# H(0.9, 0.05, 0.05)/ln3 = (0.9*0.105361 + 2*0.05*2.995732) / 1.098612 = 0.394398 / 1.098612 = 0.358996
H_QUARTER = 0.811278
H_181 = 0.581672
H_226 = 0.864974
H_9_05 = 0.358996


def _prob(voxels: list[tuple[float, ...]]) -> torch.Tensor:
    """A ``[C, N, 1, 1]`` probability volume from a list of per-voxel class distributions."""
    return torch.tensor(voxels, dtype=torch.float64).T.reshape(len(voxels[0]), len(voxels), 1, 1)


def _volume(shape: tuple[int, int, int], background: tuple[float, ...]) -> torch.Tensor:
    """A ``[C, X, Y, Z]`` volume filled with one class distribution."""
    return torch.tensor(background, dtype=torch.float64)[:, None, None, None].expand(-1, *shape).clone()


def _set(prob: torch.Tensor, sl: tuple[slice, slice, slice], dist: tuple[float, ...]) -> None:
    prob[(slice(None), *sl)] = torch.tensor(dist, dtype=torch.float64)[:, None, None, None]

