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


def needed_impostor_pairs(metric):
    """The impostor pairs a ``TAR@FAR=f`` figure needs to be measured (1/f: one impostor above its threshold);
    None for other metrics."""
    if not metric.startswith("TAR@FAR="):
        return None
    return int(round(1 / float(metric.split("=")[1])))


def measurable(metric, impostor_pairs):
    """Whether ``metric`` can be measured on ``impostor_pairs`` pairs (unknown counts: yes). Below 1/f pairs the
    threshold of TAR@FAR=f is the highest impostor score whatever f, so every such figure is the same number."""
    needed = needed_impostor_pairs(metric)
    return needed is None or impostor_pairs is None or impostor_pairs >= needed


def not_measurable_note(metrics, impostor_pairs):
    """The report's line for the figures of ``metrics`` that ``impostor_pairs`` cannot carry ("" when all can)."""
    missing = [m for m in metrics if not measurable(m, impostor_pairs)]
    if not missing:
        return ""
    return ("not measurable with this data: " + ", ".join(f"{m} needs at least {needed_impostor_pairs(m):,} impostor "
                                                          "pairs" for m in missing)
            + f"; this evaluation has {impostor_pairs:,} (more identities give more pairs)")


def answer(verdicts):
    """The plain answer of one model from its verdicts (``compatible``, ``not compatible``, ``undecided``, ``n/m``):
    ``no`` when any is not compatible, ``yes`` when all are compatible, else ``undecided``."""
    if any(v.startswith("not compatible") for v in verdicts):
        return "no"
    return "yes" if verdicts and all(v.startswith("compatible") for v in verdicts) else "undecided"


def recommendation(trained, transforms):
    """The recommended path, in words. ``trained``: ``[(name, answer, self-test change or None)]`` of new models
    trained for compatibility; ``transforms``: ``[(name, answer)]`` of gallery transforms."""
    ready = [(name, cost) for name, said, cost in trained if said == "yes"]
    if ready:
        name, cost = max(ready, key=lambda item: -1 if item[1] is None else item[1])
        change = "" if cost is None else f" (self-test {cost:+.3f} against a freely trained model)"
        return f"deploy {name}: its queries search the old gallery as it is{change}; re-enrol at leisure"
    mapped = [name for name, said in transforms if said == "yes"]
    if mapped:
        return f"map the stored gallery with {mapped[0]} and search it with the new model's queries"
    return ("no candidate is shown to serve the old gallery: re-enrol (backfill) the gallery with the new model "
            "before its queries use it, or gather more test identities if the answers are undecided")


def decision_record(question, rows, path):
    """The decision as the JSON reports carry it: the question, one answer per candidate ``(name, answer,
    detail)`` and the recommended path."""
    return {"question": question, "answers": [{"candidate": name, "answer": said, "detail": detail}
                                              for name, said, detail in rows], "recommended_path": path}


def decision_lines(record):
    """Markdown of a :func:`decision_record` (no lines for none)."""
    if record is None:
        return []
    return ([f"**{record['question']}**", ""]
            + [f"- {a['candidate']}: **{a['answer']}** ({a['detail']})" for a in record["answers"]]
            + ["", f"Recommended path: {record['recommended_path']}.", ""])
