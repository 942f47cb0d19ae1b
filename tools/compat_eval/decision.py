"""Compatibility decisions: the margin of a cross-test over the earlier model's self-test, the 95 %
interval of the paired differences, and the rules that turn them into a verdict.

One implementation for compat_eval's matrix verdicts (:mod:`~tools.compat_eval.protocol`,
:mod:`~tools.compat_eval.report`) and the demo's table (:mod:`tools.demo.report`). The margin is
cross − self of one figure; both figures are computed on the same subject resamples, so the
interval is the percentile interval of the per-resample differences (paired). Two rules:
:func:`reaches` (compat_eval's verdict: the point margin, with :func:`side_of_zero` saying whether
the interval excludes 0) and :func:`interval_verdict` (the demo's: the interval's side of 0).
"""
from tools.ijbc_eval import bootstrap


def paired_interval(cross_replicates, self_replicates):
    """95 % percentile interval ``(low, high)`` of cross − self over the resamples (NaN ones left out)."""
    low, high = bootstrap.percentile_intervals(bootstrap.difference(cross_replicates, self_replicates))
    return low, high


def side_of_zero(low, high):
    """``"above"`` or ``"below"`` when the interval lies above or below 0, ``"contains"`` when it
    contains 0; None without an interval (NaN bounds)."""
    if low != low or high != high:
        return None
    return "above" if low > 0 else "below" if high < 0 else "contains"


def reaches(cross, own):
    """compat_eval's verdict: a later generation is compatible when its cross-test reaches the earlier self-test."""
    return bool(cross >= own)


def interval_verdict(margin, low, high):
    """The demo's verdict: ``compatible`` (interval above 0), ``not compatible`` (below), ``undecided``
    (contains 0); without an interval, from the sign of the margin alone."""
    side = side_of_zero(low, high)
    if side is None:
        return "compatible (no interval)" if margin > 0 else "not compatible (no interval)"
    return {"above": "compatible", "below": "not compatible", "contains": "undecided"}[side]


def signed_interval(low, high, digits):
    """``[+0.012, +0.090]``: an interval of margins with signs, ``digits`` decimals."""
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"
