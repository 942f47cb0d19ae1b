"""The demo's stages in order, from its options to ``results.json`` (:func:`run_pipeline`).

Each stage is the real stage script, run as a subprocess by :class:`~tools.demo.runner.Pipeline`:
synthetic data → split → old model (softmax) → old features → prototypes → denoising →
independent new model and each BCT method (K seeds each) → IJB-C-style evaluation (in process) →
gallery-transform rows → backfill curves → with ``--generations 3`` a third generation and the
compatibility matrix → the report (``results.json``, ``results.md``, ``results.png``).
"""
import json
import os
import time

from configs.demo.settings import METHOD_FEATURES, Demo
from tools.demo import report, transforms
from tools.demo.commands import train_command, with_config
from tools.demo.runner import Pipeline, torch_threads
from utils.errors import require
from utils.io import atomic_open
from utils.scenarios import sd_name

METHODS = tuple(METHOD_FEATURES)   # the methods the demo trains, each with its demo config
BOOTSTRAP = {"full": 100, "quick": 20}   # default subject resamples of the intervals
SIZE_OPTIONS = {   # option (configs/demo/settings.SIZES in lower case) → what it sizes
    "identities": "synthetic training identities",
    "images_per_identity": "training images per identity",
    "ijb_subjects": "IJB-C-style test subjects",
    "old_epochs": "epochs of the old model",
    "new_epochs": "epochs of every new model",
    "old_width": "stem width of the old model",
    "new_width": "stem width of every new model",
    "lr": "learning rate of every model (the shared training rule)",
    "warmup_epochs": "linear warm-up epochs of every model (the shared training rule)",
}
GEN3_WIDTH = 16                                        # the third generation: wider again than the second
HELDOUT_SIZES = {"full": (100, 10), "quick": (20, 6)}   # held-out identities × images for the matrix


def settings(args, data, out):
    """The run's :class:`~configs.demo.settings.Demo` from the command-line options."""
    return Demo(args.profile, data, out, args.scenario, **{option: getattr(args, option) for option in SIZE_OPTIONS})


def check_options(args):
    """Refuse bad counts, unknown methods and a generation method that is not trained."""
    require(args.jobs >= 1, f"--jobs must be at least 1, got {args.jobs}")
    require(args.seeds >= 1, f"--seeds must be at least 1, got {args.seeds}")
    require(args.bootstrap is None or args.bootstrap >= 0, f"--bootstrap must be 0 or more, got {args.bootstrap}")
    for method in args.methods:
        require(method in METHODS, f"--methods: unknown method '{method}' (expected some of {', '.join(METHODS)})")
    require(args.generations == 2 or args.generation_method in args.methods,
            f"--generation_method {args.generation_method}: expected one of the trained --methods "
            f"({', '.join(args.methods)})")


def run_pipeline(args):
    """Every stage of one demo run; writes ``<out>/results.json``, ``results.md``, ``results.png`` and
    returns the ``results.json`` report."""
    check_options(args)
    out = os.path.abspath(args.out)
    data = os.path.abspath(args.data)
    demo = settings(args, data, out)
    os.environ.setdefault("BCT_CACHE_DIR", os.path.join(out, "cache"))   # resume caches of the stages
    resamples = BOOTSTRAP["quick" if args.quick else "full"] if args.bootstrap is None else args.bootstrap
    pipe = Pipeline(out, dict(os.environ, PYTHONUNBUFFERED="1"), args.reuse, demo.INPUT_SIZE,
                    reuse_evaluations=args.reuse)
    started = time.time()

    old_model = old_model_stages(pipe, demo, data, out, args.scenario)
    runs = [(name, demo.run_name(name, k), k) for k in range(args.seeds) for name in ["independent", *args.methods]]
    evaluated = train_and_evaluate(pipe, demo, data, out, old_model, runs, args.jobs, resamples)
    old_results = evaluated["old"][0]
    per_seed = [report.result_rows("old", old_results)]
    per_seed += [report.result_rows(name, evaluated[run][0], old_results) for name, run, _ in runs]
    transformed, transform_cost = transforms.transform_paths(   # each seed's independent model + gallery transforms
        pipe, demo, out, evaluated["old"][1], resamples, args.seeds, args.quick)
    per_seed += [report.result_rows(name, results, old_results) for name, results in transformed]
    rows = report.combine_seeds([row for rows in per_seed for row in rows])
    curves = write_backfill(pipe, rows, evaluated, demo, data, out, resamples)

    if args.generations == 3:
        run_third_generation(pipe, args, demo, data, out, old_model)

    pipe.seconds["total"] = round(time.time() - started, 1)
    results = {"rows": rows, "seconds": pipe.seconds, "scenario": args.scenario, "profile": args.profile,
               "quick": bool(args.quick), "sizes": demo.sizes(), "seeds": args.seeds,
               "bootstrap": {"resamples": resamples, "level": 0.95, "unit": "subject"},
               "transform_cost": transform_cost, "decision": report.decision_of(rows, curves, transform_cost)}
    table = report.results_table(rows, args.scenario, args.seeds, resamples, args.profile, results["decision"]) \
        + transforms.cost_lines(transform_cost)
    write_results(out, results, table)
    if args.generations == 3:
        with open(os.path.join(out, "compat.md")) as handle:
            print("\n" + handle.read())
    print(f"results: {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')}, "
          f"{os.path.join(out, 'results.png')} ({pipe.seconds['total']:.0f} s)")
    return results


def write_results(out, results, table):
    """``<out>/results.json`` (``results``), ``results.md`` (``table``) and ``results.png`` (its rows); prints the table."""
    with atomic_open(os.path.join(out, "results.json")) as handle:
        json.dump(results, handle, indent=1)
    with atomic_open(os.path.join(out, "results.md")) as handle:
        handle.write(table)
    report.plot_results(results["rows"], os.path.join(out, "results.png"))
    print("\n" + table)


def old_model_stages(pipe, demo, data, out, scenario):
    """Synthetic data and its split, the old model and its feature files (features, prototypes,
    denoising mask); returns the old model's file."""
    pipe.stage("data", ["tools/synthetic/make_synthetic.py", "--out", data, "--identities", str(demo.IDENTITIES),
                        "--images-per-identity", str(demo.IMAGES_PER_IDENTITY),
                        "--ijb-identities", str(demo.IJB_SUBJECTS), "--ijb-max-frames", str(demo.IJB_MAX_FRAMES)],
               done_when=[os.path.join(data, "train.idx"), os.path.join(data, "IJBC", "meta")])
    from utils.dataset import read_property   # imports torch: not before the options are checked

    found = read_property(os.path.join(data, "property"))[0]
    require(found == demo.IDENTITIES, f"{data}: holds {found} training identities, expected "
                                      f"{demo.IDENTITIES} (--reuse with other sizes: pass another --data)")
    pipe.stage("split", ["tools/split_dataset/split_dataset_ms1mv3.py", "--root", data],
               done_when=[os.path.join(data, f"{s}.idx") for s in
                          ("train_part_30_class", "train_part_70_class", "train_part_30_data", "train_part_70_data")])
    old_model = os.path.join(out, "old_softmax", "model.pt")
    pipe.stage("old_model", train_command(demo, "old_softmax"), done_when=[old_model])
    feature_dir = os.path.join(out, "feature_save", scenario)
    pipe.stage("features", with_config(demo, ["tools/get_feature/get_feature.py", "--SD", demo.SD, "--output",
                                              feature_dir], "old_softmax"),
               done_when=[demo.feature("feature"), demo.feature("label")])
    pipe.stage("prototypes", ["tools/get_feature/get_avg_feature.py", "--SD", demo.SD, "--output", feature_dir],
               done_when=[demo.feature("avg_feature")])
    pipe.stage("denoise", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", demo.SD,
                           "--output", feature_dir], done_when=[demo.feature("credible_ratio_90")])
    return old_model


def train_and_evaluate(pipe, demo, data, out, old_model, runs, jobs, resamples, extra=None):
    """Train every new model of ``runs`` (``(config name, run name, seed index)``), ``jobs`` at a time,
    and evaluate the old model and each new one (:meth:`Pipeline.evaluate`); returns ``{run: (results,
    embeddings file)}``, the old model under ``"old"``. ``extra``: ``{run: keys}`` set over a run's
    demo config (a study's variants; ``output`` must then be ``<out>/<run>``)."""
    models = [("old", old_model, demo.OLD_NETWORK, demo.OLD_WIDTH)]
    models += [(run, os.path.join(out, run, "model.pt"), demo.NEW_NETWORK, demo.NEW_WIDTH) for _, run, _ in runs]
    evaluated = {}

    def evaluate_next(finished, threads=None):
        """Evaluate the first model that is ready (the old one first: its embeddings serve every
        cross-test; a new one once its training stage is done); False when none is."""
        ready = [m for m in models if m[0] not in evaluated
                 and (m[0] == "old" or ("old" in evaluated and f"train_{m[0]}" in finished))]
        if not ready:
            return False
        run, model, network, width = ready[0]
        old_embeddings = evaluated["old"][1] if run != "old" else None
        with torch_threads(threads):
            evaluated[run] = pipe.evaluate(run, model, network, width, data, old_embeddings, resamples)
        return True

    # the models are evaluated in this process as soon as the last round of training leaves a core free
    pipe.parallel([(f"train_{run}", train_command(demo.seeded(k), name, (extra or {}).get(run)),
                    [os.path.join(out, run, "model.pt")])
                   for name, run, k in runs], jobs=jobs, idle_work=evaluate_next)
    while evaluate_next(set(pipe.seconds)):
        pass
    return evaluated


def write_backfill(pipe, rows, evaluated, demo, data, out, resamples):
    """Backfill curves (:mod:`tools.demo.backfill`) of the most compatible method (highest cross-test
    TAR@FAR=1e-3, first seed) and of the independent model re-extracting the old model's gallery of the
    IJB-C-style images: ``<out>/backfill.json``, ``backfill.md``, ``backfill.png``; returns the report."""
    from tools.demo import backfill

    cross = {r["method"]: r["value"] for r in rows if r["test"] == "cross" and r["metric"] == "TAR@FAR=1e-3"}
    best = max((m for m in cross if m in METHODS), key=cross.get, default=None)   # a BCT method
    names = [m for m in (best, "independent") if m in cross]
    start = time.time()
    curves = backfill.write_curves(data, evaluated["old"][1], {m: evaluated[demo.run_name(m, 0)][1] for m in names},
                                   out, resamples)
    pipe.seconds["backfill"] = round(time.time() - start, 1)
    print(f"[backfill] {', '.join(names)} against the old gallery: {os.path.join(out, 'backfill.md')} "
          f"({pipe.seconds['backfill']:.1f} s)", flush=True)
    return curves


def run_third_generation(pipe, args, demo, data, out, old_model):
    """Generation 3: ``--generation_method`` against generation 2's features (the model that method
    trained), then the compatibility matrix of generations 1–3 on held-out synthetic identities."""
    method = args.generation_method
    second = os.path.join(out, method, "model.pt")
    feature_dir = os.path.join(out, "feature_save", args.scenario)
    sd2 = sd_name(demo.EMBEDDING_SIZE, f"{method}gen2", "arc", demo.FEATURE_SPLIT)
    pipe.stage("gen2_features", with_config(demo, ["tools/get_feature/get_feature.py", "--SD", sd2, "--output",
                                                   feature_dir], method),
               done_when=[demo.feature("feature", sd2)])
    if method in ("BCT", "UniBCT"):
        pipe.stage("gen2_prototypes", ["tools/get_feature/get_avg_feature.py", "--SD", sd2, "--output", feature_dir],
                   done_when=[demo.feature("avg_feature", sd2)])
    if method == "MixBCT":
        pipe.stage("gen2_denoise", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", sd2,
                                    "--output", feature_dir],
                   done_when=[demo.feature("credible_ratio_90", sd2)])
    name = f"{method}_gen3"   # the method's demo config, one size wider, against generation 2's features
    third = os.path.join(out, name, "model.pt")
    pipe.stage("train_gen3", train_command(demo, method, {"output": os.path.join(out, name),
                                                          "network_width": GEN3_WIDTH}, sd2), done_when=[third])
    heldout = data + "_heldout"
    identities, per_identity = HELDOUT_SIZES["quick" if args.quick else "full"]
    pipe.stage("heldout_data", ["tools/synthetic/make_synthetic.py", "--out", heldout, "--identities", str(identities),
                                "--images-per-identity", str(per_identity), "--ijb-identities", "2", "--seed", "1"],
               done_when=[os.path.join(heldout, "train.idx")])
    pipe.stage("compat", ["tools/compat_eval/compat_eval.py", "--rec", heldout, "--models", old_model, second, third,
                          "--names", "gen1", f"gen2_{method}", f"gen3_{method}",
                          "--networks", demo.OLD_NETWORK, demo.NEW_NETWORK, demo.NEW_NETWORK,
                          "--widths", str(demo.OLD_WIDTH), str(demo.NEW_WIDTH), str(GEN3_WIDTH),
                          "--input_sizes", str(demo.INPUT_SIZE), "--impostors", "100000", "--bootstrap", "100",
                          "--metric", "TAR@FAR=1e-3", "--num_workers", "1", "-R", os.path.join(out, "compat")])
