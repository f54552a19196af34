"""On-disk cache of the *small* per-volume outputs of an inference pass (embedding, per-volume scores).

One ``.npz`` file per key under a cache folder, written atomically, so that re-running a stage over
the same volumes with the same weights, preprocessing and TTA setting does not run the network again.
Full logits or probability maps are refused: an entry holds at most ``max_elements`` numbers per array.

    cache = EngineOutputCache(".cache/engine")
    key = cache.key(case.case_id, loaded.weights_hash, loaded.preprocessing.cache_key(), tta=False)
    hit = cache.get(key)
    if hit is None:
        logits, emb = engine.run(vol.image)
        hit = {"embedding": emb.numpy(), "asd": asd}
        cache.put(key, hit)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from asfda.io.atomic import atomic_write

__all__ = ["EngineOutputCache"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EngineOutputCache:
    """Per (case, weights hash, preprocessing key, TTA flag) store of small arrays.

    Args:
        cache_dir: folder of the entries (created on the first `put`).
        max_elements: largest array (number of values) an entry may hold; keeps logits out.
    """

    def __init__(self, cache_dir: str | Path, *, max_elements: int = 65_536) -> None:
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements!r}")
        self.cache_dir = Path(cache_dir)
        self.max_elements = int(max_elements)

    @staticmethod
    def key(case_id: str, weights_hash: str, preprocessing_key: str, tta: bool, extra: str = "") -> str:
        """A file-name-safe key: the readable case id plus a hash of everything that changes the outputs.

        Args:
            case_id: the case.
            weights_hash: e.g. `asfda.models.LoadedModel.weights_hash` (of the network that ran).
            preprocessing_key: e.g. `asfda.models.Preprocessing.cache_key`.
            tta: whether the outputs came from a TTA run.
            extra: anything else the caller's numbers depend on (temperature, image file stamp, ...).
        """
        digest = hashlib.sha256(json.dumps([case_id, weights_hash, preprocessing_key, bool(tta), extra]).encode())
        return f"{_SAFE.sub('_', case_id)[:80]}-{digest.hexdigest()[:20]}"

    def path(self, key: str) -> Path:
        if not key or _SAFE.search(key) or key.startswith("."):
            raise ValueError("cache key must be a non-empty file-name-safe string (see EngineOutputCache.key), "
                             f"got {key!r}")
        return self.cache_dir / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None when there is no entry (a damaged entry is deleted and counts as none)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, arrays: Mapping[str, object]) -> Path:
        """Stores ``{name: array or number}`` under ``key`` atomically (replacing any older entry)."""
        if not arrays:
            raise ValueError("arrays must hold at least one named value")
        out: dict[str, Any] = {}  # arrays; Any as np.savez's stub checks **kwds against its allow_pickle: bool
        for name, value in arrays.items():
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            if arr.dtype == object:
                raise TypeError(f"cache value {name!r} is not numeric (dtype object)")
            if arr.size > self.max_elements:
                raise ValueError(f"cache value {name!r} has {arr.size} values (shape {arr.shape}), more than "
                                 f"max_elements={self.max_elements}: the cache holds per-volume numbers and "
                                 "embeddings, never logits or voxel maps")
            out[str(name)] = arr
        path = self.path(key)

        def write(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, **out)

        return atomic_write(path, write)
