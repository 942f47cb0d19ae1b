"""The whole pipeline on synthetic data, on a CPU, ending with the comparison table.

    python tools/run_demo.py [--quick] [--methods L2,BCT,…] [--scenario OPclass] [--out DIR] [--reuse]
                             [--seeds K] [--bootstrap N] [--generations 3 [--generation_method L2]]
                             [--identities N] [--images_per_identity N] [--ijb_subjects N]
                             [--old_epochs N] [--new_epochs N]

Stages (each the real stage script, run as a subprocess with its own log under ``<out>/logs/``):
synthetic data → split → old model (softmax) → old features → prototypes → denoising →
independent new model and each BCT method (K seeds each with ``--seeds K``) → IJB-C-style 1:1 and
1:N, self-test and cross-test, with 95 % subject-bootstrap intervals. Writes ``<out>/results.md``,
``<out>/results.json`` and ``<out>/results.png``. Sizes and the tuning rule: configs/demo/settings.py.
``--generations 3`` then trains a third generation with ``--generation_method`` against the second
generation's features (the model that method trained) and ends with the compatibility matrix of the
three generations on held-out synthetic identities (``tools/compat_eval``): ``<out>/compat.md``.
"""
import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.demo.settings import METHOD_FEATURES, PROFILES, Demo
from utils.errors import UserError, require, run_cli
from utils.io import atomic_np_savez, atomic_open, safe_np_load
from utils.scenarios import SCENARIOS, sd_name

METHODS = tuple(METHOD_FEATURES)   # the methods the demo trains, each with its demo config
BOOTSTRAP = {"full": 100, "quick": 20}   # default subject resamples of the intervals
METRICS = ("TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "top1", "TPIR@FPIR=1e-1")
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


class Pipeline:
    """Runs stages in order, one log file each, timing them; ``--reuse`` skips finished stages."""

    def __init__(self, out, env, reuse, input_size=None):
        self.out, self.env, self.reuse, self.input_size = out, env, reuse, input_size
        self.seconds = {}
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def stage(self, name, command, done_when=()):
        """Run ``command`` (argv list, python scripts relative to the repo root) unless its outputs exist."""
        self.parallel([(name, command, done_when)], jobs=1)

    def parallel(self, stages, jobs, idle_work=None):
        """Run independent stages ``(name, command, done_when)``, up to ``jobs`` at a
        time, each with an equal share of the CPU threads.

        ``idle_work(finished, threads)`` is called in this process whenever no stage is waiting and
        fewer than ``jobs`` run (the last round), with the names of the stages done so far and the
        threads left free; it does one piece of work and returns False when none is ready.
        """
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env = dict(self.env, OMP_NUM_THREADS=str(threads)) if jobs > 1 else self.env
        pending, running = list(stages), {}
        while pending or running:
            while pending and len(running) < jobs:
                name, command, done_when = pending.pop(0)
                if self.reuse and done_when and all(os.path.exists(p) for p in done_when):
                    print(f"[{name}] reused ({', '.join(os.path.relpath(p, ROOT) for p in done_when)})", flush=True)
                    self.seconds[name] = 0.0
                    continue
                log = os.path.join(self.logs, f"{name}.log")
                print(f"[{name}] running … (log: {os.path.relpath(log, ROOT)})", flush=True)
                handle = open(log, "w")
                handle.write(f"$ python {shlex.join(command)}\n")   # the command, to rerun the stage by hand
                handle.flush()
                proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                                        stdout=handle, stderr=subprocess.STDOUT)
                running[name] = (proc, handle, log, time.time())
            if idle_work is not None and not pending and len(running) < jobs and \
                    idle_work(set(self.seconds), max(1, (os.cpu_count() or 1) - threads * len(running))):
                self._collect(running)
                continue
            time.sleep(0.2)
            self._collect(running)

    def _collect(self, running):
        """Note the stages of ``running`` that have ended (one that ends during ``idle_work`` is timed when
        that work returns); a failed one stops the others and is raised."""
        for name, (proc, handle, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[name]
            self.seconds[name] = round(time.time() - start, 1)
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                raise UserError(f"stage '{name}' failed (exit {proc.returncode}): {_last_line(log)} — see {log}")
            print(f"[{name}] done in {self.seconds[name]:.1f} s", flush=True)

    def evaluate(self, name, model, network, width, data, old_embeddings=None, resamples=0):
        """IJB-C 1:1 and 1:N of one model, self-test and (with ``old_embeddings``) cross-test.

        The model embeds the images once (``ijbc_eval.evaluate`` with saved embeddings); the other
        protocols, and the cross-test against the old model's saved embeddings, are computed from
        them (``restore_embs``), as a user would with -E. Returns ``([(test, result, result file)],
        embeddings file)``; with ``resamples`` each result file holds its figures over the resamples.
        """
        from tools.ijbc_eval.ijbc_eval import evaluate

        folder = os.path.join(self.out, "eval")
        os.makedirs(folder, exist_ok=True)
        stage, log = f"eval_{name}", os.path.join(self.logs, f"eval_{name}.log")
        print(f"[{stage}] running … (log: {os.path.relpath(log, ROOT)})", flush=True)
        start = time.time()
        options = dict(data_path=data, resamples=resamples)
        results = []
        try:
            with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                first = os.path.join(folder, f"{name}_self_11.npz")
                results.append(("self", evaluate(model, network, width=width, input_size=self.input_size,
                                                 num_workers=1, save_embeddings=True, save_result=first, **options),
                                first))
                runs = [("self", True, first)]
                if old_embeddings is not None:
                    cross = os.path.join(folder, f"{name}_cross_embs.npz")
                    with safe_np_load(first) as new, safe_np_load(old_embeddings) as old:
                        atomic_np_savez(cross, embs=new["embs"], embs_f=new["embs_f"],
                                        embs_old=old["embs"], embs_f_old=old["embs_f"])
                    runs += [("cross", False, cross), ("cross", True, cross)]
                for test, one_to_n, source in runs:
                    path = os.path.join(folder, f"{name}_{test}_{'1N' if one_to_n else '11'}.npz")
                    results.append((test, evaluate(restore_embs=source, one_to_n=one_to_n, save_result=path,
                                                   **options), path))
        except (UserError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"stage '{stage}' failed: {exc} — see {log}") from None
        self.seconds[stage] = round(time.time() - start, 1)
        print(f"[{stage}] done in {self.seconds[stage]:.1f} s", flush=True)
        return results, first


@contextlib.contextmanager
def torch_threads(count):
    """torch's intra-op threads set to ``count`` inside the block (unchanged when None)."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _last_line(path):
    with open(path, errors="replace") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return lines[-1] if lines else "no output"


def config_file(name):
    """The demo config of ``name`` (``old_softmax``, ``independent`` or a method), relative to the root."""
    if name in ("old_softmax", "independent"):
        return f"configs/demo/{name}.py"
    return os.path.join("BCT_methods", name, "configs", f"demo_{name}.py")


def with_config(demo, command, name, extra=None, sd=None):
    """``command`` (script first) with ``name``'s demo config and ``--set`` for the keys of this run
    (``demo.keys``, then ``extra``) that differ from the file's."""
    from utils.config import get_config

    path = config_file(name)
    overrides = demo.overrides(name, get_config(os.path.join(ROOT, path)), extra, sd)
    return [command[0], path, *command[1:]] + (["--set", *overrides] if overrides else [])


def train_command(demo, name, extra=None, sd=None):
    """The training command of demo config ``name`` in this run (``train_old_*.py`` or the method's)."""
    script = {"old_softmax": "train_old_softmax.py", "independent": "train_old_arc.py"}.get(
        name, os.path.join("BCT_methods", name, "train.py"))
    return with_config(demo, [script], name, extra, sd)


def settings(args, data, out):
    """The run's :class:`~configs.demo.settings.Demo` from the command-line options."""
    return Demo(args.profile, data, out, args.scenario, **{option: getattr(args, option) for option in SIZE_OPTIONS})


def run_pipeline(args):
    require(args.jobs >= 1, f"--jobs must be at least 1, got {args.jobs}")
    require(args.seeds >= 1, f"--seeds must be at least 1, got {args.seeds}")
    require(args.bootstrap is None or args.bootstrap >= 0, f"--bootstrap must be 0 or more, got {args.bootstrap}")
    for method in args.methods:
        require(method in METHODS, f"--methods: unknown method '{method}' (expected some of {', '.join(METHODS)})")
    require(args.generations == 2 or args.generation_method in args.methods,
            f"--generation_method {args.generation_method}: expected one of the trained --methods "
            f"({', '.join(args.methods)})")
    out = os.path.abspath(args.out)
    data = os.path.abspath(args.data)
    demo = settings(args, data, out)
    os.environ.setdefault("BCT_CACHE_DIR", os.path.join(out, "cache"))   # resume caches of the stages
    resamples = BOOTSTRAP["quick" if args.quick else "full"] if args.bootstrap is None else args.bootstrap
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pipe = Pipeline(out, env, args.reuse, demo.INPUT_SIZE)
    started = time.time()

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
    feature_dir = os.path.join(out, "feature_save", args.scenario)
    pipe.stage("features", with_config(demo, ["tools/get_feature/get_feature.py", "--SD", demo.SD, "--output",
                                              feature_dir], "old_softmax"),
               done_when=[demo.feature("feature"), demo.feature("label")])
    pipe.stage("prototypes", ["tools/get_feature/get_avg_feature.py", "--SD", demo.SD, "--output", feature_dir],
               done_when=[demo.feature("avg_feature")])
    pipe.stage("denoise", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", demo.SD,
                           "--output", feature_dir], done_when=[demo.feature("credible_ratio_90")])

    runs = [(name, demo.run_name(name, k), k) for k in range(args.seeds) for name in ["independent", *args.methods]]
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
    pipe.parallel([(f"train_{run}", train_command(demo.seeded(k), name), [os.path.join(out, run, "model.pt")])
                   for name, run, k in runs], jobs=args.jobs, idle_work=evaluate_next)
    while evaluate_next(set(pipe.seconds)):
        pass
    old_results = evaluated["old"][0]
    per_seed = [_rows("old", old_results)] + [_rows(name, evaluated[run][0], old_results) for name, run, _ in runs]
    from tools.transform.demo import cost_lines, transform_paths   # the independent model + gallery transforms
    transformed, transform_cost = transform_paths(pipe, demo, out, evaluated["old"][1], os.path.join(
        out, "eval", "independent_cross_embs.npz"), "independent", resamples, args.quick)
    per_seed += [_rows(name, results, old_results) for name, results in transformed]
    rows = combine_seeds([row for rows in per_seed for row in rows])
    write_backfill(pipe, rows, evaluated, demo, data, out, resamples)

    if args.generations == 3:
        run_third_generation(pipe, args, demo, data, out, old_model)

    pipe.seconds["total"] = round(time.time() - started, 1)
    report = {"rows": rows, "seconds": pipe.seconds, "scenario": args.scenario, "profile": args.profile,
              "quick": bool(args.quick),
              "sizes": demo.sizes(),
              "seeds": args.seeds, "bootstrap": {"resamples": resamples, "level": 0.95, "unit": "subject"},
              "transform_cost": transform_cost}
    table = results_table(rows, args.scenario, args.seeds, resamples) + cost_lines(transform_cost)
    with atomic_open(os.path.join(out, "results.json")) as handle:
        json.dump(report, handle, indent=1)
    with atomic_open(os.path.join(out, "results.md")) as handle:
        handle.write(table)
    plot_results(rows, os.path.join(out, "results.png"))
    print("\n" + table)
    if args.generations == 3:
        with open(os.path.join(out, "compat.md")) as handle:
            print("\n" + handle.read())
    print(f"results: {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.json')}, "
          f"{os.path.join(out, 'results.png')} ({pipe.seconds['total']:.0f} s)")
    return report


def write_backfill(pipe, rows, evaluated, demo, data, out, resamples):
    """Backfill curves (tools/compat_eval/backfill.py) of the most compatible method (highest cross-test
    TAR@FAR=1e-3, first seed) and of the independent model re-extracting the old model's gallery of the
    IJB-C-style images: ``<out>/backfill.json``, ``backfill.md``, ``backfill.png``."""
    from tools.compat_eval.backfill import demo_backfill

    cross = {r["method"]: r["value"] for r in rows if r["test"] == "cross" and r["metric"] == "TAR@FAR=1e-3"}
    best = max((m for m in cross if m in METHODS), key=cross.get, default=None)   # a BCT method
    names = [m for m in (best, "independent") if m in cross]
    start = time.time()
    demo_backfill(data, evaluated["old"][1], {m: evaluated[demo.run_name(m, 0)][1] for m in names}, out, resamples)
    pipe.seconds["backfill"] = round(time.time() - start, 1)
    print(f"[backfill] {', '.join(names)} against the old gallery: {os.path.join(out, 'backfill.md')} "
          f"({pipe.seconds['backfill']:.1f} s)", flush=True)


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


def _rows(method, results, old_results=None):
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
    from tools.ijbc_eval import bootstrap

    name = "bootstrap/" + "/".join(keys_path)
    with safe_np_load(cross_file) as cross, safe_np_load(old_file) as old:
        if name not in cross.files or name not in old.files:
            return float("nan"), float("nan")
        require(len(cross[name]) == len(old[name]),
                f"{cross_file} and {old_file}: different numbers of bootstrap resamples")
        return tuple(bootstrap.percentile_intervals(bootstrap.difference(cross[name], old[name])))


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
        if len(group) > 1:
            row["sd"] = float(np.std([r["value"] for r in group], ddof=1))
            row["seeds"] = len(group)
        combined.append(row)
    return combined


def cell_text(row):
    """``value ± half-width`` (and the sd over seeds) of one row; the value alone without an interval."""
    text = f"{row['value']:.3f}"
    if row["ci_high"] == row["ci_high"]:   # not NaN
        text += f" ± {(row['ci_high'] - row['ci_low']) / 2:.3f}"
    return text + (f" (sd {row['sd']:.3f})" if "sd" in row else "")


def verdict(row):
    """Compatibility verdict of a cross row from its paired margin interval: ``compatible`` (above 0),
    ``not compatible`` (below 0), ``undecided`` (contains 0); without an interval, from the margin alone."""
    low, high = row["margin_ci_low"], row["margin_ci_high"]
    if low != low:   # NaN: no resamples
        return "compatible (no interval)" if row["margin"] > 0 else "not compatible (no interval)"
    return "compatible" if low > 0 else "not compatible" if high < 0 else "undecided"


def margin_text(row):
    """``+0.052 [+0.012, +0.090] compatible``: margin, its paired 95 % interval and the verdict."""
    interval = "" if row["margin_ci_low"] != row["margin_ci_low"] else \
        f" [{row['margin_ci_low']:+.3f}, {row['margin_ci_high']:+.3f}]"
    return f"{row['margin']:+.3f}{interval} {verdict(row)}"


VERDICT_METRICS = ("TAR@FAR=1e-3", "top1")   # the paper's two kinds of figure: 1:1 and 1:N


def results_table(rows, scenario, seeds=1, resamples=0):
    """Markdown table: one row per method and test, with the cross rows' margins over the old self-test
    and their verdicts (TAR@FAR=1e-3 and top-1) and the self-test cost against the independent model."""
    row_of = {(r["method"], r["test"], r["metric"]): r for r in rows}
    value = {key: r["value"] for key, r in row_of.items()}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    indep_self = value.get(("independent", "self", "TAR@FAR=1e-3"))
    lines = [f"Scenario {scenario}, IJB-C-style synthetic evaluation (self: new vs new; cross: new query vs old "
             f"gallery); value ± half-width of the 95 % subject-bootstrap interval ({resamples} resamples)"
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
                cost = f"{value[(method, test, 'TAR@FAR=1e-3')] - indep_self:+.3f}"
            lines.append(f"| {method} | {test} | " + " | ".join(cells + margins) + f" | {cost} |")
    lines += ["", "margin: cross-test minus the old model's self-test of the same figure, with the 95 % interval of "
              "the paired subject resamples; compatible: the interval lies above 0, not compatible: below 0, "
              "undecided: it contains 0. self-test vs independent: TAR@FAR=1e-3 difference."]
    return "\n".join(lines) + "\n"


def plot_results(rows, path):
    """Left: TAR@FAR=1e-3 (self and cross) per method with 95 % intervals; right: each method's margin
    over the old self-test (TAR@FAR=1e-3 and top-1) with its paired interval. Saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path

    row_of = {(r["method"], r["test"], r["metric"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(1.1 * len(methods) + 6, 4.5), width_ratios=(1, 1))
    for offset, test in ((-0.2, "self"), (0.2, "cross")):
        found = [(i, row_of[(m, test, "TAR@FAR=1e-3")]) for i, m in enumerate(methods)
                 if (m, test, "TAR@FAR=1e-3") in row_of]
        _bars(ax, found, offset, f"{test}-test", "value", "ci_low", "ci_high")
    if ("old", "self", "TAR@FAR=1e-3") in row_of:
        old = row_of[("old", "self", "TAR@FAR=1e-3")]
        ax.axhline(old["value"], color="k", linestyle="--", linewidth=1, label="old self-test")
        ax.axhspan(old["ci_low"], old["ci_high"], color="k", alpha=0.1, linewidth=0)
    ax.set_xticks(range(len(methods)), methods, rotation=30)
    ax.set_ylabel("TAR@FAR=1e-3")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    crossed = [m for m in methods if m != "independent" and "margin" in row_of.get((m, "cross", "TAR@FAR=1e-3"), {})]
    for offset, metric in ((-0.2, "TAR@FAR=1e-3"), (0.2, "top1")):
        found = [(i, row_of[(m, "cross", metric)]) for i, m in enumerate(crossed) if (m, "cross", metric) in row_of]
        _bars(bx, found, offset, metric, "margin", "margin_ci_low", "margin_ci_high")
    bx.axhline(0, color="k", linewidth=1)
    bx.set_xticks(range(len(crossed)), crossed, rotation=30)
    bx.set_ylabel("cross-test − old self-test (paired 95 % interval)")
    bx.set_title("BCT methods and gallery transforms (above 0 with its interval: compatible)", fontsize=9)
    bx.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _bars(ax, found, offset, label, key, low, high):
    """Bars of ``row[key]`` at ``index + offset`` with error bars to ``row[low]``..``row[high]``
    (a percentile interval need not contain the value: its bars are clipped at it)."""
    values = [r[key] for _, r in found]
    errors = [[max(r[key] - r[low], 0) if r[low] == r[low] else 0 for _, r in found],
              [max(r[high] - r[key], 0) if r[high] == r[high] else 0 for _, r in found]]
    ax.bar([i + offset for i, _ in found], values, width=0.4, yerr=errors, capsize=3, label=label)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", choices=PROFILES,
                        help="sizes and training rule (configs/demo/settings.py): full (default) or quick")
    parser.add_argument("--quick", action="store_true", help="the same as --profile quick: a one-minute smoke run")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated BCT methods to train")
    parser.add_argument("--scenario", default="OPclass", choices=SCENARIOS)
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "demo"))
    parser.add_argument("--data", default=None, help="synthetic data folder (default: dataset/synthetic, "
                                                     "dataset/synthetic_quick with --quick)")
    parser.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist")
    parser.add_argument("--seeds", type=int, default=1, help="train every new model with K seeds (mean ± sd)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help=f"subject resamples of the 95 %% intervals (default {BOOTSTRAP['full']}, "
                             f"{BOOTSTRAP['quick']} with --quick; 0: none)")
    parser.add_argument("--generations", type=int, default=2, choices=(2, 3),
                        help="3: also train a third generation against the second and end with the "
                             "compatibility matrix of the three (off by default; time: docs/compat.md)")
    parser.add_argument("--generation_method", default="L2",
                        help="method of generations 2 and 3 for --generations 3 (one of --methods; default L2)")
    for option, text in SIZE_OPTIONS.items():
        parser.add_argument(f"--{option}", type=float if option == "lr" else int, default=None, metavar="N",
                            help=f"{text} (default: configs/demo/settings.py's profile)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="new models trained at the same time (default: 2, each with half the CPU threads)")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        args.profile = "quick"
    args.quick = args.profile == "quick"
    if args.data is None:
        args.data = os.path.join(ROOT, "dataset", "synthetic_quick" if args.quick else "synthetic")
    run_cli(run_pipeline, args)


if __name__ == "__main__":
    main()
