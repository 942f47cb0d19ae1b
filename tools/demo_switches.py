"""The effect of each published-behaviour switch on the demo: one method retrained per flipped key.

    python tools/demo_switches.py [--out work_dirs/demo] [--data dataset/synthetic] [--rows 1,2b,4]

Run after ``tools/run_demo.py`` (the full profile): it reuses that run's old model, feature files,
old embeddings and results. Each row of :data:`SWITCHES` retrains one method with its demo config
(same data, old model, features and seed) and one switch set to its corrected value, then evaluates
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

from tools.run_demo import Pipeline, _rows, margin_text, settings, write_method_config
from utils.errors import require, run_cli
from utils.io import atomic_open

# row → (method, {key: corrected value}); docs/methods.md, "Differences from the published code"
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
}
FIGURES = ("TAR@FAR=1e-3", "top1")


def write_config(folder, tag, method, keys, mask=None):
    """A config over ``demo_<method>.py`` with ``keys`` set (and the denoising mask ``mask``)."""
    name = f"{method}_switch{tag.replace('+', '_')}"
    body = f"config.output = {os.path.join(folder, name)!r}\n"
    body += "".join(f"config.{key} = {value!r}\n" for key, value in keys.items())
    if mask:
        body += f"config.credible_old_feature = {mask!r}\n"
    return name, write_method_config(os.path.join(folder, "configs", method), method, name, body)


def switches_table(published, corrected):
    """Markdown: per row, the published run's and the corrected run's self-test and margins."""
    def cells(rows):
        by = {(r["test"], r["metric"]): r for r in rows}
        self_test = by[("self", "TAR@FAR=1e-3")]
        return [f"{self_test['value']:.3f}"] + [margin_text(by[("cross", m)]) for m in FIGURES]

    lines = ["| # | method | corrected setting | published: self TAR@FAR=1e-3 | published: margin TAR@FAR=1e-3 | "
             "published: margin top-1 | corrected: self TAR@FAR=1e-3 | corrected: margin TAR@FAR=1e-3 | "
             "corrected: margin top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for tag, (method, keys, rows) in corrected.items():
        setting = ", ".join(f"`{k} = {v!r}`" for k, v in keys.items()) or "`denoise_credible.py --no_column_norm`"
        lines.append(f"| {tag} | {method} | {setting} | " + " | ".join(cells(published[method]) + cells(rows)) + " |")
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
    os.environ.update(BCT_DEMO_DATA=data, BCT_DEMO_OUT=out, BCT_DEMO_PROFILE=args.profile)
    demo = settings()   # read again with the variables above, as every stage's config reads them

    folder = os.path.join(out, "switches")
    pipe = Pipeline(folder, dict(os.environ, PYTHONUNBUFFERED="1"), args.reuse, demo.INPUT_SIZE)
    mask = None
    if "6" in tags:   # the published features, denoised without column normalisation, in a folder of their own
        features = os.path.join(folder, "feature_no_column_norm")
        os.makedirs(features, exist_ok=True)
        for kind in ("feature", "label"):
            shutil.copyfile(demo.feature(kind), os.path.join(features, os.path.basename(demo.feature(kind))))
        mask = os.path.join(features, os.path.basename(demo.feature("credible_ratio_90_feature")))
        pipe.stage("denoise_no_column_norm", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", demo.SD,
                                              "--output", features, "--no_column_norm"], done_when=[mask])
    runs = {tag: write_config(folder, tag, SWITCHES[tag][0], SWITCHES[tag][1], mask if tag == "6" else None)
            for tag in tags}
    pipe.parallel([(f"train_{name}", [os.path.join("BCT_methods", SWITCHES[tag][0], "train.py"), path],
                    [os.path.join(folder, name, "model.pt")], {}) for tag, (name, path) in runs.items()], jobs=2)
    with open(results) as handle:
        report = json.load(handle)
    require(report.get("profile") == args.profile and report["seeds"] == 1,
            f"{results}: a run of profile {report.get('profile')} with {report['seeds']} seeds, expected "
            f"--profile {args.profile} with one seed")
    published = {}
    for row in report["rows"]:
        published.setdefault(row["method"], []).append(row)
    old_results = _old_results(out)
    corrected = {}
    for tag, (name, _) in runs.items():
        model = os.path.join(folder, name, "model.pt")
        found, _ = pipe.evaluate(name, model, demo.NEW_NETWORK, demo.NEW_WIDTH, data, old_embeddings,
                                 resamples=report["bootstrap"]["resamples"])
        corrected[tag] = (SWITCHES[tag][0], SWITCHES[tag][1], _rows(name, found, old_results))
    table = switches_table(published, corrected)
    with atomic_open(os.path.join(folder, "switches.json")) as handle:
        json.dump({tag: {"method": m, "keys": k, "rows": r} for tag, (m, k, r) in corrected.items()}, handle, indent=1)
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
