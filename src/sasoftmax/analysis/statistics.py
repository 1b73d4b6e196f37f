"""Seed statistics of a comparison: means with Student-t confidence intervals, paired differences, and the
verdict rule of the report.

Every variant of a comparison is trained with the same seeds as the softmax baseline, and runs of one seed
share initialisation seed and data order, so a variant is compared with softmax *seed by seed*: the paired
differences d_s = variant_s − softmax_s remove what the seed does to both. Their mean and 95% t-interval
(n − 1 degrees of freedom, :func:`scipy.stats.t.ppf`) say whether the difference is distinguishable from
seed noise. Needs scipy (the ``harness`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95

VERDICTS = ("reproduced", "contradicted", "inconclusive")

VERDICT_RULE = (
    "A verdict compares the variant with softmax seed by seed (same initialisation seed and data order): "
    "*reproduced* when the 95% t-interval of the paired differences lies entirely on the side the paper "
    "claims, *contradicted* when it lies entirely on the other side, *inconclusive* when it contains 0 "
    "(or there are fewer than 2 seeds). Intervals are per claim and encoding, without correction for "
    "the number of claims tested: about 1 in 20 of the comparisons where nothing differs can still come "
    "out reproduced or contradicted."
)


def _t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - scipy is in the harness extra
        raise ImportError("the report's confidence intervals need scipy: pip install 'sasoftmax[harness]'") from err
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def describe(values: Sequence[float | None], confidence: float = CONFIDENCE) -> dict:
    """``{"values", "n", "mean", "sd", "low", "high"}`` of the finite ``values`` (one per seed).

    ``low``/``high`` bound the ``confidence`` t-interval of the mean; None with fewer than 2 values (and
    everything but "values" and "n" None without any).
    """
    kept = _finite(values)
    n = len(kept)
    out = {"values": kept, "n": n, "mean": None, "sd": None, "low": None, "high": None}
    if not n:
        return out
    mean = sum(kept) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
        half = _t_quantile(n - 1, confidence) * sd / math.sqrt(n)
        out.update(sd=sd, low=mean - half, high=mean + half)
    return out


def paired(ours: dict[int, float | None], base: dict[int, float | None], confidence: float = CONFIDENCE) -> dict:
    """The paired differences ``ours[s] − base[s]`` over the seeds both have (finite values only):
    :func:`describe` of them plus ``"seeds"`` and ``"relative"`` (mean difference / mean of ``base``)."""
    seeds = sorted(s for s in ours if s in base and _finite([ours[s]]) and _finite([base[s]]))
    stats = describe([ours[s] - base[s] for s in seeds], confidence)
    base_mean = sum(base[s] for s in seeds) / len(seeds) if seeds else None
    stats["seeds"] = seeds
    stats["relative"] = stats["mean"] / base_mean if seeds and base_mean else None
    return stats


def verdict(difference: dict, claimed: str) -> str:
    """ "reproduced", "contradicted" or "inconclusive" for a paired ``difference`` (from :func:`paired`) when
    the claim is that the variant is ``claimed`` ("lower" or "higher") than the baseline."""
    if claimed not in ("lower", "higher"):
        raise ValueError(f"claimed must be 'lower' or 'higher'; got {claimed!r}")
    low, high = difference.get("low"), difference.get("high")
    if low is None or high is None:
        return "inconclusive"
    if claimed == "lower":
        low, high = -high, -low
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def interval_text(
    stats: dict, fmt: str, signed: bool = False, bounds: tuple[float, float] | None = None
) -> str:
    """ "mean [low, high]" (or just the mean with one value, "–" with none), each number with ``fmt``.

    ``bounds`` clips the interval for display (a t-interval of a fraction can reach past 0 or 1)."""
    if stats["mean"] is None:
        return "–"
    if bounds is not None and stats["low"] is not None:
        stats = {**stats, "low": max(bounds[0], stats["low"]), "high": min(bounds[1], stats["high"])}

    def f(x: float) -> str:
        text = fmt.format(x)
        return ("+" + text) if signed and x > 0 and not text.startswith(("+", "-")) else text

    if stats["low"] is None:
        return f(stats["mean"])
    return f"{f(stats['mean'])} [{f(stats['low'])}, {f(stats['high'])}]"
