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
    gallery without re-enrolment — yes/no/undecided from the main metric's paired interval, with the top-1
    margin as point values — and the recommended path (:func:`decision.decision_record`; None without verdicts)."""
    names, metric = result["generations"], result["metric"]
    cell = {(c["query"], c["gallery"]): c for c in result["cells"]}
    old = names[0]
    rows, trained, transforms = [], [], []
    for v in result["verdicts"]:
        if v.get("self_of", v["earlier"]) != old:
            continue
        low, high = v.get("margin_interval", (float("nan"), float("nan")))
        said = decision.answer([decision.interval_verdict(v["margin"], low, high)])
        if not decision.measurable(metric, result["protocol"]["impostor_pairs"]):
            said = "undecided"
        top1 = cell[v["generation"], v["earlier"]]["top1"] - cell[old, old]["top1"]
        detail = (f"{metric} margin {v['margin']:+.4f}"
                  + (f" {decision.signed_interval(low, high, 4)}" if "margin_interval" in v else " (no interval)")
                  + f"; top1 margin {top1:+.4f} (point values)")
        if v["earlier"] == old:
            own = cell[v["generation"], v["generation"]][metric] - cell[old, old][metric]
            trained.append((v["generation"], said, None))
            detail += f"; self-test {own:+.4f} against {old}'s"
        else:
            transforms.append((v["earlier"], said))
        rows.append((f"{v['generation']} queries → {v['earlier']} gallery", said, detail))
    if not rows:
        return None
    return decision.decision_record(f"Can a new generation serve queries against {old}'s gallery without "
                                    f"re-enrolment? (on {metric}: yes when the paired 95 % interval of its margin "
                                    "lies above 0, no below 0, undecided when it contains 0)",
                                    rows, decision.recommendation(trained, transforms))


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
        lines += ["", f"Verdicts ({metric}: a later generation is compatible with an earlier one when its "
                  "cross-test reaches the earlier model's self-test):", ""]
    for v in result["verdicts"]:
        line = (f"- {v['generation']} → {v['earlier']}: {'compatible' if v['compatible'] else 'NOT compatible'}, "
                f"cross {v['cross']:.4f} vs {v.get('self_of', v['earlier'])} self {v['earlier_self']:.4f}, "
                f"margin {v['margin']:+.4f}")
        if "margin_interval" in v:
            low, high = v["margin_interval"]
            line += (f", 95 % interval {decision.signed_interval(low, high, 4)} "
                     + ("excludes 0" if v["interval_excludes_zero"] else "includes 0 (not significant)"))
        lines.append(line)
    if "average_compatibility" in result:
        def interval(key):
            return f" [{result[key + '_ci_low']:.4f}, {result[key + '_ci_high']:.4f}]" if key + "_ci_low" in result else ""

        lines += ["", f"Across the {len(names)} generations ({metric}): Average Compatibility "
                  f"{result['average_compatibility']:.4f}{interval('average_compatibility')}, Average Multi-model "
                  f"accuracy {result['average_multimodel_accuracy']:.4f}{interval('average_multimodel_accuracy')}; "
                  "oldest generation each one is compatible with: "
                  + ", ".join(f"{k} → {v}" for k, v in result["oldest_compatible"].items())]
    text = "\n".join(decision_section(result) + lines) + "\n"
    return text + backfill.format_backfill(result["backfill"], metric) if result.get("backfill") else text


def plot_matrix(result, path):
    """Heatmap PNG of the main metric (rows: query, columns: gallery), values written in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, metric = result["generations"], result["metric"]
    value = {(c["query"], c["gallery"]): c[metric] for c in result["cells"]}
    grid = np.array([[value[q, g] for g in names] for q in names])
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.1 * len(names) + 1.2))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="gallery generation", ylabel="query generation", title=metric)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
