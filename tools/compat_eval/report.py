"""compat_eval's report: the markdown text (:func:`format_report`) and the heatmap of the main metric (:func:`plot_matrix`)."""
import numpy as np

from tools.compat_eval import backfill, decision
from tools.compat_eval.protocol import METRICS
from utils.io import atomic_path


def decision_section(result):
    """Markdown of :func:`decision_of`."""
    return decision.decision_lines(decision_of(result))


def decision_of(result):
    """Can each later generation (and the transformed gallery) serve queries against the oldest generation's
    gallery without re-enrolment: per candidate the verdicts on the main metric and top-1 (paired
    intervals of the margins over the oldest self-test), the self-test change against ``--independent``,
    the backfill answer (:func:`decision.backfill_safety` of the curves of that candidate re-extracting the
    oldest gallery; for a transformed gallery its FastFill curves), the cost (``result["cost"]``), and the recommended path (:func:`decision.decision_record`;
    None without verdicts)."""
    names, metric = result["generations"], result["metric"]
    cell = {(c["query"], c["gallery"]): c for c in result["cells"]}
    old, pairs, independent = names[0], result["protocol"]["impostor_pairs"], result.get("independent")
    cost = result.get("cost") or {}
    reextraction = cost.get("reextraction_seconds_per_million_images") or {}
    judged = [m for m in decision.verdict_metrics(metric) if decision.measurable(m, pairs)]
    answers = []
    for v in result["verdicts"]:
        if v.get("self_of", v["earlier"]) != old:
            continue
        figures = [decision.figure(name, m["margin"], *m.get("interval", (float("nan"),) * 2), pairs)
                   for name, m in v["margins"].items()]
        model = v["earlier"] == old
        self_test = None
        if independent is not None:
            change = cell[v["generation"], v["generation"]][metric] - cell[independent, independent][metric]
            self_test = (change if decision.measurable(metric, pairs) else None, metric, independent)
        answers.append(decision.candidate(
            f"{v['generation']} queries → {v['earlier']} gallery", v["generation"],
            None if model else v["earlier"].split(" + ", 1)[-1], figures,
            self_test, decision.backfill_safety(result.get("backfill"), v["generation"], old if model else v["earlier"], judged),
            None if model else cost.get("transform_seconds_per_million_features"), reextraction.get(v["generation"])))
    if not answers:
        return None
    return decision.decision_record(f"Can a new generation serve queries against {old}'s gallery without "
                                    "re-enrolment?", answers)


def format_report(result):
    """Markdown: the matrix of the main metric, every figure per cell, the verdicts. A TAR@FAR that the
    impostor pairs cannot carry (:func:`decision.measurable`) is shown as ``n/m``, with a note."""
    names, metric = result["generations"], result["metric"]
    cell = {(c["query"], c["gallery"]): c for c in result["cells"]}
    p = result["protocol"]

    def show(c, key, intervals=True):
        if not decision.measurable(key, p["impostor_pairs"]):
            return "n/m"
        interval = c.get("interval", {}).get(key) if intervals else None
        return f"{c[key]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")

    lines = [f"Compatibility matrix, {metric} (rows: query generation, columns: gallery generation"
             + (f"; 95 % bootstrap intervals over identities, {result['bootstrap']} resamples" if result["bootstrap"]
                else "") + ")", "",
             "| query \\ gallery | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {q} | " + " | ".join(show(cell[q, g], metric) for g in names) + " |" for q in names]
    lines += ["", f"{p['images']} images of {p['identities']} identities; 1:1: {p['genuine_pairs']} genuine / "
              f"{p['impostor_pairs']} impostor pairs; 1:N: {p['gallery_identities']} gallery identities "
              f"({p['gallery_images']} images), {p['mated_probes']} mated / {p['nonmated_probes']} non-mated probes.",
              "", "| query | gallery | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    lines += [f"| {c['query']} | {c['gallery']} | " + " | ".join(show(c, k, False) for k in METRICS) + " |"
              for c in result["cells"]]
    note = decision.not_measurable_note(METRICS, p["impostor_pairs"])
    lines += ["", f"n/m: {note}."] if note else []
    if not decision.measurable(metric, p["impostor_pairs"]):
        lines += ["", f"The main metric {metric} is not measurable with this data: the matrix and the verdicts "
                  "below carry no information on it; choose --metric with a larger FAR or evaluate more identities."]
    if result["verdicts"]:
        lines += ["", "Verdicts (each figure's margin over the earlier generation's self-test with the paired 95 % "
                  "interval: compatible when it lies above 0, not compatible below 0, undecided when it contains 0):", ""]
    for v in result["verdicts"]:
        reference = v.get("self_of", v["earlier"])
        texts = []
        for name, m in v["margins"].items():
            low, high = m.get("interval", (float("nan"),) * 2)
            word = decision.interval_verdict(m["margin"], low, high) if decision.measurable(name, p["impostor_pairs"]) \
                else "n/m"
            texts.append(f"{name} cross {m['cross']:.4f} vs {reference} self {m['self']:.4f}, margin {m['margin']:+.4f}"
                         + (f" {decision.signed_interval(low, high, 4)}" if "interval" in m else "") + f" {word}")
        lines.append(f"- {v['generation']} → {v['earlier']}: " + "; ".join(texts))
    if "average_compatibility" in result:
        def interval(key):
            return f" [{result[key + '_ci_low']:.4f}, {result[key + '_ci_high']:.4f}]" if key + "_ci_low" in result else ""

        lines += ["", f"Across the {len(names)} generations ({metric}): Average Compatibility "
                  f"{result['average_compatibility']:.4f}{interval('average_compatibility')}, Average Multi-model "
                  f"accuracy {result['average_multimodel_accuracy']:.4f}{interval('average_multimodel_accuracy')}; "
                  "oldest generation each one is compatible with (its cross-test reaches the self-test of every "
                  "generation from that one on, point values): "
                  + ", ".join(f"{k} → {v}" for k, v in result["oldest_compatible"].items())]
    text = "\n".join(decision_section(result) + lines) + "\n"
    return text + backfill.format_backfill(result["backfill"], metric) if result.get("backfill") else text


def plot_matrix(result, path):
    """Heatmap PNG of the main metric (rows: query, columns: gallery): each cell's value and its 95 %
    bootstrap interval written in it (``n/m`` for a figure the impostor pairs cannot carry); the title
    names the metric and the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, metric, p = result["generations"], result["metric"], result["protocol"]
    cell = {(c["query"], c["gallery"]): c for c in result["cells"]}
    grid = np.array([[cell[q, g][metric] for g in names] for q in names])
    shown = decision.measurable(metric, p["impostor_pairs"])
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 1.2 * len(names) + 1.6))
    image = ax.imshow(grid if shown else np.full_like(grid, np.nan), cmap="viridis", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(grid):
        interval = cell[names[r], names[c]].get("interval", {}).get(metric)
        text = "n/m" if not shown else f"{v:.3f}" + (f"\n[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        ax.text(c, r, text, ha="center", va="center", fontsize=8, color="w" if not shown or v < 0.6 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    intervals = f"in brackets: 95 % interval over identities ({result['bootstrap']} resamples)\n" \
        if result["bootstrap"] else ""
    ax.set(xlabel="gallery generation (its model embeds the gallery)", ylabel="query generation (embeds the probes)")
    ax.set_title(f"{metric} of each query vs gallery generation\n{intervals}{p['identities']} identities, "
                 f"{p['impostor_pairs']:,} impostor pairs" + ("" if shown else f": {metric} not measurable (n/m)"),
                 fontsize=9)
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
