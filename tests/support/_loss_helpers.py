"""Random loss inputs of every shape the losses meet (batch, classes, masks), by seed."""

from __future__ import annotations

import torch


def loss_case(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    b, c, shape = 1 + seed % 3, 2 + seed % 5, (6 + seed % 5, 7, 5 + seed % 3)
    logits = torch.randn(b, c, *shape, generator=g, dtype=dtype) * (0.5 + seed % 4)
    target = torch.randint(0, c, (b, *shape), generator=g)
    kept = (0.0, 0.1, 0.5, 0.9, 1.0, None)[seed % 6]  # fraction of voxels kept by the mask (None: no mask)
    mask = None if kept is None else torch.rand(b, *shape, generator=g) < kept
    return logits, target, mask
