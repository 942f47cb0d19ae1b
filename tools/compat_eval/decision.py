"""Compatibility decisions: the margin of a cross-test over the earlier model's self-test, the 95 %
interval of the paired differences, and the rules that turn them into a verdict.

One implementation for compat_eval's matrix verdicts (:mod:`~tools.compat_eval.protocol`,
:mod:`~tools.compat_eval.report`) and the demo's table (:mod:`tools.demo.report`), and of the decision
both reports open with (:func:`candidate`, :func:`decision_record`, :func:`decision_lines`): per
candidate upgrade its verdicts on a 1:1 TAR@FAR and 1:N top-1, the self-test it gives up against an
independent model, the backfill fraction from which a background re-extraction never falls below
the old system (:func:`backfill_safety`), its cost, and the recommended path. The margin is
cross − self of one figure; both figures are computed on the same subject resamples, so the
interval is the percentile interval of the per-resample differences (paired). Two rules:
:func:`reaches` (compat_eval's verdict: the point margin, with :func:`side_of_zero` saying whether
the interval excludes 0) and :func:`interval_verdict` (the demo's: the interval's side of 0).
"""
import numpy as np

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


# --------------------------------------------------------------------------------------- the decision
ONE_TO_N = "top1"
RULE = ("yes when every figure's paired 95 % interval lies above 0 (compatible), no when one lies below 0 "
        "(not compatible), undecided otherwise (n/m: not measurable with this data)")
UNDEPLOYABLE_ORDERS = ("oracle",)   # backfill orders that need the answers: bounds, not a path to recommend


def verdict_metrics(one_to_one):
    """The figures a candidate is judged on: the 1:1 ``one_to_one`` (a TAR@FAR) and 1:N top-1."""
    return tuple(dict.fromkeys((one_to_one, ONE_TO_N)))


def figure(metric, margin, low, high, impostor_pairs=None):
    """One judged figure: ``{"metric", "margin", "interval": [low, high] or None, "verdict"}`` (the verdict by
    :func:`interval_verdict`, ``n/m`` when ``impostor_pairs`` cannot carry the metric)."""
    known = low == low and high == high
    return {"metric": metric, "margin": float(margin), "interval": [float(low), float(high)] if known else None,
            "verdict": interval_verdict(margin, low, high) if measurable(metric, impostor_pairs) else "n/m"}


def answer(verdicts):
    """The plain answer of one model from its verdicts (``compatible``, ``not compatible``, ``undecided``, ``n/m``):
    ``no`` when any is not compatible, ``yes`` when all are compatible, else ``undecided``."""
    if any(v.startswith("not compatible") for v in verdicts):
        return "no"
    return "yes" if verdicts and all(v.startswith("compatible") for v in verdicts) else "undecided"


def safe_from(curves, levels):
    """Index of the first point from which every curve stays at or above its level (NaN counts as below);
    None when the last point is below."""
    below = np.zeros(len(curves[0]), bool)
    for curve, level in zip(curves, levels):
        below |= ~(np.asarray(curve, np.float64) >= level)
    hits = np.flatnonzero(below)
    start = int(hits[-1]) + 1 if len(hits) else 0
    return None if start == len(below) else start


def backfill_safety(entries, query, gallery, metrics):
    """From which fraction a background backfill of ``gallery``'s gallery by ``query`` never falls below the
    old system (the point values of ``metrics`` against the old self-test), per curve of compat_eval's
    ``"backfill"`` entries, and the negative flips at that fraction (1:N top-1 over the mated probes, 1:1 over
    the genuine pairs). The earliest curve's figures (orders of :data:`UNDEPLOYABLE_ORDERS` left out) and
    ``"curves"``: every curve's; None without a curve."""
    curves = []
    for e in entries or ():
        if e["query"] != query or e["gallery"] != gallery:
            continue
        k = safe_from([e["metrics"][m] for m in metrics], [e["old_self"][m] for m in metrics])
        curves.append({"order": e["order"], "merge": e["merge"],
                       "from_fraction": None if k is None else float(e["fractions"][k]),
                       "negative_flips": None if k is None else float(e["negative_flips"][k]),
                       "negative_flips_genuine": None if k is None else float(e["negative_flips_genuine"][k]),
                       "flip_far": e["flip_far"]})
    usable = [c for c in curves if c["order"] not in UNDEPLOYABLE_ORDERS]
    if not usable:
        return None
    earliest = min(usable, key=lambda c: 2.0 if c["from_fraction"] is None else c["from_fraction"])
    return {"metrics": list(metrics), **earliest, "curves": curves}


def candidate(name, model, transform, figures, self_test=None, backfill=None, transform_seconds=None,
              reextraction_seconds=None):
    """One answer of the decision: can candidate ``name`` serve queries against the old gallery without re-enrolment?

    ``model``: the new model whose queries search the old gallery, as it is (``transform`` None: kind
    ``"model"``) or mapped by the gallery transform named ``transform`` (kind ``"transform"``);
    ``figures``: its :func:`figure`\\ s; ``self_test``: ``(change, metric, reference)``, its self-test minus
    the independent model's, or None; ``backfill``: :func:`backfill_safety`; the cost: seconds to transform
    a million features, to re-extract a million images with the new model (None: not measured)."""
    change, metric, reference = self_test if self_test is not None else (None, None, None)
    record = {"candidate": name, "kind": "model" if transform is None else "transform", "model": model,
              "transform": transform, "answer": answer([f["verdict"] for f in figures]), "figures": figures,
              "self_test_change": None if change is None else float(change), "self_test_metric": metric,
              "self_test_reference": reference, "backfill": backfill,
              "cost": {"transform_seconds_per_million_features": transform_seconds,
                       "reextraction_seconds_per_million_images": reextraction_seconds}}
    record["detail"] = _detail(record)
    return record


def percent(fraction):
    """``40 %``."""
    return f"{100 * fraction:.0f} %"


def seconds(value):
    """Seconds to 3 significant digits (``0.213``, ``1.2e+03``)."""
    return f"{value:.3g} s"


def _figure_text(f):
    if f["verdict"] == "n/m":
        return f"{f['metric']} n/m"
    interval = "" if f["interval"] is None else " " + signed_interval(*f["interval"], 3)
    return f"{f['metric']} {f['margin']:+.3f}{interval} {f['verdict']}"


def backfill_text(backfill):
    """The backfill answer in words (None: no curve)."""
    if backfill is None:
        return None
    where = f"{backfill['order']} order, {backfill['merge']} merge"
    if backfill["from_fraction"] is None:
        return f"a background backfill ends below the old system ({where})"
    return (f"a background backfill never falls below the old system from {percent(backfill['from_fraction'])} "
            f"re-extracted ({where}; negative flips there: 1:N top-1 {backfill['negative_flips']:.3f}, "
            f"1:1 genuine at FAR={backfill['flip_far']:g} {backfill['negative_flips_genuine']:.3f})")


def _detail(record):
    parts = [", ".join(_figure_text(f) for f in record["figures"])]
    if record["self_test_change"] is not None:
        parts.append(f"self-test {record['self_test_change']:+.3f} ({record['self_test_metric']}) against "
                     f"{record['self_test_reference']}")
    elif record["self_test_metric"] is not None:
        parts.append(f"self-test change against {record['self_test_reference']}: n/m")
    if record["kind"] == "model":
        parts.append(backfill_text(record["backfill"]) or "backfill not measured")
    elif record["backfill"]:
        parts.append("FastFill (the mapped gallery re-extracted bit by bit): " + backfill_text(record["backfill"]))
    cost = record["cost"]
    reextraction = cost["reextraction_seconds_per_million_images"]
    again = "re-extraction not measured" if reextraction is None else \
        f"re-extraction {seconds(reextraction)} per million images"
    if record["kind"] == "transform":
        mapped = cost["transform_seconds_per_million_features"]
        parts.append("cost: transform " + ("not measured" if mapped is None else
                                           f"{seconds(mapped)} per million features") + f" against {again}")
    else:
        parts.append(f"cost: {again}")
    return "; ".join(parts)


def recommendation(answers):
    """``(path, why)``: the recommended path and one sentence of why, from the :func:`candidate` answers.

    Of the candidates answered yes, the one whose model gives up the least self-test (a new model before
    a transform at equal or unknown self-test: it needs no mapping): deploy it, or map the stored gallery
    with its transform; without one, re-extraction (with the backfill fraction from which the new
    model may query the mixed gallery, when a curve says)."""
    ready = [a for a in answers if a["answer"] == "yes"]
    if ready:
        best = max(ready, key=lambda a: (-np.inf if a["self_test_change"] is None else a["self_test_change"],
                                         a["kind"] == "model"))
        judged = " and ".join(f["metric"] for f in best["figures"])
        if best["kind"] == "model":
            safe = best["backfill"] and best["backfill"]["from_fraction"] is not None
            path = (f"deploy {best['model']}: its queries search the old gallery as it is; re-extract the gallery in "
                    "the background" + (f" (never below the old system from "
                                        f"{percent(best['backfill']['from_fraction'])} re-extracted)" if safe else ""))
            why = f"its queries are compatible with the old gallery on {judged}"
        else:
            path = f"map the stored gallery with the {best['transform']} transform and search it with " \
                   f"{best['model']}'s queries"
            why = f"the mapped gallery is compatible with {best['model']}'s queries on {judged}"
        change = best["self_test_change"]
        if change is not None and len(ready) > 1:
            why += (f", and {best['model']} gives up the least self-test of the compatible candidates ({change:+.3f} "
                    f"against {best['self_test_reference']})")
        elif change is not None:
            why += f", at a self-test change of {change:+.3f} against {best['self_test_reference']}"
        cost = best["cost"]
        if best["kind"] == "transform" and None not in cost.values():
            why += (f"; mapping takes {seconds(cost['transform_seconds_per_million_features'])} per million features "
                    f"against {seconds(cost['reextraction_seconds_per_million_images'])} per million images for "
                    "re-extraction")
        return path, why
    curves = [a for a in answers if a["kind"] == "model" and a["backfill"] and a["backfill"]["from_fraction"] is not None
              and a["backfill"]["from_fraction"] < 1]
    path = "re-enrol (backfill) the gallery with the new model before its queries use it"
    if curves:
        first = min(curves, key=lambda a: a["backfill"]["from_fraction"])
        path = (f"re-extract the gallery with {first['model']} and switch its queries on once "
                f"{percent(first['backfill']['from_fraction'])} of the gallery is re-extracted")
    undecided = any(a["answer"] == "undecided" for a in answers)
    why = "no candidate is shown to serve the old gallery as it is" + (
        " (the undecided ones need more test identities to decide)" if undecided else "")
    if curves:
        why += (f", and from there on the mixed gallery never falls below the old system ({first['backfill']['order']} "
                f"order, {first['backfill']['merge']} merge)")
    return path, why


def decision_record(question, answers):
    """The decision as the reports carry it (``"decision"`` of the JSON): the question, the rule, the
    :func:`candidate` answers, the recommended path and why."""
    path, why = recommendation(answers)
    return {"question": question, "rule": RULE, "answers": answers, "recommended_path": path, "why": why}


def decision_lines(record):
    """Markdown of a :func:`decision_record` (no lines for none)."""
    if record is None:
        return []
    return ([f"**{record['question']}** ({record['rule']})", ""]
            + [f"- {a['candidate']}: **{a['answer']}** ({a['detail']})" for a in record["answers"]]
            + ["", f"Recommended path: {record['recommended_path']}. Why: {record['why']}.", ""])
