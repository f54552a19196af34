"""Temperature scaling (asfda.scoring.temperature): `fit_temperature` (SciPy's bounded Brent search on log T) recovers
a known temperature and is the brute-force grid minimum of the same NLL; the expected calibration error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asfda.scoring import expected_calibration_error, fit_temperature

T_MIN, T_MAX = 0.05, 20.0


def _data(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits of random scale and classes, labels drawn from softmax(logits / T) for a random T."""
    g = torch.Generator().manual_seed(seed)
    n, c = (500, 3000, 8000)[seed % 3], (2, 3, 5, 8)[seed % 4]
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * (0.5 + 4 * float(torch.rand(1, generator=g)))
    t_true = float(torch.empty(1, dtype=torch.float64).uniform_(0.3, 5.0, generator=g))
    y = torch.multinomial(torch.softmax(z / t_true, 1), 1, generator=g)[:, 0]
    return z.to(dtype), y


def _nll(z: torch.Tensor, y: torch.Tensor, log_t: np.ndarray) -> np.ndarray:
    """The NLL of softmax(z / T) at every log T of ``log_t``, in ``z``'s dtype (one ``F.cross_entropy`` each)."""
    return np.array([float(F.cross_entropy(z / math.exp(float(lt)), y)) for lt in log_t])


def _grid_minimum(z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Brute force: the best of 801 log-spaced T over the bounds, then the best of 801 within one step of it
    (final step 2e-5 in log T). Returns (T, NLL there)."""
    log_t = np.linspace(math.log(T_MIN), math.log(T_MAX), 801)
    f = _nll(z, y, log_t)
    k = int(np.argmin(f))
    step = log_t[1] - log_t[0]
    fine = np.linspace(max(log_t[0], log_t[k] - step), min(log_t[-1], log_t[k] + step), 801)
    ff = _nll(z, y, fine)
    j = int(np.argmin(ff))
    return math.exp(fine[j]), float(ff[j])


@pytest.mark.parametrize("seed", range(6))
def test_fit_is_the_grid_minimum_in_float64(seed: int) -> None:
    # float64 logits: the NLL is smooth at this scale, and the fit is the grid's minimum to well within 1e-3 of T
    z, y = _data(seed, torch.float64)
    t = fit_temperature(z, y)
    t_grid, f_grid = _grid_minimum(z, y)
    assert t == pytest.approx(t_grid, rel=1e-4)
    assert float(F.cross_entropy(z / t, y)) <= f_grid + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_fit_lands_on_the_float32_minimum_plateau(seed: int) -> None:
    # float32 logits (as the adapter passes them): the NLL is flat to rounding over a few 1e-3 of T around its
    # minimum, so the fit is compared by the NLL it reaches (within 2 float32 steps of the brute-force minimum),
    # and by T to within that plateau of the float64 optimum
    z32, y = _data(seed, torch.float32)
    t = fit_temperature(z32, y)
    _, f_grid = _grid_minimum(z32, y)
    assert float(F.cross_entropy(z32 / t, y)) <= f_grid + 2 * np.spacing(np.float32(f_grid))
    t64 = fit_temperature(z32.double(), y)
    assert t == pytest.approx(t64, rel=5e-3)


def test_fit_stops_at_either_bound() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2000, 3, generator=g)
    # labels always the argmax: the NLL keeps falling as T -> 0
    assert fit_temperature(z, z.argmax(1), t_min=0.1, t_max=10.0) == pytest.approx(0.1, rel=1e-5)
    # labels independent of confident logits: the NLL keeps falling as T grows
    y = torch.randint(0, 3, (2000,), generator=g)
    assert fit_temperature(z * 10, y, t_min=0.1, t_max=10.0) == pytest.approx(10.0, rel=1e-5)


def test_nothing_to_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="no voxels"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    z = torch.randn(10, 3)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature(z, torch.zeros(10, dtype=torch.long))


# ---------------------------------------------------------------------------------- a known T, calibration error
def _synthetic(t_true: float, n: int = 50_000, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits z ~ 3*N(0, 1) and labels drawn from softmax(z / t_true)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.multinomial(torch.softmax(z / t_true, 1), 1, generator=g)[:, 0]
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_known_temperature(t_true: float) -> None:
    z, y = _synthetic(t_true)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.10)


def test_ece_hand_value() -> None:
    # two samples at confidence 0.9 (one right, one wrong): |0.9 - 0.5| * 2/4 = 0.2
    # two samples at confidence 0.6 (both right):            |0.6 - 1.0| * 2/4 = 0.2  -> ECE 0.4
    prob = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(prob, labels) == pytest.approx(0.4, abs=1e-9)


def test_ece_calibrated_near_zero_and_overconfident_larger() -> None:
    z, y = _synthetic(1.0)  # labels drawn from softmax(z): perfectly calibrated by construction
    calibrated = expected_calibration_error(torch.softmax(z, 1), y)
    overconfident = expected_calibration_error(torch.softmax(z * 3.0, 1), y)
    assert calibrated < 0.02
    assert overconfident > 0.1
    # and temperature scaling repairs the over-confident logits
    t = fit_temperature(z * 3.0, y)
    assert t == pytest.approx(3.0, rel=0.10)
    assert expected_calibration_error(torch.softmax(z * 3.0 / t, 1), y) < 0.02
