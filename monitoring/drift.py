"""Drift tests between a reference sample (training data) and a window of production inputs.

Each test answers "could these two samples come from the same distribution?":

* input drift, per feature: Kolmogorov-Smirnov on pixel statistics, plus PSI as an effect size;
* input drift, jointly: maximum mean discrepancy (RBF kernel) on embeddings, with a
  permutation test for its p-value;
* prediction drift: chi-square on the predicted-class counts;
* a confidence drop: the window's mean top-1 probability below the reference's.

All p-value tests share one false-alarm budget (Bonferroni: half to MMD, half to the rest),
so a window of in-distribution inputs raises an alarm with probability at most ``alpha``
however many features are tested.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from monitoring.features import PIXEL_FEATURES, pixel_features

if TYPE_CHECKING:
    from imageclf.config import MonitoringParams

__all__ = ["PIXEL_FEATURES", "Thresholds", "Verdict", "detect", "pixel_features", "psi"]


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (0.1 small, 0.25 large)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        return 0.0
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def mmd_test(
    reference: np.ndarray,
    current: np.ndarray,
    permutations: int = 200,
    max_samples: int = 400,
    seed: int = 0,
) -> tuple[float, float]:
    """Squared MMD with an RBF kernel (median-distance bandwidth) and its permutation p-value."""
    rng = np.random.default_rng(seed)
    if len(reference) > max_samples:
        reference = reference[rng.choice(len(reference), max_samples, replace=False)]
    if len(current) > max_samples:
        current = current[rng.choice(len(current), max_samples, replace=False)]
    pooled = np.concatenate([reference, current]).astype(np.float64)
    sq = np.sum(pooled**2, 1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0)
    bandwidth = np.median(dist[dist > 0]) if np.any(dist > 0) else 1.0
    kernel = np.exp(-dist / bandwidth)
    n = len(reference)

    def statistic(order: np.ndarray) -> float:
        k = kernel[np.ix_(order, order)]
        xx, yy, xy = k[:n, :n], k[n:, n:], k[:n, n:]
        return float(xx.mean() + yy.mean() - 2 * xy.mean())

    observed = statistic(np.arange(len(pooled)))
    null = [statistic(rng.permutation(len(pooled))) for _ in range(permutations)]
    p_value = (1 + sum(v >= observed for v in null)) / (1 + permutations)
    return observed, float(p_value)


def class_shift(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Chi-square test of the window's predicted-class counts against the reference shares."""
    expected_share = (reference_counts + 0.5) / (reference_counts + 0.5).sum()
    expected = expected_share * current_counts.sum()
    statistic, p_value = stats.chisquare(current_counts, expected)
    return float(statistic), float(p_value)


@dataclass
class Thresholds:
    """From params.yaml ``monitoring``: the false-alarm budget and the effect sizes that matter.

    No defaults: the values come from params.yaml only (:meth:`from_params`)."""

    alpha: float
    max_confidence_drop: float
    min_window: int

    @classmethod
    def from_params(cls, params: MonitoringParams) -> Thresholds:
        return cls(params.alpha, params.max_confidence_drop, params.min_window)


@dataclass
class Verdict:
    drift: bool
    window_size: int
    reasons: list[str]
    tests: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect(
    reference: dict[str, np.ndarray],
    window: dict[str, np.ndarray],
    thresholds: Thresholds,
    seed: int = 0,
) -> Verdict:
    """Compare a window with the reference; both hold ``pixels`` (N, 7), ``embeddings`` (N, D),
    ``predicted`` (N,) class indices and ``confidence`` (N,) top-1 probabilities."""
    n = len(window["predicted"])
    if n < thresholds.min_window:
        return Verdict(
            False,
            n,
            [
                f"window of {n} predictions is below monitoring.min_window "
                f"({thresholds.min_window}): no verdict yet"
            ],
        )
    num_classes = int(max(reference["predicted"].max(), window["predicted"].max())) + 1
    # Half the false-alarm budget for the joint embedding test (its permutation p-value needs
    # about 1/alpha permutations), half shared by the KS tests and the chi-square.
    alpha_mmd = thresholds.alpha / 2
    alpha = thresholds.alpha / 2 / (len(PIXEL_FEATURES) + 1)
    tests: dict[str, Any] = {"alpha_per_test": alpha, "alpha_mmd": alpha_mmd}
    reasons = []
    for i, name in enumerate(PIXEL_FEATURES):
        ks = stats.ks_2samp(reference["pixels"][:, i], window["pixels"][:, i])
        entry = {
            "ks_statistic": float(ks.statistic),
            "p_value": float(ks.pvalue),
            "psi": psi(reference["pixels"][:, i], window["pixels"][:, i]),
            "drift": bool(ks.pvalue < alpha),
        }
        tests[f"pixel.{name}"] = entry
        if entry["drift"]:
            reasons.append(f"pixel {name} shifted (KS p={ks.pvalue:.2g}, PSI={entry['psi']:.2f})")
    permutations = int(np.ceil(1.5 / alpha_mmd))
    mmd, mmd_p = mmd_test(
        reference["embeddings"], window["embeddings"], permutations, max_samples=300, seed=seed
    )
    tests["embedding.mmd"] = {"mmd2": mmd, "p_value": mmd_p, "drift": bool(mmd_p < alpha_mmd)}
    if mmd_p < alpha_mmd:
        reasons.append(f"embeddings shifted (MMD² {mmd:.3g}, p={mmd_p:.2g})")
    ref_counts = np.bincount(reference["predicted"], minlength=num_classes)
    cur_counts = np.bincount(window["predicted"], minlength=num_classes)
    chi2, chi_p = class_shift(ref_counts, cur_counts)
    tests["predictions.class_shift"] = {
        "chi2": chi2,
        "p_value": chi_p,
        "drift": bool(chi_p < alpha),
        "reference_share": (ref_counts / ref_counts.sum()).round(4).tolist(),
        "window_share": (cur_counts / cur_counts.sum()).round(4).tolist(),
    }
    if chi_p < alpha:
        reasons.append(f"predicted-class mix shifted (chi-square p={chi_p:.2g})")
    drop = float(reference["confidence"].mean() - window["confidence"].mean())
    tests["confidence"] = {
        "reference_mean": float(reference["confidence"].mean()),
        "window_mean": float(window["confidence"].mean()),
        "drop": drop,
        "drift": bool(drop > thresholds.max_confidence_drop),
    }
    if drop > thresholds.max_confidence_drop:
        reasons.append(f"mean confidence fell by {drop:.3f}")
    return Verdict(bool(reasons), n, reasons, tests)
