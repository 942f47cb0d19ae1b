"""Cross-test and self-test against training identities and training length: demo runs on a grid.

    python tools/demo_curves.py [--identities 400,1200,2000,3200] [--new_epochs 6,10] [--methods L2,NCCL,MixBCT]
                                [--ijb_subjects 800] [--bootstrap 100] [--out work_dirs/demo_curves]

Two curves through one centre point, the demo's full profile (configs/demo/settings.py): the
identity curve trains the new models for the profile's epochs, the epoch curve uses the profile's
identity count; everything else is the demo's. Each point is a ``tools/run_demo.py --reuse`` run in
``<out>/ids<N>_ep<E>/`` on synthetic data ``<out>/data_<N>_ijb<M>/`` — the IJB-C-style test set is
the same for every point (it does not depend on the training identities) — so a rerun resumes where
it stopped. Writes ``<out>/curves.json``, ``<out>/curves.md`` and ``<out>/curves.png``
(TAR@FAR=1e-3 with 95 % subject-bootstrap intervals).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.demo.report import cell_text
from utils.errors import UserError, require, run_cli
from utils.io import atomic_open

METRIC = "TAR@FAR=1e-3"


def _numbers(text, option):
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"--{option} {text!r}: expected comma-separated whole numbers") from None
    require(values and min(values) >= 1, f"--{option} {text!r}: expected whole numbers of at least 1")
    return values


def grid(identities, epochs, centre_identities, centre_epochs):
    """The points ``(identities, new_epochs)``: each identity count at the centre epochs, each epoch
    count at the centre identities, the centre once."""
    points = [(n, centre_epochs) for n in identities] + [(centre_identities, e) for e in epochs]
    return list(dict.fromkeys(points))


def by_model(point):
    """``{(method, test): row}`` of a point's TAR@FAR=1e-3 rows (run_demo's ``results.json`` rows)."""
    return {(r["method"], r["test"]): r for r in point["rows"]}


def curves_table(points):
    """Markdown: one row per point and test, one column per model (value [95 % interval])."""
    models = list(dict.fromkeys(r["method"] for p in points for r in p["rows"]))
    lines = [f"{METRIC}, value [95 % subject-bootstrap percentile interval]", "",
             "| identities | new-model epochs | test | " + " | ".join(models) + " |",
             "|---|---|---|" + "---|" * len(models)]
    for point in points:
        rows = by_model(point)
        for test in ("self", "cross"):
            cells = [cell_text(rows[(model, test)]) if (model, test) in rows else "" for model in models]
            lines.append(f"| {point['identities']} | {point['new_epochs']} | {test} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(points, centre_identities, centre_epochs, path):
    """Two panels (against identities, against epochs): each method's cross-test with its interval,
    the independent model's self-test and the old model's self-test."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = ((axes[0], "identities", "new_epochs", centre_epochs, "training identities (30 % old / 70 % new)"),
              (axes[1], "new_epochs", "identities", centre_identities, "new-model epochs"))
    for ax, x_key, fixed_key, fixed, label in panels:
        chosen = sorted((p for p in points if p[fixed_key] == fixed), key=lambda p: p[x_key])
        xs = [p[x_key] for p in chosen]
        rows = [by_model(p) for p in chosen]
        models = list(dict.fromkeys(m for r in rows for m, _ in r))
        curves = [("old", "self", "k", "--", "old self-test"), ("independent", "self", "grey", ":",
                                                                "independent self-test")]
        curves += [(m, "cross", None, "-", f"{m} cross-test") for m in models if m not in ("old", "independent")]
        for model, test, color, style, name in curves:
            found = [(x, r[(model, test)]) for x, r in zip(xs, rows) if (model, test) in r]
            if not found:
                continue
            x, values = [f[0] for f in found], [f[1] for f in found]
            line, = ax.plot(x, [v["value"] for v in values], style, marker="o", color=color, label=name)
            ax.fill_between(x, [v["ci_low"] for v in values], [v["ci_high"] for v in values],
                            color=line.get_color(), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_title(f"{fixed_key.replace('_', '-')} = {fixed}", fontsize=9)
    axes[0].set_ylabel(METRIC)
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(args):
    from configs.demo.settings import PROFILES

    identities = _numbers(args.identities, "identities")
    epochs = _numbers(args.new_epochs, "new_epochs")
    centre_identities, centre_epochs = PROFILES["full"]["IDENTITIES"], PROFILES["full"]["NEW_EPOCHS"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    points = []
    started = time.time()
    for n, e in grid(identities, epochs, centre_identities, centre_epochs):
        folder = os.path.join(out, f"ids{n}_ep{e}")
        command = [sys.executable, os.path.join(ROOT, "tools", "run_demo.py"), "--out", folder,
                   "--data", os.path.join(out, f"data_{n}_ijb{args.ijb_subjects}"), "--methods", args.methods, "--reuse",
                   "--identities", str(n), "--new_epochs", str(e), "--ijb_subjects", str(args.ijb_subjects),
                   "--bootstrap", str(args.bootstrap)]
        print(f"[ids{n}_ep{e}] {' '.join(command[1:])}", flush=True)
        log = os.path.join(out, f"ids{n}_ep{e}.log")
        with open(log, "w") as handle:
            code = subprocess.call(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        require(code == 0, f"demo run ids{n}_ep{e} failed (exit {code}) — see {log}")
        with open(os.path.join(folder, "results.json")) as handle:
            results = json.load(handle)
        points.append({"identities": n, "new_epochs": e, "seconds": results["seconds"]["total"],
                       "rows": [r for r in results["rows"] if r["metric"] == METRIC]})
        print(f"[ids{n}_ep{e}] done ({results['seconds']['total']:.0f} s)", flush=True)
    table = curves_table(points)
    with atomic_open(os.path.join(out, "curves.md")) as handle:
        handle.write(table)
    with atomic_open(os.path.join(out, "curves.json")) as handle:
        json.dump({"metric": METRIC, "ijb_subjects": args.ijb_subjects, "bootstrap": args.bootstrap,
                   "points": points}, handle, indent=1)
    plot_curves(points, centre_identities, centre_epochs, os.path.join(out, "curves.png"))
    print("\n" + table)
    print(f"curves: {os.path.join(out, 'curves.md')}, curves.json, curves.png ({time.time() - started:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", default="400,1200,2000,3200",
                        help="training identity counts (at the profile's new-model epochs)")
    parser.add_argument("--new_epochs", default="6,10", help="new-model epoch counts (at the profile's identities)")
    parser.add_argument("--methods", default="L2,NCCL,MixBCT", help="BCT methods trained at every point")
    parser.add_argument("--ijb_subjects", type=int, default=800, help="IJB-C-style test subjects of every point")
    parser.add_argument("--bootstrap", type=int, default=100, help="subject resamples of the intervals")
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "demo_curves"))
    args = parser.parse_args()
    run_cli(run, args)


if __name__ == "__main__":
    main()
