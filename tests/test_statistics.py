"""The report's statistics: t-intervals, paired differences and the verdict rule, against hand-computed values."""

import math

import pytest

from sasoftmax.analysis.statistics import describe, interval_text, paired, verdict

T_975_DF2 = 4.302652729911275  # Student's t quantile 0.975 at 2 degrees of freedom (tables)


def test_describe_gives_the_student_t_interval():
    stats = describe([1.0, 2.0, 3.0])
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(2.0) and stats["sd"] == pytest.approx(1.0)
    half = T_975_DF2 * 1.0 / math.sqrt(3)
    assert (stats["low"], stats["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    one = describe([5.0, None, float("nan")])  # missing and non-finite values are dropped
    assert one["n"] == 1 and one["mean"] == 5.0 and one["low"] is None and one["high"] is None
    assert describe([])["mean"] is None


def test_paired_differences_use_the_seeds_both_sides_have():
    ours = {0: 10.0, 1: 11.0, 2: 12.5, 3: 99.0}
    base = {0: 9.0, 1: 10.0, 2: 11.0}
    diff = paired(ours, base)
    assert diff["seeds"] == [0, 1, 2]
    assert diff["mean"] == pytest.approx((1.0 + 1.0 + 1.5) / 3)
    assert diff["relative"] == pytest.approx(diff["mean"] / 10.0)
    # Pairing removes the seed-to-seed spread both share: unpaired intervals would overlap.
    assert diff["low"] > 0
    assert describe(list(base.values()))["high"] > describe([10.0, 11.0, 12.5])["low"]


@pytest.mark.parametrize(
    "values,claimed,expected",
    [
        ([-1.0, -1.2, -0.9], "lower", "reproduced"),
        ([-1.0, -1.2, -0.9], "higher", "contradicted"),
        ([1.0, 1.2, 0.9], "higher", "reproduced"),
        ([1.0, 1.2, 0.9], "lower", "contradicted"),
        ([-1.0, 0.5, 0.2], "lower", "inconclusive"),
        ([-1.0], "lower", "inconclusive"),  # one seed: no interval
    ],
)
def test_verdict_rule(values, claimed, expected):
    diff = paired(dict(enumerate(values)), dict.fromkeys(range(len(values)), 0.0))
    assert verdict(diff, claimed) == expected


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError, match="claimed"):
        verdict({"low": 0.0, "high": 1.0}, "better")


def test_interval_text():
    assert interval_text(describe([1.0, 2.0, 3.0]), "{:.2f}") == "2.00 [-0.48, 4.48]"
    assert interval_text(describe([0.5, 1.0, 1.5]), "{:.1f}", signed=True) == "+1.0 [-0.2, +2.2]"
    assert interval_text(describe([]), "{:.1f}") == "–"
