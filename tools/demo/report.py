"""The demo's report: result rows with margins over the old self-test, verdicts, the markdown table and the plot.

A row is one figure of one model: ``{method, test, metric, value, ci_low, ci_high}``, for a TAR@FAR
``impostor_pairs`` (of its evaluation) and, for a cross-test, ``margin``, ``margin_ci_low``,
``margin_ci_high`` (``results.json``'s ``rows``). A TAR@FAR that its impostor pairs cannot carry
(:func:`decision.measurable`) is printed ``n/m``, its margin without a verdict.
"""
from tools.compat_eval import decision
from utils.errors import require
from utils.io import safe_np_load

METRICS = ("TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "top1", "TPIR@FPIR=1e-1")


def result_rows(method, results, old_results=None):
    """The demo's metrics, with their 95 % intervals, from one model's ijbc_eval results; with the old
    model's results, each cross row adds its margin over the old self-test of the same metric, with
    the interval of the paired differences (both result files hold figures of the same resamples)."""
    old_self = {r["protocol"]: (r, path) for test, r, path in old_results or () if test == "self"}
    rows = []
    for test, result, path in results:
        if result["protocol"] == "1:1":
            keys = [(f"TAR@FAR={far}", ("TAR@FAR", far)) for far in ("1e-4", "1e-3", "1e-2")]
        else:
            keys = [("top1", ("top1",)), ("TPIR@FPIR=1e-1", ("TPIR@FPIR", "1e-1"))]
        for metric, keys_path in keys:
            value, (low, high) = _figure(result, keys_path)
            row = {"method": method, "test": test, "metric": metric, "value": value, "ci_low": low, "ci_high": high}
            if "num_impostor_pairs" in result and metric.startswith("TAR@FAR="):
                row["impostor_pairs"] = result["num_impostor_pairs"]
            if test == "cross" and result["protocol"] in old_self:
                old, old_file = old_self[result["protocol"]]
                row["margin"] = value - _figure(old, keys_path)[0]
                row["margin_ci_low"], row["margin_ci_high"] = paired_interval(path, old_file, keys_path)
            rows.append(row)
    return rows


def _figure(result, keys_path):
    """``(value, (ci_low, ci_high))`` of the figure at ``keys_path`` of an ijbc_eval result (NaN: no interval)."""
    value, interval = result, result.get("CI95")
    for key in keys_path:
        value = value[key]
        interval = interval[key] if interval is not None else None
    low, high = interval if interval is not None else (float("nan"), float("nan"))
    return float(value), (float(low), float(high))


def paired_interval(cross_file, old_file, keys_path):
    """95 % percentile interval ``(low, high)`` of (cross-test − old self-test) of one figure over the
    resamples both ijbc_eval result files hold (the same subjects, seed 0: paired); NaN without them."""
    name = "bootstrap/" + "/".join(keys_path)
    with safe_np_load(cross_file) as cross, safe_np_load(old_file) as old:
        if name not in cross.files or name not in old.files:
            return float("nan"), float("nan")
        require(len(cross[name]) == len(old[name]),
                f"{cross_file} and {old_file}: different numbers of bootstrap resamples")
        return decision.paired_interval(cross[name], old[name])


def combine_seeds(rows):
    """One row per (method, test, metric): with several seeds the mean value, the mean interval bounds
    (and margins), the standard deviation over seeds (``sd``, ddof 1) and their number (``seeds``)."""
    import numpy as np

    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["test"], row["metric"]), []).append(row)
    combined = []
    for (method, test, metric), group in groups.items():
        row = {"method": method, "test": test, "metric": metric}
        for key in ("value", "ci_low", "ci_high", "margin", "margin_ci_low", "margin_ci_high"):
            if key in group[0]:
                row[key] = float(np.mean([r[key] for r in group]))
        if "impostor_pairs" in group[0]:
            row["impostor_pairs"] = min(r["impostor_pairs"] for r in group)
        if len(group) > 1:
            row["sd"] = float(np.std([r["value"] for r in group], ddof=1))
            row["seeds"] = len(group)
        combined.append(row)
    return combined


def measurable(row):
    """Whether the row's impostor pairs carry its figure (rows without a count: yes)."""
    return decision.measurable(row["metric"], row.get("impostor_pairs"))


def cell_text(row):
    """``value [low, high]`` (the 95 % percentile interval, not symmetric; and the sd over seeds) of one row;
    the value alone without an interval; ``n/m`` for a figure its impostor pairs cannot carry."""
    if not measurable(row):
        return "n/m"
    text = f"{row['value']:.3f}"
    if row["ci_high"] == row["ci_high"]:   # not NaN
        text += f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    return text + (f" (sd {row['sd']:.3f})" if "sd" in row else "")


def verdict(row):
    """Compatibility verdict of a cross row from its paired margin interval: ``compatible`` (above 0),
    ``not compatible`` (below 0), ``undecided`` (contains 0); without an interval, from the margin alone."""
    return decision.interval_verdict(row["margin"], row["margin_ci_low"], row["margin_ci_high"])


def margin_text(row):
    """``+0.052 [+0.012, +0.090] compatible``: margin, its paired 95 % interval and the verdict (``n/m``
    for a figure its impostor pairs cannot carry)."""
    if not measurable(row):
        return "n/m"
    interval = "" if row["margin_ci_low"] != row["margin_ci_low"] else \
        " " + decision.signed_interval(row["margin_ci_low"], row["margin_ci_high"], 3)
    return f"{row['margin']:+.3f}{interval} {verdict(row)}"


VERDICT_METRICS = decision.verdict_metrics("TAR@FAR=1e-3")   # the paper's two kinds of figure: 1:1 and 1:N


def row_verdict(row):
    """The verdict of a cross row, ``n/m`` when its impostor pairs cannot carry the figure."""
    return verdict(row) if measurable(row) else "n/m"


def decision_section(rows, backfill=None, cost=None):
    """Markdown of :func:`decision_of`."""
    return decision.decision_lines(decision_of(rows, backfill, cost))


def decision_of(rows, backfill=None, cost=None):
    """Can each new model (or transformed gallery) serve queries against the old gallery without re-enrolment:
    per candidate its TAR@FAR=1e-3 and top-1 verdicts, the self-test it gives up against the independent
    model, the backfill answer (:func:`decision.backfill_safety` of its curves in ``backfill``, the report of
    :func:`tools.demo.backfill.write_curves`), the cost (``cost``: :func:`tools.demo.transforms.transform_paths`'
    measured seconds) and the recommended path (:func:`decision.decision_record`)."""
    from tools.demo.transforms import LABELS

    row_of = {(r["method"], r["test"], r["metric"]): r for r in rows}
    indep = row_of.get(("independent", "self", "TAR@FAR=1e-3"))
    per_million = {f"independent + {label}": cost["seconds_per_million"][kind] for kind, label in LABELS.items()
                   if kind in cost.get("seconds_per_million", {})} if cost else {}
    reextraction = cost.get("backfill_seconds_per_million") if cost else None
    pairs = backfill["protocol"]["impostor_pairs"] if backfill else None
    curves = backfill["backfill"] if backfill else None
    answers = []
    for method in dict.fromkeys(r["method"] for r in rows):
        crosses = [row_of.get((method, "cross", m)) for m in VERDICT_METRICS]
        if method == "old" or not all(c and "margin" in c for c in crosses):
            continue
        figures = [decision.figure(m, c["margin"], c["margin_ci_low"], c["margin_ci_high"], c.get("impostor_pairs"))
                   for m, c in zip(VERDICT_METRICS, crosses)]
        model, _, kind = method.partition(" + ")
        self_test = None
        own = row_of.get((model, "self", "TAR@FAR=1e-3"))
        if own and indep:
            self_test = (own["value"] - indep["value"] if measurable(own) and measurable(indep) else None,
                         "TAR@FAR=1e-3", "the independent model")
        safety = None if kind else decision.backfill_safety(
            curves, method, "old", [m for m in VERDICT_METRICS if decision.measurable(m, pairs)])
        answers.append(decision.candidate(method, model, kind or None, figures, self_test, safety,
                                          per_million.get(method), reextraction))
    return decision.decision_record("Can a new model serve queries against the old gallery without re-enrolment?",
                                    answers)


def results_table(rows, scenario, seeds=1, resamples=0, profile="full", record=None):
    """Markdown table: one row per method and test, with the cross rows' margins over the old self-test
    and their verdicts (TAR@FAR=1e-3 and top-1) and the self-test cost against the independent model,
    under the decision section (``record``: the :func:`decision_of` to show, default from the rows alone);
    the quick profile's table is headed as a smoke test."""
    row_of = {(r["method"], r["test"], r["metric"]): r for r in rows}
    value = {key: r["value"] for key, r in row_of.items()}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    indep_self = value.get(("independent", "self", "TAR@FAR=1e-3"))
    smoke = ["**Smoke test** (profile quick: tiny data, 2-epoch models): these numbers show that every stage ran; "
             "they say nothing about the methods. Run the full profile for figures.", ""] if profile == "quick" else []
    lines = smoke + decision.decision_lines(record or decision_of(rows)) + [
        f"Scenario {scenario}, IJB-C-style synthetic evaluation (self: new vs new; cross: new query vs old "
        f"gallery); value [95 % subject-bootstrap percentile interval] ({resamples} resamples)"
        + (f", mean over {seeds} seeds of the new models (sd: across seeds)" if seeds > 1 else ""), "",
        "| method | test | " + " | ".join(METRICS) + " | " +
        " | ".join(f"margin {m} [95 %] verdict" for m in VERDICT_METRICS) + " | self-test vs independent |",
        "|---|---|" + "---|" * (len(METRICS) + len(VERDICT_METRICS)) + "---|"]
    for method in methods:
        for test in ("self", "cross"):
            if (method, test, METRICS[1]) not in value:
                continue
            cells = [cell_text(row_of[(method, test, m)]) if (method, test, m) in row_of else "" for m in METRICS]
            margins = [margin_text(row_of[(method, test, m)]) if "margin" in row_of.get((method, test, m), {})
                       else "" for m in VERDICT_METRICS]
            cost = ""
            if test == "self" and method not in ("old", "independent") and indep_self is not None:
                own = row_of[(method, test, "TAR@FAR=1e-3")]
                cost = f"{own['value'] - indep_self:+.3f}" if measurable(own) else "n/m"
            lines.append(f"| {method} | {test} | " + " | ".join(cells + margins) + f" | {cost} |")
    lines += ["", "margin: cross-test minus the old model's self-test of the same figure, with the 95 % interval of "
              "the paired subject resamples; compatible: the interval lies above 0, not compatible: below 0, "
              "undecided: it contains 0. self-test vs independent: TAR@FAR=1e-3 difference."]
    pairs = [r["impostor_pairs"] for r in rows if "impostor_pairs" in r]
    note = decision.not_measurable_note(METRICS, min(pairs)) if pairs else ""
    lines += ["", f"n/m: {note}."] if note else []
    return "\n".join(lines) + "\n"


def plot_results(rows, path):
    """Left: TAR@FAR=1e-3 (self and cross) per method with 95 % intervals, the old self-test as a dashed line
    and its interval as a grey band, the y axis fitted to the figures; right: each method's margin over the
    old self-test (TAR@FAR=1e-3 and top-1) with its paired interval. Each panel titled, legends below. Saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path

    row_of = {(r["method"], r["test"], r["metric"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(1.1 * len(methods) + 6, 5.2), width_ratios=(1, 1))
    for offset, test in ((-0.2, "self"), (0.2, "cross")):
        found = [(i, row_of[(m, test, "TAR@FAR=1e-3")]) for i, m in enumerate(methods)
                 if (m, test, "TAR@FAR=1e-3") in row_of]
        _bars(ax, found, offset, f"{test}-test", "value", "ci_low", "ci_high")
    if ("old", "self", "TAR@FAR=1e-3") in row_of:
        old = row_of[("old", "self", "TAR@FAR=1e-3")]
        ax.axhline(old["value"], color="k", linestyle="--", linewidth=1, label="old self-test (the level to reach)")
        ax.axhspan(old["ci_low"], old["ci_high"], color="k", alpha=0.1, linewidth=0,
                   label="its 95 % interval over subjects")
    ax.set_xticks(range(len(methods)), methods, rotation=30)
    ax.set_ylabel("TAR@FAR=1e-3 (95 % interval)")
    ax.set_ylim(*fitted_limits([r[k] for r in rows if r["metric"] == "TAR@FAR=1e-3" for k in ("value", "ci_low", "ci_high")]))
    ax.set_title("TAR@FAR=1e-3 of each model\nself-test: new vs new; cross-test: new queries vs the old gallery",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.4), ncol=2)
    crossed = [m for m in methods if m != "independent" and "margin" in row_of.get((m, "cross", "TAR@FAR=1e-3"), {})]
    for offset, metric in ((-0.2, "TAR@FAR=1e-3"), (0.2, "top1")):
        found = [(i, row_of[(m, "cross", metric)]) for i, m in enumerate(crossed) if (m, "cross", metric) in row_of]
        _bars(bx, found, offset, metric, "margin", "margin_ci_low", "margin_ci_high")
    bx.axhline(0, color="k", linewidth=1)
    bx.set_xticks(range(len(crossed)), crossed, rotation=30)
    bx.set_ylabel("cross-test − old self-test (paired 95 % interval)")
    bx.set_title("margin over the old self-test of BCT methods and gallery transforms\n"
                 "interval above 0: compatible, below 0: not compatible, across 0: undecided", fontsize=9)
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.4), ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def fitted_limits(values, pad=0.08):
    """``(low, high)`` y limits around the finite ``values`` (a share ``pad`` of their range added on each side,
    kept within [0, 1]); ``(0, 1)`` without values."""
    import numpy as np

    finite = np.asarray([v for v in values if v == v], np.float64)
    if not len(finite):
        return 0.0, 1.0
    low, high = finite.min(), finite.max()
    margin = max((high - low) * pad, 0.01)
    return max(0.0, low - margin), min(1.0, high + margin)


def _bars(ax, found, offset, label, key, low, high):
    """Bars of ``row[key]`` at ``index + offset`` with error bars to ``row[low]``..``row[high]``
    (a percentile interval need not contain the value: its bars are clipped at it)."""
    values = [r[key] for _, r in found]
    errors = [[max(r[key] - r[low], 0) if r[low] == r[low] else 0 for _, r in found],
              [max(r[high] - r[key], 0) if r[high] == r[high] else 0 for _, r in found]]
    ax.bar([i + offset for i, _ in found], values, width=0.4, yerr=errors, capsize=3, label=label)
