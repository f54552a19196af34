"""Deterministic two-domain 3D abdominal phantom benchmark.

Generates a *source* domain (CT-like, RAS, isotropic 5 mm) and a heterogeneous
*target* domain (MR-like, LPS, anisotropic 4 x 4 x 8 mm, different contrast,
bias field, blur, Rician noise) as two nnU-Net v2 raw datasets.

Coordinate conventions (NIfTI / nibabel world space is RAS+): the x axis
increases towards the patient's *Right*, y towards *Anterior* and z towards
*Superior* (the DICOM/LPS convention is the one where +x points Left).  Hence
the liver (patient's right) has **larger** world x than the spleen (patient's
left), the right kidney has larger x than the left one and sits slightly lower
(smaller z), and posterior structures (kidneys, spine) have smaller y.

All anatomy is defined in physical millimetres, so after reorienting any case
to RAS (e.g. ``nibabel.as_closest_canonical``) both domains place the organs
in the same physical location.

Every case is fully determined by an integer seed stored in
``phantom_meta.json``: ``make_case(np.random.default_rng(seed), domain,
subgroup)`` reproduces the saved arrays exactly.

The package: `asfda.phantom.spec` (labels, subgroups, domains, grids, tissues), `asfda.phantom.anatomy` (organs and
their rendering), `asfda.phantom.generators` (image formation, `make_case`, seeds, subgroups) and
`asfda.phantom.writer` (the datasets and the benchmark folder, `generate_benchmark`).
"""

from __future__ import annotations

from asfda.phantom.generators import assign_subgroups, case_seed, make_case
from asfda.phantom.spec import (
                                DOMAINS,
                                GENERATOR_VERSION,
                                LABELS,
                                MISLEADING,
                                SUBGROUPS_ALL,
                                SUBGROUPS_TARGET,
                                PhantomError,
)
from asfda.phantom.writer import META_FILENAME as META_FILENAME  # public before the split too
from asfda.phantom.writer import generate_benchmark

__all__ = [
    "GENERATOR_VERSION",
    "LABELS",
    "PhantomError",
    "SUBGROUPS_TARGET",
    "SUBGROUPS_ALL",
    "MISLEADING",
    "DOMAINS",
    "assign_subgroups",
    "case_seed",
    "generate_benchmark",
    "make_case",
]
