"""The demo's studies: the paper's claims tested at demo scale (docs/claims.md); ``tools/demo_study.py`` is the command line.

A study is a list of points. A point is one demo setting (scenario, the old model's stem width and
epochs) in a folder of its own, ``<out>/points/<scenario>_old<width>x<epochs>/``, laid out as a demo
run (``tools/run_demo.py``): its old model, feature files and new models are trained by the demo's
stages under the demo's one training rule, and every method of the point shares its old model and
feature files. Points are shared between studies (the demo's shipped point serves all three), and a
point's stages whose outputs exist are skipped, evaluations included, so a rerun resumes, and a
finished demo run copied to ``<out>/points/OPclass_old8x2/`` is not retrained. The independent model
does not depend on the old model: a point takes it from another point of its scenario when there is one.

Studies (:data:`STUDIES`):

- ``old_quality``: old models from weak to strong (:data:`OLD_LEVELS`), every method at each level;
- ``denoise``: MixBCT with the denoising threshold T off (1.0), 0.9 (published), 0.7, 0.5, and the mix
  ratio 0.1, 0.3 (published), 0.5, 1.0 (:data:`DENOISE_T`, :data:`MIX_RATIOS`);
- ``scenarios``: the four splits, every method.

Each writes ``<out>/<study>/results.json``, ``results.md`` and ``results.png``, and for each point the
demo's own table of it (``<out>/<study>/<point>/results.*``). Every figure has its 95 % subject-bootstrap
interval; margins (cross-test − old self-test), self-test costs (self-test − the independent model's)
and the differences between two models' cross-tests are paired (the same subject resamples).
"""
import json
import math
import os
import re
import shutil
import time

from configs.demo.settings import Demo
from tools.demo import report
from tools.demo.runner import Pipeline
from tools.demo.stages import BOOTSTRAP, check_options, old_model_stages, train_and_evaluate, write_results
from utils.errors import require
from utils.io import atomic_open
from utils.scenarios import SCENARIOS

STUDIES = ("old_quality", "denoise", "scenarios")
# old_quality: the old model's (stem width, epochs), weak to strong; the middle one is the profile's
OLD_LEVELS = {"full": ((4, 2), (8, 2), (12, 6)), "quick": ((4, 1), (8, 2), (12, 3))}
DENOISE_T = (1.0, 0.9, 0.7, 0.5)      # 1.0 keeps every old feature: denoising off; 0.9 published
MIX_RATIOS = (0.1, 0.3, 0.5, 1.0)     # 0.3 published
PUBLISHED_T, PUBLISHED_RATIO = 0.9, 0.3
REFERENCE = "MixBCT"                  # old_quality and scenarios: MixBCT's cross-test against each other method's
FIGURES = (("TAR@FAR=1e-3", ("TAR@FAR", "1e-3")), ("top1", ("top1",)))
LOSS_LINE = re.compile(r"Loss (\S+) \(([^)]*)\)")
CLASSES_LINE = re.compile(r"(\d+) images, (\d+) classes")


class Run:
    """One new model of a point: its label in the tables, its demo config, its folder name and the keys
    set over the config (``denoise_t``: the denoising mask it reads, made by the point)."""

    def __init__(self, label, config, name, keys=None, denoise_t=None):
        self.label, self.config, self.name, self.keys, self.denoise_t = label, config, name, keys or {}, denoise_t


class Point:
    """One demo setting: scenario and old model (``sizes``: demo size options), with its runs."""

    def __init__(self, scenario, sizes, runs, label=None):
        self.scenario, self.sizes, self.runs = scenario, sizes, runs
        self.name = f"{scenario}_old{sizes['old_width']}x{sizes['old_epochs']}"
        self.label = label or self.name


def method_runs(methods):
    """The independent model and each method with its demo config."""
    return [Run(m, m, m) for m in ["independent", *methods]]


def denoise_runs():
    """The independent model, MixBCT as published, then one MixBCT per other T and per other mix ratio."""
    runs = method_runs(["MixBCT"])
    runs[1].label = f"MixBCT T={PUBLISHED_T} r={PUBLISHED_RATIO}"
    for t in DENOISE_T:
        if t != PUBLISHED_T:
            runs.append(Run(f"MixBCT T={'off' if t == 1.0 else t}", "MixBCT", f"MixBCT_T{round(100 * t)}", denoise_t=t))
    for ratio in MIX_RATIOS:
        if ratio != PUBLISHED_RATIO:
            runs.append(Run(f"MixBCT r={ratio}", "MixBCT", f"MixBCT_r{round(100 * ratio)}", {"mix_ratio": ratio}))
    return runs


def study_points(study, profile, methods):
    """The points of ``study``, in order (old_quality: weak to strong)."""
    base = dict(zip(("old_width", "old_epochs"), OLD_LEVELS[profile][1]))
    if study == "old_quality":
        return [Point("OPclass", {"old_width": w, "old_epochs": e}, method_runs(methods)) for w, e in OLD_LEVELS[profile]]
    if study == "denoise":
        return [Point("OPclass", base, denoise_runs())]
    require(study == "scenarios", f"--study {study}: expected one of {', '.join(STUDIES)}")
    return [Point(scenario, base, method_runs(methods), scenario) for scenario in SCENARIOS]


def final_loss(log):
    """``{"loss", "cls", "classes"}`` of a training log: the last logged loss (the mean of its last
    ``frequent`` steps), its classification part (the loss itself when it has no parts) and the class
    count; None for a value the log does not hold."""
    found = {"loss": None, "cls": None, "classes": None}
    if not os.path.exists(log):
        return found
    with open(log, errors="replace") as handle:
        for line in handle:
            classes = CLASSES_LINE.search(line)
            if classes and found["classes"] is None:
                found["classes"] = int(classes.group(2))
            loss = LOSS_LINE.search(line)
            if loss:
                parts = dict(zip(*[iter(loss.group(2).split())] * 2))
                found["loss"] = float(loss.group(1))
                found["cls"] = float(parts.get("cls", loss.group(1)))
    return found


def useless_loss(classes, arcface):
    """Classification loss of a model whose embeddings carry nothing: ln C for softmax; for the new models'
    ArcFace (margin m, scale s) embeddings orthogonal to every centre, ln(1 + (C − 1)·e^{s·sin m})."""
    if classes is None:
        return None
    if not arcface:
        return math.log(classes)
    return math.log1p((classes - 1) * math.exp(Demo.NEW_SCALE * math.sin(Demo.NEW_MARGIN_LIST[1])))


def share_independent(points_dir, point, run_name):
    """Copy the independent model ``run_name`` of another point of the same scenario and new-model settings
    (it does not depend on the old model) into ``point``'s folder; returns the point it came from."""
    target = os.path.join(points_dir, point.name, run_name)
    if os.path.exists(os.path.join(target, "model.pt")):
        return None
    for other in sorted(os.listdir(points_dir)):
        source = os.path.join(points_dir, other, run_name)
        if other != point.name and other.startswith(f"{point.scenario}_old") and \
                os.path.exists(os.path.join(source, "model.pt")):
            os.makedirs(target, exist_ok=True)
            for name in ("training.log", "model.pt"):   # the model last: its presence marks the copy done
                if os.path.exists(os.path.join(source, name)):
                    shutil.copy2(os.path.join(source, name), os.path.join(target, name))
            return other
    return None


def run_point(point, args, data, points_dir, resamples):
    """Train and evaluate one point (stages with existing outputs skipped); returns its record: rows
    (seeds combined), final losses, paired self-test costs and the runs' result files."""
    folder = os.path.join(points_dir, point.name)
    demo = Demo(args.profile, data, folder, point.scenario, **point.sizes)
    pipe = Pipeline(folder, dict(os.environ, PYTHONUNBUFFERED="1"), True, demo.INPUT_SIZE, reuse_evaluations=True)
    print(f"[point {point.name}] {point.label}: {len(point.runs)} models × {args.seeds} seed(s) in {folder}", flush=True)
    old_model = old_model_stages(pipe, demo, data, folder, point.scenario)
    feature_dir = os.path.join(folder, "feature_save", point.scenario)
    for t in sorted({r.denoise_t for r in point.runs if r.denoise_t is not None}):
        command = ["tools/get_feature/denoise_credible.py", "--T", str(t), "--SD", demo.SD, "--output", feature_dir]
        pipe.stage(f"denoise_T{round(100 * t)}", command, done_when=[demo.feature(f"credible_ratio_{round(100 * t)}")])
    runs, extra, label_of = [], {}, {}
    for k in range(args.seeds):
        for run in point.runs:
            name = demo.run_name(run.name, k)
            if run.config == "independent":
                source = share_independent(points_dir, point, name)
                if source:
                    print(f"[train_{name}] shared from point {source} (the independent model does not depend on "
                          f"the old model)", flush=True)
            keys = dict(run.keys, output=os.path.join(folder, name))
            if run.denoise_t is not None:
                keys["credible_old_feature"] = demo.feature(f"credible_ratio_{round(100 * run.denoise_t)}")
            runs.append((run.config, name, k))
            extra[name], label_of[name] = keys, run.label
    evaluated = train_and_evaluate(pipe, demo, data, folder, old_model, runs, args.jobs, resamples, extra)
    old_results = evaluated["old"][0]
    rows = report.result_rows("old", old_results)
    rows += [row for _, name, _ in runs for row in report.result_rows(label_of[name], evaluated[name][0], old_results)]
    rows = report.combine_seeds(rows)
    losses = {"old": dict(final_loss(os.path.join(folder, "old_softmax", "training.log")))}
    losses["old"]["useless"] = useless_loss(losses["old"]["classes"], arcface=False)
    for _, name, _ in runs:
        found = final_loss(os.path.join(folder, name, "training.log"))
        losses[name] = dict(found, label=label_of[name], useless=useless_loss(found["classes"], arcface=True))
    files = {name: {test: path for test, result, path in evaluated[name][0] if result["protocol"] == "1:1"}
             | {f"{test}_1N": path for test, result, path in evaluated[name][0] if result["protocol"] == "1:N"}
             for _, name, _ in runs}
    files["old"] = {"self": evaluated["old"][0][0][2], "self_1N": evaluated["old"][0][1][2]}
    seconds = dict(pipe.seconds)
    point_out = os.path.join(args.out, args.study, point.name)
    os.makedirs(point_out, exist_ok=True)
    write_results(point_out, {"rows": rows, "seconds": seconds, "scenario": point.scenario, "profile": args.profile,
                              "sizes": demo.sizes(), "seeds": args.seeds},
                  report.results_table(rows, point.scenario, args.seeds, resamples, args.profile))
    record = {"name": point.name, "label": point.label, "scenario": point.scenario, "sizes": demo.sizes(),
              "folder": folder, "rows": rows, "losses": losses, "files": files, "seconds": seconds,
              "runs": [{"label": label_of[name], "run": name, "seed": k} for _, name, k in runs]}
    record["self_costs"] = self_costs(record)
    return record


def paired_difference(record, label_a, label_b, test, metric):
    """(figure of model a − figure of model b) of a point, mean over seeds, with the mean bounds of its
    paired 95 % interval (one result file per run, the same subject resamples): ``(difference, low, high)``."""
    row_of = {(r["method"], r["test"], r["metric"]): r for r in record["rows"]}
    kind = test.split("_")[0]
    difference = row_of[(label_a, kind, metric)]["value"] - row_of[(label_b, kind, metric)]["value"]
    keys_path = dict(FIGURES)[metric]
    files = record["files"]
    bounds = [report.paired_interval(files[a][test], files[b][test], keys_path)
              for a, b in zip(seed_runs(record, label_a), seed_runs(record, label_b))]
    return difference, sum(b[0] for b in bounds) / len(bounds), sum(b[1] for b in bounds) / len(bounds)


def seed_runs(record, label):
    """The run folders of ``label`` in a point's record, seed by seed."""
    return [r["run"] for r in record["runs"] if r["label"] == label]


def self_costs(record):
    """Each new model's self-test minus the independent model's (TAR@FAR=1e-3 and top-1), paired."""
    costs = {}
    for label in dict.fromkeys(r["label"] for r in record["runs"]):
        if label == "independent":
            continue
        costs[label] = {}
        for metric, _ in FIGURES:
            test = "self" if metric.startswith("TAR") else "self_1N"
            costs[label][metric] = paired_difference(record, label, "independent", test, metric)
    return costs


def differences(record, study):
    """Paired differences of cross-tests between two models of a point: MixBCT − each other method
    (old_quality, scenarios); each MixBCT variant − the published MixBCT (denoise)."""
    labels = [label for label in dict.fromkeys(r["label"] for r in record["runs"]) if label != "independent"]
    if study == "denoise":
        pairs = [(label, labels[0]) for label in labels[1:]]
    else:
        pairs = [(REFERENCE, label) for label in labels if label != REFERENCE] if REFERENCE in labels else []
    found = []
    for a, b in pairs:
        entry = {"a": a, "b": b}
        for metric, _ in FIGURES:
            test = "cross" if metric.startswith("TAR") else "cross_1N"
            entry[metric] = paired_difference(record, a, b, test, metric)
        found.append(entry)
    return found


def run_study(args):
    """Every point of ``args.study``, then ``<out>/<study>/results.json``, ``results.md``, ``results.png``."""
    args.generations, args.generation_method = 2, None   # no third generation; the demo's other checks apply
    check_options(args)
    points = study_points(args.study, args.profile, args.methods)
    args.out, data = os.path.abspath(args.out), os.path.abspath(args.data)
    points_dir = os.path.join(args.out, "points")
    os.makedirs(points_dir, exist_ok=True)
    resamples = BOOTSTRAP[args.profile] if args.bootstrap is None else args.bootstrap
    os.environ.setdefault("BCT_CACHE_DIR", os.path.join(args.out, "cache"))
    started = time.time()
    records = []
    for point in points:
        point_start = time.time()
        record = run_point(point, args, data, points_dir, resamples)
        record["differences"] = differences(record, args.study)
        record["wall_seconds"] = round(time.time() - point_start, 1)
        records.append(record)
        print(f"[point {point.name}] done in {record['wall_seconds']:.0f} s", flush=True)
        results = write_study(args, records, len(points), resamples, time.time() - started)
    print("\n" + study_table(results))
    print(f"study {args.study}: {os.path.join(args.out, args.study)}/results.md, results.json, results.png "
          f"({results['wall_seconds']:.0f} s)")
    return results


def write_study(args, records, total_points, resamples, seconds):
    """``<out>/<study>/results.json``, ``results.md`` and ``results.png`` of the points done so far
    (rewritten after each point: a stopped study keeps its finished points, ``complete`` false)."""
    results = {"study": args.study, "profile": args.profile, "seeds": args.seeds, "methods": args.methods,
               "bootstrap": {"resamples": resamples, "level": 0.95, "unit": "subject"},
               "wall_seconds": round(seconds, 1), "complete": len(records) == total_points,
               "points_planned": total_points, "points": records}
    folder = os.path.join(args.out, args.study)
    os.makedirs(folder, exist_ok=True)
    with atomic_open(os.path.join(folder, "results.json")) as handle:
        json.dump(results, handle, indent=1)
    with atomic_open(os.path.join(folder, "results.md")) as handle:
        handle.write(study_table(results))
    plot_study(results, os.path.join(folder, "results.png"))
    return results


def _signed(value, low, high):
    """``+0.012 [−0.004, +0.030]``."""
    interval = "" if low != low else " [" + f"{low:+.3f}, {high:+.3f}" + "]"
    return f"{value:+.3f}{interval}"


def _loss_text(loss):
    """``2.51 (useless 16.7)``: a final classification loss beside that of a useless model."""
    if loss.get("cls") is None:
        return "not logged"
    useless = "" if loss.get("useless") is None else f" (useless {loss['useless']:.1f})"
    return f"{loss['cls']:.2f}{useless}"


def study_table(results):
    """Markdown: per point the old model and each new model (figures, margins with verdicts, self-test cost,
    final loss), then the paired differences between models."""
    seeds = results["seeds"]
    lines = [f"# Study {results['study']}", "",
             f"Profile {results['profile']}; IJB-C-style synthetic evaluation; value [95 % subject-bootstrap "
             f"percentile interval] ({results['bootstrap']['resamples']} resamples); "
             + (f"mean over {seeds} seeds of the new models; " if seeds > 1 else "one seed; ")
             + f"wall time {results['wall_seconds']:.0f} s"
             + ("." if results["complete"] else
                f"; **{len(results['points'])} of {results['points_planned']} points done** (the others not yet run)."),
             "",
             "margin: cross-test − old self-test (paired interval; compatible above 0, not compatible below, "
             "undecided containing 0). self − independent: the model's self-test minus the independent model's "
             "(paired). loss: the last logged classification loss (mean of the last logged steps), beside "
             "that of a useless model.", "",
             "| point | model | self TAR@FAR=1e-3 | cross TAR@FAR=1e-3 | margin TAR@FAR=1e-3 | margin top-1 | "
             "self − independent TAR@FAR=1e-3 | self − independent top-1 | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for point in results["points"]:
        row_of = {(r["method"], r["test"], r["metric"]): r for r in point["rows"]}
        losses = point["losses"]
        lines.append(f"| {point['label']} | old | {report.cell_text(row_of[('old', 'self', 'TAR@FAR=1e-3')])} | | | | | "
                     f"| {_loss_text(losses['old'])} |")
        for label in dict.fromkeys(r["label"] for r in point["runs"]):
            cells = [report.cell_text(row_of[(label, test, "TAR@FAR=1e-3")]) for test in ("self", "cross")]
            cells += [report.margin_text(row_of[(label, "cross", metric)]) for metric, _ in FIGURES]
            cost = point["self_costs"].get(label)
            cells += [_signed(*cost[metric]) if cost else "" for metric, _ in FIGURES]
            run_losses = [losses[r] for r in seed_runs(point, label)]
            cells.append(", ".join(_loss_text(loss) for loss in run_losses))
            lines.append(f"| {point['label']} | {label} | " + " | ".join(cells) + " |")
    compared = [p for p in results["points"] if p["differences"]]
    if compared:
        lines += ["", "Paired differences of cross-tests (a − b: positive when a is the more compatible; "
                  "interval containing 0: no measured difference):", "",
                  "| point | a − b | TAR@FAR=1e-3 | top-1 |", "|---|---|---|---|"]
        for point in compared:
            for entry in point["differences"]:
                lines.append(f"| {point['label']} | {entry['a']} − {entry['b']} | "
                             + " | ".join(_signed(*entry[metric]) for metric, _ in FIGURES) + " |")
    return "\n".join(lines) + "\n"


def plot_study(results, path):
    """Three panels against the study's axis — margin TAR@FAR=1e-3, margin top-1 (paired 95 % intervals) and
    self − independent TAR@FAR=1e-3 — one line per method (denoise: per MixBCT setting). old_quality's
    axis is the old model's self-test, the others' the points or settings in order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path

    study = results["study"]
    series = {}   # name → [(x, margin TAR row, margin top-1 row, self cost)]
    ticks = []
    for index, point in enumerate(results["points"]):
        row_of = {(r["method"], r["test"], r["metric"]): r for r in point["rows"]}
        labels = [label for label in dict.fromkeys(r["label"] for r in point["runs"]) if label != "independent"]
        for position, label in enumerate(labels):
            if study == "old_quality":
                x, name = row_of[("old", "self", "TAR@FAR=1e-3")]["value"], label
            elif study == "denoise":
                x, name = position, "MixBCT"
                ticks.append((position, label.replace("MixBCT ", "")))
            else:
                x, name = index, label
            series.setdefault(name, []).append((x, row_of[(label, "cross", "TAR@FAR=1e-3")],
                                                row_of[(label, "cross", "top1")], point["self_costs"][label]))
        if study == "scenarios":
            ticks.append((index, point["label"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, found in series.items():
        found.sort(key=lambda item: item[0])
        xs = [item[0] for item in found]
        for ax, pick in ((axes[0], 1), (axes[1], 2)):
            values = [item[pick]["margin"] for item in found]
            errors = [[max(v - item[pick]["margin_ci_low"], 0) for v, item in zip(values, found)],
                      [max(item[pick]["margin_ci_high"] - v, 0) for v, item in zip(values, found)]]
            ax.errorbar(xs, values, yerr=errors, marker="o", capsize=3, label=name)
        costs = [item[3]["TAR@FAR=1e-3"] for item in found]
        axes[2].errorbar(xs, [c[0] for c in costs], yerr=[[max(c[0] - c[1], 0) for c in costs],
                                                          [max(c[2] - c[0], 0) for c in costs]],
                         marker="o", capsize=3, label=name)
    titles = ("margin TAR@FAR=1e-3 (cross − old self)", "margin top-1 (cross − old self)",
              "self-test − independent, TAR@FAR=1e-3")
    for ax, title in zip(axes, titles):
        ax.axhline(0, color="k", linewidth=1)
        ax.set_title(title, fontsize=9)
        if study == "old_quality":
            ax.set_xlabel("old model's self-test TAR@FAR=1e-3")
        else:
            ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=30, fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"study {study} (95 % paired intervals)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
