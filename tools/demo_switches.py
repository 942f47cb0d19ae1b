"""The effect of each published-behaviour switch on the demo: one method retrained per flipped key.

    python tools/demo_switches.py [--out work_dirs/demo] [--data dataset/synthetic] [--rows 1,2b,4]

Run after ``tools/run_demo.py`` (the full profile): it reuses that run's old model, feature files,
old embeddings and results. Each row of :data:`SWITCHES` retrains one method with its demo config
(same data, old model, features and seed) and one switch set to the value the demo does not run (the
corrected one; rows 9a/9b the published classifier and schedule counts), then evaluates
it as the demo does (IJB-C-style 1:1 and 1:N, self-test and cross-test, the run's subject resamples,
margins over the old self-test with paired intervals). Row 6 is the denoising rule, which
changes MixBCT's mask file instead of a key. Writes ``<out>/switches/switches.md`` and
``switches.json``; models and logs go to ``<out>/switches/`` (a rerun with ``--reuse`` keeps
finished models).
"""
import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.demo.settings import PUBLISHED_CLASS70_IMAGES, Demo
from tools.demo.commands import train_command
from tools.demo.report import margin_text, result_rows
from tools.demo.runner import Pipeline
from utils.errors import require, run_cli
from utils.io import atomic_open
from utils.scenarios import SPLITS

# row → (method, {key: value the row sets}); docs/methods.md, "Differences from the published code".
# The demo runs the published value of every row but 9 (it sizes every method's classifier and schedule
# from the data), so each row sets the corrected value, and rows 9a/9b the published counts.
SWITCHES = {
    "1": ("AdvBCT", {"discriminator_joint_batch": True}),
    "2a": ("UniBCT", {"refine_softmax": "row"}),
    "2b": ("UniBCT", {"refine_normalize": True}),
    "2a+2b": ("UniBCT", {"refine_softmax": "row", "refine_normalize": True}),
    "3": ("NCCL", {"l2_gradient": True}),
    "4": ("NCCL", {"l1_gradient_scale": 1}),
    "3+4": ("NCCL", {"l2_gradient": True, "l1_gradient_scale": 1}),
    "5": ("AdvBCT", {"p2s_average": "all"}),
    "6": ("MixBCT", {}),   # the denoising mask without column normalisation (denoise_credible.py --no_column_norm)
    "7": ("AdvBCT", {"clip_extra_modules": False}),
    "9a": ("MixBCT", {"num_classes": "published", "num_image": "published"}),
    "9b": ("L2", {"num_classes": "published", "num_image": "published"}),
    "14": ("NCCL", {"mask_empty_slots": True}),
}
FIGURES = ("TAR@FAR=1e-3", "top1")


def published_counts(demo):
    """Row 9's published OPclass counts scaled to the demo: classes of the whole set (the published 93,431),
    and the new split's images × 3,625,372 / 3,598,269 (the published schedule's length over the data's)."""
    return {"num_classes": demo.IDENTITIES,
            "num_image": round(demo.new_split_images() * SPLITS["data70"][2] / PUBLISHED_CLASS70_IMAGES)}


def resolve(keys, demo):
    """``keys`` with each ``"published"`` value replaced by the demo's scaled published count."""
    counts = published_counts(demo)
    return {key: counts[key] if value == "published" else value for key, value in keys.items()}


def switches_table(demo_rows, switched):
    """Markdown: per row, the demo run's and the switched run's self-test and margins."""
    def cells(rows):
        by = {(r["test"], r["metric"]): r for r in rows}
        self_test = by[("self", "TAR@FAR=1e-3")]
        return [f"{self_test['value']:.3f}"] + [margin_text(by[("cross", m)]) for m in FIGURES]

    lines = ["| # | method | switched setting | demo: self TAR@FAR=1e-3 | demo: margin TAR@FAR=1e-3 | "
             "demo: margin top-1 | switched: self TAR@FAR=1e-3 | switched: margin TAR@FAR=1e-3 | "
             "switched: margin top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for tag, (method, keys, rows) in switched.items():
        setting = ", ".join(f"`{k} = {v!r}`" for k, v in keys.items()) or "`denoise_credible.py --no_column_norm`"
        lines.append(f"| {tag} | {method} | {setting} | " + " | ".join(cells(demo_rows[method]) + cells(rows)) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "demo"), help="the demo run's folder")
    parser.add_argument("--data", default=os.path.join(ROOT, "dataset", "synthetic"), help="the demo run's data")
    parser.add_argument("--rows", default=",".join(SWITCHES), help=f"comma-separated rows: {', '.join(SWITCHES)}")
    parser.add_argument("--profile", default="full", help="the demo run's profile (full, quick)")
    parser.add_argument("--reuse", action="store_true", help="keep models a previous run finished")
    args = parser.parse_args()
    tags = [t for t in args.rows.split(",") if t]
    for tag in tags:
        require(tag in SWITCHES, f"--rows: unknown row '{tag}' (expected some of {', '.join(SWITCHES)})")
    out, data = os.path.abspath(args.out), os.path.abspath(args.data)
    results = os.path.join(out, "results.json")
    old_embeddings = os.path.join(out, "eval", "old_self_11.npz")
    for path in (results, old_embeddings):
        require(os.path.isfile(path), f"{path} not found: run tools/run_demo.py --out {args.out} first")
    with open(results) as handle:
        report = json.load(handle)
    require(report.get("profile") == args.profile and report["seeds"] == 1,
            f"{results}: a run of profile {report.get('profile')} with {report['seeds']} seeds, expected "
            f"--profile {args.profile} with one seed")
    demo = Demo(args.profile, data, out, report["scenario"], **report["sizes"])

    folder = os.path.join(out, "switches")
    pipe = Pipeline(folder, dict(os.environ, PYTHONUNBUFFERED="1"), args.reuse, demo.INPUT_SIZE,
                    reuse_evaluations=args.reuse)
    mask = None
    if "6" in tags:   # the published features, denoised without column normalisation, in a folder of their own
        features = os.path.join(folder, "feature_no_column_norm")
        os.makedirs(features, exist_ok=True)
        for kind in ("feature", "label"):
            shutil.copyfile(demo.feature(kind), os.path.join(features, os.path.basename(demo.feature(kind))))
        mask = os.path.join(features, os.path.basename(demo.feature("credible_ratio_90")))
        pipe.stage("denoise_no_column_norm", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", demo.SD,
                                              "--output", features, "--no_column_norm"], done_when=[mask])
    keys = {tag: resolve(SWITCHES[tag][1], demo) for tag in tags}
    runs = {tag: f"{SWITCHES[tag][0]}_switch{tag.replace('+', '_')}" for tag in tags}
    pipe.parallel([(f"train_{name}", train_command(demo, SWITCHES[tag][0], dict(
        keys[tag], output=os.path.join(folder, name), **({"credible_old_feature": mask} if tag == "6" else {}))),
        [os.path.join(folder, name, "model.pt")]) for tag, name in runs.items()], jobs=2)
    demo_rows = {}
    for row in report["rows"]:
        demo_rows.setdefault(row["method"], []).append(row)
    old_results = _old_results(out)
    switched = {}
    for tag, name in runs.items():
        model = os.path.join(folder, name, "model.pt")
        found, _ = pipe.evaluate(name, model, demo.NEW_NETWORK, demo.NEW_WIDTH, data, old_embeddings,
                                 resamples=report["bootstrap"]["resamples"])
        switched[tag] = (SWITCHES[tag][0], keys[tag], result_rows(name, found, old_results))
    table = switches_table(demo_rows, switched)
    with atomic_open(os.path.join(folder, "switches.json")) as handle:
        json.dump({tag: {"method": m, "keys": k, "rows": r} for tag, (m, k, r) in switched.items()}, handle, indent=1)
    with atomic_open(os.path.join(folder, "switches.md")) as handle:
        handle.write(table)
    print("\n" + table)


def _old_results(out):
    """The old model's self-test results of the demo run, as ``Pipeline.evaluate`` returns them."""
    found = []
    for protocol, tag in (("1:1", "11"), ("1:N", "1N")):
        stem = os.path.join(out, "eval", f"old_self_{tag}")
        with open(stem + ".json") as handle:
            found.append(("self", json.load(handle), stem + ".npz"))
        require(found[-1][1]["protocol"] == protocol, f"{stem}.json: expected a {protocol} result")
    return found


if __name__ == "__main__":
    run_cli(main)
