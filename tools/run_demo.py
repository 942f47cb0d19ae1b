"""The whole pipeline on synthetic data, on a CPU, ending with the comparison table.

    python tools/run_demo.py [--quick] [--methods L2,BCT,…] [--scenario OPclass] [--out DIR] [--reuse]
        [--generations 3 [--generation_method L2]]

Stages (each the real stage script, run as a subprocess with its own log under ``<out>/logs/``):
synthetic data → split → old model (softmax) → old features → prototypes → denoising →
independent new model and each BCT method → IJB-C-style 1:1 and 1:N, self-test and cross-test.
Writes ``<out>/results.md``, ``<out>/results.json`` and ``<out>/results.png``.
``--generations 3`` then trains a third generation with ``--generation_method`` against the second
generation's features (the model that method trained) and ends with the compatibility matrix of the
three generations on held-out synthetic identities (``tools/compat_eval``): ``<out>/compat.md``.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.errors import UserError, require, run_cli  # noqa: E402
from utils.io import atomic_np_savez, atomic_open, safe_np_load  # noqa: E402

METHODS = ("L2", "BCT", "UniBCT", "NCCL", "AdvBCT", "MixBCT")
SCENARIOS = ("OPclass", "OPdata", "EXclass", "EXdata")
# (identities, images per identity, IJB identities) of the synthetic set
DATA_SIZES = {"full": (400, 20, 120), "quick": (40, 10, 24)}
METRICS = ("TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "top1", "TPIR@FPIR=1e-1")
GEN3_WIDTH = 16                                        # the third generation: wider again than the second
HELDOUT_SIZES = {"full": (100, 10), "quick": (20, 6)}   # held-out identities × images for the matrix


class Pipeline:
    """Runs stages in order, one log file each, timing them; ``--reuse`` skips finished stages."""

    def __init__(self, out, env, reuse):
        self.out, self.env, self.reuse = out, env, reuse
        self.seconds = {}
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def stage(self, name, command, done_when=()):
        """Run ``command`` (argv list, python scripts relative to the repo root) unless its outputs exist."""
        self.parallel([(name, command, done_when)], jobs=1)

    def parallel(self, stages, jobs):
        """Run independent stages, up to ``jobs`` at a time, each with an equal share of the CPU threads."""
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env = dict(self.env, OMP_NUM_THREADS=threads) if jobs > 1 else self.env
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
                proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                                        stdout=handle, stderr=subprocess.STDOUT)
                running[name] = (proc, handle, log, time.time())
            time.sleep(0.2)
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

    def evaluate(self, name, model, old_model, data, settings):
        """IJB-C 1:1 and 1:N of one model, self-test and (new models) cross-test against the old model.

        The models embed the images once (``ijbc_eval.evaluate`` with saved embeddings); the other
        protocols are computed from those embeddings (``restore_embs``), as a user would with -E.
        """
        from tools.ijbc_eval.ijbc_eval import evaluate

        folder = os.path.join(self.out, "eval")
        os.makedirs(folder, exist_ok=True)
        stage, log = f"eval_{name}", os.path.join(self.logs, f"eval_{name}.log")
        print(f"[{stage}] running … (log: {os.path.relpath(log, ROOT)})", flush=True)
        start = time.time()
        cross = name != "old"
        sizes = dict(width=settings.NEW_WIDTH if cross else settings.OLD_WIDTH, input_size=settings.INPUT_SIZE,
                     old_width=settings.OLD_WIDTH,
                     old_input_size=settings.INPUT_SIZE, data_path=data, num_workers=1)
        results = []
        try:
            with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                first = os.path.join(folder, f"{name}_{'cross' if cross else 'self'}_11.npz")
                network = settings.NEW_NETWORK if cross else settings.OLD_NETWORK
                result = evaluate(model, network, model_file_old=old_model if cross else None,
                                  network_old=settings.OLD_NETWORK, save_embeddings=True, save_result=first, **sizes)
                results.append(("cross" if cross else "self", "1:1", result))
                embeddings = dict(safe_np_load(first))
                self_embs = os.path.join(folder, f"{name}_self_embs.npz")
                atomic_np_savez(self_embs, embs=embeddings["embs"], embs_f=embeddings["embs_f"])
                runs = [("self", False, self_embs), ("self", True, self_embs)] if cross else [("self", True, self_embs)]
                if cross:
                    runs.append(("cross", True, first))
                for test, one_to_n, source in runs:
                    tag = f"{name}_{test}_{'1N' if one_to_n else '11'}.npz"
                    results.append((test, "1:N" if one_to_n else "1:1", evaluate(
                        restore_embs=source, one_to_n=one_to_n, data_path=data,
                        save_result=os.path.join(folder, tag))))
        except (UserError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"stage '{stage}' failed: {exc} — see {log}") from None
        self.seconds[stage] = round(time.time() - start, 1)
        print(f"[{stage}] done in {self.seconds[stage]:.1f} s", flush=True)
        return results


def _last_line(path):
    with open(path, errors="replace") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return lines[-1] if lines else "no output"


def _method_config(method):
    return os.path.join("BCT_methods", method, "configs", f"demo_{method}.py")


def run_pipeline(args):
    require(args.jobs >= 1, f"--jobs must be at least 1, got {args.jobs}")
    for method in args.methods:
        require(method in METHODS, f"--methods: unknown method '{method}' (expected some of {', '.join(METHODS)})")
    require(args.generations == 2 or args.generation_method in args.methods,
            f"--generation_method {args.generation_method}: expected one of the trained --methods "
            f"({', '.join(args.methods)})")
    out = os.path.abspath(args.out)
    data = os.path.abspath(args.data)
    os.environ.update(BCT_DEMO_DATA=data, BCT_DEMO_OUT=out, BCT_DEMO_SCENARIO=args.scenario,
                      BCT_DEMO_QUICK="1" if args.quick else "0")
    os.environ.setdefault("BCT_CACHE_DIR", os.path.join(out, "cache"))   # resume caches of the stages
    from configs.demo import settings  # reads the variables above, as every stage's config does
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pipe = Pipeline(out, env, args.reuse)
    started = time.time()

    identities, per_identity, ijb = DATA_SIZES["quick" if args.quick else "full"]
    pipe.stage("data", ["tools/synthetic/make_synthetic.py", "--out", data, "--identities", str(identities),
                        "--images-per-identity", str(per_identity), "--ijb-identities", str(ijb)],
               done_when=[os.path.join(data, "train.idx"), os.path.join(data, "IJBC", "meta")])
    pipe.stage("split", ["tools/split_dataset/split_dataset_ms1mv3.py", "--root", data],
               done_when=[os.path.join(data, f"{s}.idx") for s in
                          ("train_part_30_class", "train_part_70_class", "train_part_30_data", "train_part_70_data")])
    old_cfg = "configs/demo/old_softmax.py"
    old_model = os.path.join(out, "old_softmax", "model.pt")
    pipe.stage("old_model", ["train_old_softmax.py", old_cfg], done_when=[old_model])
    feature_dir = os.path.join(out, "feature_save", args.scenario)
    pipe.stage("features", ["tools/get_feature/get_feature.py", old_cfg, "--SD", settings.SD, "--output", feature_dir],
               done_when=[settings.feature("feature"), settings.feature("label")])
    pipe.stage("prototypes", ["tools/get_feature/get_avg_feature.py", "--SD", settings.SD, "--output", feature_dir],
               done_when=[settings.feature("avg_feature")])
    pipe.stage("denoise", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", settings.SD,
                           "--output", feature_dir], done_when=[settings.feature("credible_ratio_90_feature")])

    new_models = {"independent": ("train_old_arc.py", "configs/demo/independent.py")}
    for method in args.methods:
        new_models[method] = (os.path.join("BCT_methods", method, "train.py"), _method_config(method))
    pipe.parallel([(f"train_{name}", [script, cfg], [os.path.join(out, name, "model.pt")])
                   for name, (script, cfg) in new_models.items()], jobs=args.jobs)

    rows = []
    for name, model in [("old", old_model)] + [(n, os.path.join(out, n, "model.pt")) for n in new_models]:
        for test, protocol, result in pipe.evaluate(name, model, old_model, data, settings):
            rows.extend(_rows(name, test, result))

    if args.generations == 3:
        run_third_generation(pipe, args, settings, data, out, old_model)

    pipe.seconds["total"] = round(time.time() - started, 1)
    report = {"rows": rows, "seconds": pipe.seconds, "scenario": args.scenario, "quick": bool(args.quick)}
    table = results_table(rows, args.scenario)
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


def run_third_generation(pipe, args, settings, data, out, old_model):
    """Generation 3: ``--generation_method`` against generation 2's features (the model that method
    trained), then the compatibility matrix of generations 1–3 on held-out synthetic identities."""
    method = args.generation_method
    second = os.path.join(out, method, "model.pt")
    feature_dir = os.path.join(out, "feature_save", args.scenario)
    sd2 = f"f{settings.EMBEDDING_SIZE}_{method}gen2_arc_{settings.FEATURE_SPLIT}"
    pipe.stage("gen2_features", ["tools/get_feature/get_feature.py", _method_config(method), "--SD", sd2,
                                 "--output", feature_dir], done_when=[os.path.join(feature_dir, f"{sd2}_feature.npy")])
    if method in ("BCT", "UniBCT"):
        pipe.stage("gen2_prototypes", ["tools/get_feature/get_avg_feature.py", "--SD", sd2, "--output", feature_dir],
                   done_when=[os.path.join(feature_dir, f"{sd2}_avg_feature.npy")])
    if method == "MixBCT":
        pipe.stage("gen2_denoise", ["tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", sd2,
                                    "--output", feature_dir],
                   done_when=[os.path.join(feature_dir, f"{sd2}_credible_ratio_90_feature.npy")])
    name = f"{method}_gen3"
    folder = os.path.join(out, "configs_gen3")
    os.makedirs(folder, exist_ok=True)
    with atomic_open(os.path.join(folder, "base.py")) as handle:
        handle.write(f"from BCT_methods.{method}.configs.base import config  # noqa: F401\n")
    config = os.path.join(folder, f"{name}.py")
    with atomic_open(config) as handle:      # the method's demo config, one size wider, against generation 2
        handle.write(f'"""Written by tools/run_demo.py --generations 3: {method}, generation 3 against the '
                     f'features of generation 2."""\n'
                     f"from BCT_methods.{method}.configs.demo_{method} import config\n\n"
                     f"config.output = {os.path.join(out, name)!r}\n"
                     f"config.network_width = {GEN3_WIDTH}\n"
                     f"for key in ('old_embedding', 'old_prototype', 'credible_old_feature'):\n"
                     f"    if config.get(key):\n"
                     f"        config[key] = config[key].replace({settings.SD!r}, {sd2!r})\n")
    third = os.path.join(out, name, "model.pt")
    pipe.stage("train_gen3", [os.path.join("BCT_methods", method, "train.py"), config], done_when=[third])
    heldout = data + "_heldout"
    identities, per_identity = HELDOUT_SIZES["quick" if args.quick else "full"]
    pipe.stage("heldout_data", ["tools/synthetic/make_synthetic.py", "--out", heldout, "--identities", str(identities),
                                "--images-per-identity", str(per_identity), "--ijb-identities", "2", "--seed", "1"],
               done_when=[os.path.join(heldout, "train.idx")])
    pipe.stage("compat", ["tools/compat_eval/compat_eval.py", "--rec", heldout, "--models", old_model, second, third,
                          "--names", "gen1", f"gen2_{method}", f"gen3_{method}",
                          "--networks", settings.OLD_NETWORK, settings.NEW_NETWORK, settings.NEW_NETWORK,
                          "--widths", str(settings.OLD_WIDTH), str(settings.NEW_WIDTH), str(GEN3_WIDTH),
                          "--input_sizes", str(settings.INPUT_SIZE), "--impostors", "100000", "--bootstrap", "100",
                          "--metric", "TAR@FAR=1e-3", "--num_workers", "1", "-R", os.path.join(out, "compat")])


def _rows(method, test, result):
    """The demo's metrics from one ijbc_eval JSON result."""
    if result["protocol"] == "1:1":
        values = {f"TAR@FAR={far}": result["TAR@FAR"][far] for far in ("1e-4", "1e-3", "1e-2")}
    else:
        values = {"top1": result["top1"], "TPIR@FPIR=1e-1": result["TPIR@FPIR"]["1e-1"]}
    return [{"method": method, "test": test, "metric": k, "value": float(v)} for k, v in values.items()]


def results_table(rows, scenario):
    """Markdown table: one row per method and test, plus compatibility verdict and self-test cost."""
    value = {(r["method"], r["test"], r["metric"]): r["value"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    old_self = value.get(("old", "self", "TAR@FAR=1e-3"))
    indep_self = value.get(("independent", "self", "TAR@FAR=1e-3"))
    lines = [f"Scenario {scenario}, IJB-C-style synthetic evaluation (self: new vs new; cross: new query vs old gallery)", "",
             "| method | test | " + " | ".join(METRICS) + " | compatible | self-test vs independent |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for method in methods:
        for test in ("self", "cross"):
            if (method, test, METRICS[1]) not in value:
                continue
            cells = [f"{value.get((method, test, m), float('nan')):.4f}" for m in METRICS]
            compatible, cost = "", ""
            if test == "cross" and old_self is not None:
                beats = value[(method, test, "TAR@FAR=1e-3")] > old_self
                compatible = "yes" if beats else "no"
            if test == "self" and method not in ("old", "independent") and indep_self is not None:
                cost = f"{value[(method, test, 'TAR@FAR=1e-3')] - indep_self:+.4f}"
            lines.append(f"| {method} | {test} | " + " | ".join(cells) + f" | {compatible} | {cost} |")
    lines += ["", "compatible: cross-test TAR@FAR=1e-3 above the old model's self-test "
              f"({old_self:.4f}); self-test vs independent: TAR@FAR=1e-3 difference." if old_self is not None else ""]
    return "\n".join(lines) + "\n"


def plot_results(rows, path):
    """Grouped bars of TAR@FAR=1e-3 (self and cross) per method, saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.io import atomic_path

    value = {(r["method"], r["test"]): r["value"] for r in rows if r["metric"] == "TAR@FAR=1e-3"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
    for offset, test in ((-0.2, "self"), (0.2, "cross")):
        xs = [i + offset for i, m in enumerate(methods) if (m, test) in value]
        ys = [value[(m, test)] for m in methods if (m, test) in value]
        ax.bar(xs, ys, width=0.4, label=f"{test}-test")
    if ("old", "self") in value:
        ax.axhline(value[("old", "self")], color="k", linestyle="--", linewidth=1, label="old self-test")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("TAR@FAR=1e-3")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (about 3 minutes)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated BCT methods to train")
    parser.add_argument("--scenario", default="OPclass", choices=SCENARIOS)
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "demo"))
    parser.add_argument("--data", default=None, help="synthetic data folder (default: dataset/synthetic, "
                                                      "dataset/synthetic_quick with --quick)")
    parser.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist")
    parser.add_argument("--generations", type=int, default=2, choices=(2, 3),
                        help="3: also train a third generation against the second and end with the "
                             "compatibility matrix of the three (off by default; time: docs/compat.md)")
    parser.add_argument("--generation_method", default="L2",
                        help="method of generations 2 and 3 for --generations 3 (one of --methods; default L2)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="new models trained at the same time (default: 2, each with half the CPU threads)")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if args.data is None:
        args.data = os.path.join(ROOT, "dataset", "synthetic_quick" if args.quick else "synthetic")
    run_cli(run_pipeline, args)


if __name__ == "__main__":
    main()
